"""Pictures a person can read: masks blended over their images in titled columns, with a colour legend.

Every mask-producing step writes a few of these (``<split>/overlays/<id>.png``: image | masks | ground truth),
``segment`` and ``predict`` one per picture, and ``python -m stableseg_pp.figure`` the README's figure (a grid
of val images through the pipeline's steps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stableseg_pp.data.palette import IGNORE_INDEX, colorize
from stableseg_pp.runtime.atomic import atomic_save

if TYPE_CHECKING:
    from stableseg_pp.artifacts import MaskSetLayout
    from stableseg_pp.data.description import DatasetDescription

MIN_PANEL = 192  # small pictures (the miniature world's 64 px) are enlarged to this side, pixels kept sharp
PAD = 6


def blend(
    image: np.ndarray, mask: np.ndarray, palette: list[int] | None = None, background_index: int | None = 0, alpha: float = 0.7
) -> np.ndarray:
    """The image with each class's colour laid over its pixels (background and ignored pixels dimmed, not coloured)."""
    col = colorize(mask, palette).astype(np.float32)
    keep = (mask == background_index) | (mask == IGNORE_INDEX)
    out = image.astype(np.float32) * (1 - alpha) + col * alpha
    out[keep] = image[keep] * 0.6 + col[keep] * 0.4 * (mask[keep, None] == IGNORE_INDEX)
    return out.clip(0, 255).astype(np.uint8)


def _font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _enlarged(panel: np.ndarray, side: int) -> Image.Image:
    img = Image.fromarray(panel)
    scale = max(1, -(-side // min(img.size)))  # whole-number nearest-neighbour enlargement: class borders stay crisp
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def legend_strip(classes: Mapping[int, str], palette: list[int] | None, width: int) -> Image.Image:
    """Colour swatches with class names, wrapped to ``width`` pixels."""
    font = _font(12)
    ids = sorted(classes)
    colours = np.asarray(colorize(np.array(ids, dtype=np.uint8)[None], palette))[0]
    items = [(tuple(int(c) for c in colour), classes[k]) for colour, k in zip(colours, ids, strict=True)]
    rows: list[list[tuple[tuple[int, int, int], str, int]]] = [[]]
    x = PAD
    for colour, name in items:
        w = 16 + int(font.getlength(name)) + 14
        if x + w > width and rows[-1]:
            rows.append([])
            x = PAD
        rows[-1].append((colour, name, x))
        x += w
    strip = Image.new("RGB", (width, PAD + 20 * len(rows)), "white")
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        y = PAD // 2 + 20 * r
        for colour, name, x in row:
            draw.rectangle([x, y + 2, x + 12, y + 14], fill=colour, outline=(60, 60, 60))
            draw.text((x + 16, y + 1), name, fill="black", font=font)
    return strip


def titled_panels(
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str],
    classes: Mapping[int, str] | None = None,
    palette: list[int] | None = None,
    min_panel: int = MIN_PANEL,
) -> Image.Image:
    """A grid of pictures (``rows`` of equally many panels) under column ``titles``, with a legend of ``classes``
    below (class id -> name; none: no legend)."""
    cells = [[_enlarged(p, min_panel) for p in row] for row in rows]
    col_w = [max(row[c].width for row in cells) for c in range(len(titles))]
    row_h = [max(p.height for p in row) for row in cells]
    font = _font(13)
    header = 22
    width = PAD + sum(w + PAD for w in col_w)
    legend = legend_strip(classes, palette, width) if classes else None
    height = header + sum(h + PAD for h in row_h) + (legend.height if legend else 0)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = PAD
    for title, w in zip(titles, col_w, strict=True):
        draw.text((x + (w - font.getlength(title)) / 2, 4), title, fill="black", font=font)
        x += w + PAD
    y = header
    for row, h in zip(cells, row_h, strict=True):
        x = PAD
        for panel, w in zip(row, col_w, strict=True):
            canvas.paste(panel, (x, y))
            x += w + PAD
        y += h + PAD
    if legend:
        canvas.paste(legend, (0, y))
    return canvas


def present_classes(masks: Sequence[np.ndarray], names: Sequence[str] | Mapping[int, str] | None) -> dict[int, str]:
    """The classes (id -> name) that occur in ``masks``, ignore left out; unnamed ids are called ``class <id>``."""
    ids = sorted({int(v) for m in masks for v in np.unique(m) if int(v) != IGNORE_INDEX})
    lookup = dict(enumerate(names)) if isinstance(names, Sequence) else dict(names or {})
    return {i: str(lookup.get(i, f"class {i}")) for i in ids}


def write_overlays(dataset: DatasetDescription, split: str, ids: Sequence[str], masks: MaskSetLayout, title: str) -> int:
    """Overlays of the written masks of ``ids`` (image | ``title`` | ground truth where the dataset has it) into
    ``masks.overlays``, for a step that writes its masks as files; returns how many."""
    written = 0
    for sid in ids:
        if not masks.is_done(sid):
            continue
        image = dataset.read_image(split, sid)
        mask = np.array(Image.open(masks.mask_path(sid)))
        gt = None
        if dataset.layout.has_mask(split, sid):
            gt = dataset.layout.read_mask(split, sid, len(dataset.class_names))
        if mask.shape != image.shape[:2]:
            continue  # a mask at another size (e.g. an unsupervised segment map): nothing to lay over the picture
        picture = overlay_png(image, mask, gt, palette=dataset.palette, background_index=dataset.background_index,
                              class_names=dataset.class_names, mask_title=title)  # fmt: skip
        atomic_save(masks.overlay_path(sid), lambda t, im=picture: im.save(t, format="PNG"))
        written += 1
    return written


def overlay_png(
    image: np.ndarray,
    pred: np.ndarray,
    gt: np.ndarray | None,
    alpha: float = 0.7,
    palette: list[int] | None = None,
    background_index: int | None = 0,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    mask_title: str = "masks",
) -> Image.Image:
    """Image | the masks over it | the ground truth over it (when there is one), titled, with a legend of the
    classes that occur."""
    panels = [image, blend(image, pred, palette, background_index, alpha)]
    titles = ["image", mask_title]
    if gt is not None:
        panels.append(blend(image, gt, palette, background_index, alpha))
        titles.append("ground truth")
    classes = present_classes([pred] + ([gt] if gt is not None else []), class_names)
    classes.pop(background_index, None)  # background is shown dimmed, not in a colour
    return titled_panels([panels], titles, classes, palette)
