"""The miniature world: a deterministic synthetic dataset of coloured shapes.

Every class has an appearance of its own (a typical colour, jittered and
textured), so a small text-to-image model can bind class words to pixels.
Images are drawn at 4x resolution and downsampled; pixels whose class coverage
is ambiguous (anti-aliased edges) get the ignore label 255, as in PASCAL VOC.
The world is written to disk in the VOC layout so one reader serves it and VOC.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from stableseg_pp.data.palette import IGNORE_INDEX, save_palette_png
from stableseg_pp.runtime.atomic import atomic_save, atomic_write_text

CLASS_NAMES: tuple[str, ...] = (
    "background",
    "circle",
    "square",
    "triangle",
    "star",
    "half moon",
    "cross",
)
# Typical colour of each foreground class (RGB); index 0 (background) unused.
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (215, 45, 45),
    (45, 175, 70),
    (50, 85, 215),
    (230, 205, 40),
    (165, 60, 200),
    (40, 195, 205),
)
SUPERSAMPLE = 4


@dataclass(frozen=True)
class MiniatureSample:
    """One picture of the miniature world with its labels."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8, class ids, 255 = ignore
    classes: tuple[int, ...]  # class ids present, in caption order
    caption: str


def caption_for(class_ids: tuple[int, ...], template: str = "a photo of a {}", joiner: str = " and ") -> str:
    """The caption that names the classes, in the same form stage 0 prompts with."""
    return template.format(joiner.join(CLASS_NAMES[c] for c in class_ids))


def _rotate(points: np.ndarray, angle: float, centre: tuple[float, float]) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    cx, cy = centre
    out = []
    for x, y in points:
        out.append((cx + c * x - s * y, cy + s * x + c * y))
    return out


def _shape_mask(class_id: int, size: int, centre: tuple[float, float], radius: float, angle: float) -> Image.Image:
    """Binary 'L' image (0/255) of one shape at supersampled resolution."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    cx, cy = centre
    r = radius
    name = CLASS_NAMES[class_id]
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "square":
        h = r * 0.85
        pts = np.array([(-h, -h), (h, -h), (h, h), (-h, h)])
        draw.polygon(_rotate(pts, angle, centre), fill=255)
    elif name == "triangle":
        pts = np.array([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
        draw.polygon(_rotate(pts, angle, centre), fill=255)
    elif name == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        draw.polygon(_rotate(np.array(pts), angle, centre), fill=255)
    elif name == "half moon":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        off = r * 0.75
        ox, oy = cx + off * math.cos(angle), cy + off * math.sin(angle)
        draw.ellipse([ox - r * 0.9, oy - r * 0.9, ox + r * 0.9, oy + r * 0.9], fill=0)
    elif name == "cross":
        w, h = r * 0.33, r
        bars = [np.array([(-w, -h), (w, -h), (w, h), (-w, h)]), np.array([(-h, -w), (h, -w), (h, w), (-h, w)])]
        for bar in bars:
            draw.polygon(_rotate(bar, angle, centre), fill=255)
    else:  # pragma: no cover - guarded by CLASS_NAMES
        raise ValueError(f"unknown miniature class {name!r}")
    return img


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A desaturated, low-frequency textured background (float RGB in [0, 255])."""
    base = rng.uniform(70, 170)
    tint = rng.uniform(-18, 18, size=3)
    coarse = rng.normal(0, 1, size=(size // 8 + 1, size // 8 + 1))
    coarse_img = Image.fromarray(((coarse - coarse.min()) / (np.ptp(coarse) + 1e-6) * 255).astype(np.uint8))
    smooth = np.asarray(coarse_img.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0 - 0.5
    fine = rng.normal(0, 6, size=(size, size))
    lum = base + 55 * smooth + fine
    return np.clip(lum[..., None] + tint[None, None, :], 0, 255)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Multiplicative texture for an object: stripes or speckle, around 1.0."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if rng.random() < 0.5:
        angle = rng.uniform(0, math.pi)
        freq = rng.uniform(0.25, 0.6)
        stripes = np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)))
        return 1.0 + 0.12 * stripes
    return 1.0 + rng.normal(0, 0.07, size=(size, size))


