"""Palette PNG masks as PASCAL VOC stores them (class ids in a 'P' image, 255 = ignore)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from stableseg_pp.runtime.errors import ConfigError

IGNORE_INDEX = 255


def voc_palette(n: int = 256) -> list[int]:
    """The standard PASCAL VOC colour map, as a flat list of ``3 * n`` ints."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.extend((r, g, b))
    palette[3 * IGNORE_INDEX : 3 * IGNORE_INDEX + 3] = [224, 224, 192]
    return palette


_PALETTE = voc_palette()

# Cityscapes' official colours of its 19 train ids (cityscapesScripts' labels.py).
CITYSCAPES_COLOURS = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153), (250, 170, 30),
    (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142),
    (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]  # fmt: skip


def palette_for(name: str | None) -> list[int]:
    """A dataset's palette by name: ``voc`` (default, also used for datasets without an official one) or ``cityscapes``."""
    if name in (None, "voc"):
        return _PALETTE
    if name == "cityscapes":
        palette = list(_PALETTE)
        palette[: 3 * len(CITYSCAPES_COLOURS)] = [v for rgb in CITYSCAPES_COLOURS for v in rgb]
        return palette
    raise ConfigError(f"data.palette={name!r}: choose 'voc' or 'cityscapes'")


def save_palette_png(mask: np.ndarray, path: str | Path, palette: list[int] | None = None) -> None:
    """Save a (H, W) uint8 class-id mask as a palette PNG (format forced, any suffix)."""
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    img.putpalette(palette or _PALETTE)
    img.save(path, format="PNG")


def colorize(mask: np.ndarray, palette: list[int] | None = None) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 RGB in the palette's colours (VOC's by default)."""
    pal = np.asarray(palette or _PALETTE, dtype=np.uint8).reshape(-1, 3)
    return pal[np.asarray(mask, dtype=np.uint8)]
