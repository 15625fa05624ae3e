"""Palette PNG masks as PASCAL VOC stores them (class ids in a 'P' image, 255 = ignore)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

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


def save_palette_png(mask: np.ndarray, path: str | Path) -> None:
    """Save a (H, W) uint8 class-id mask as a palette PNG (format forced, any suffix)."""
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    img.putpalette(_PALETTE)
    img.save(path, format="PNG")


def colorize(mask: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 RGB in the VOC colours."""
    pal = np.asarray(_PALETTE, dtype=np.uint8).reshape(-1, 3)
    return pal[np.asarray(mask, dtype=np.uint8)]