def draw_sample(seed: int, size: int = 64, min_objects: int = 1, max_objects: int = 3) -> MiniatureSample:
    """Draw one deterministic sample from ``seed``."""
    rng = np.random.default_rng(seed)
    n_fg = len(CLASS_NAMES) - 1
    n_obj = int(rng.integers(min_objects, max_objects + 1))
    classes = tuple(int(c) + 1 for c in rng.choice(n_fg, size=n_obj, replace=False))
    big = size * SUPERSAMPLE
    image = _background(rng, size)
    coverage = np.zeros((len(CLASS_NAMES), size, size), dtype=np.float32)
    coverage[0] = 1.0
    for cid in classes:
        radius = rng.uniform(0.17, 0.30) * size
        cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        shape = _shape_mask(cid, big, (cx * SUPERSAMPLE, cy * SUPERSAMPLE), radius * SUPERSAMPLE, angle)
        alpha = np.asarray(shape.resize((size, size), Image.BOX), dtype=np.float32) / 255.0
        colour = np.clip(np.array(CLASS_COLOURS[cid], dtype=np.float32) + rng.normal(0, 14, size=3), 0, 255)
        obj = colour[None, None, :] * _texture(rng, size)[..., None]
        image = image * (1 - alpha[..., None]) + obj * alpha[..., None]
        coverage *= (1 - alpha)[None]
        coverage[cid] += alpha
    best = coverage.argmax(0)
    certain = coverage.max(0) >= 0.75
    mask = np.where(certain, best, IGNORE_INDEX).astype(np.uint8)
    # Caption lists the classes that are still visible (an object may be hidden).
    visible = tuple(c for c in classes if (mask == c).sum() >= 4)
    if not visible:
        return draw_sample(seed + 10_000_019, size, min_objects, max_objects)
    image_u8 = np.clip(image + rng.normal(0, 2.0, size=image.shape), 0, 255).astype(np.uint8)
    return MiniatureSample(image=image_u8, mask=mask, classes=visible, caption=caption_for(visible))


# Seeds of the on-disk splits and of the diffusion model's training stream never overlap.
SPLIT_SEED_OFFSET = {"train": 1_000_000, "val": 2_000_000, "diffusion": 5_000_000, "check": 7_000_000}


def sample_seed(split: str, index: int, seed: int = 0) -> int:
    return SPLIT_SEED_OFFSET[split] + 100_003 * seed + index


def write_miniature_voc(root: str | Path, n_train: int = 400, n_val: int = 100, size: int = 64, seed: int = 0) -> Path:
    """Write the miniature world to ``root`` in the PASCAL VOC layout; idempotent and resumable."""
    root = Path(root)
    spec = {"n_train": n_train, "n_val": n_val, "size": size, "seed": seed, "classes": list(CLASS_NAMES), "version": 2}
    done = root / "miniature.json"
    if done.exists() and json.loads(done.read_text()) == spec:
        return root
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    captions: dict[str, str] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        ids = []
        for i in range(n):
            sid = f"{split}_{i:05d}"
            sample = draw_sample(sample_seed(split, i, seed), size=size)
            img_path = root / "JPEGImages" / f"{sid}.jpg"
            mask_path = root / "SegmentationClass" / f"{sid}.png"
            if not (img_path.exists() and mask_path.exists()):
                atomic_save(img_path, lambda p, s=sample: Image.fromarray(s.image).save(p, format="JPEG", quality=95))
                atomic_save(mask_path, lambda p, s=sample: save_palette_png(s.mask, p))
            captions[sid] = sample.caption
            ids.append(sid)
        atomic_write_text(root / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(ids) + "\n")
    atomic_write_text(root / "captions.json", json.dumps(captions, indent=0))
    atomic_write_text(root / "classes.txt", "\n".join(CLASS_NAMES) + "\n")
    atomic_write_text(done, json.dumps(spec))
    return root
