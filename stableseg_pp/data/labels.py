"""Stored mask values -> the class ids a dataset is evaluated on (255 = ignore).

Each dataset stores its labels its own way: ADE20K and Pascal Context-59 keep 0
for "no class" (``reduce_zero_label``: 0 -> 255, k -> k - 1), Cityscapes'
official ``*_labelIds.png`` hold the 34 raw ids (-> the 19 train ids), COCO-Object
is COCO-Stuff with every stuff class merged into background, UECFoodPix keeps
the class in the red channel of an RGB PNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.runtime.errors import ConfigError

# Cityscapes label id -> train id (cityscapesScripts' labels.py); every other id is ignored.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
# COCO-Stuff 164k train ids: 0..79 things, 80..170 stuff -> COCO-Object: 0 background, 1..80 things.
COCO_OBJECT_IDS = {k: (k + 1 if k < 80 else 0) for k in range(171)}

NAMED_LUTS = {"cityscapes_label_ids": CITYSCAPES_TRAIN_IDS, "coco_object": COCO_OBJECT_IDS}


@dataclass(frozen=True)
class LabelMap:
    """How to turn a stored mask into class ids.

    ``channel``: read this channel of an RGB mask (None: the mask is a palette / 'L' PNG).
    ``reduce_zero_label``: 0 -> 255 and k -> k - 1 (mmsegmentation's switch).
    ``lut``: a named table of :data:`NAMED_LUTS` (stored value -> class id; values not in it -> 255).
    """

    channel: int | None = None
    reduce_zero_label: bool = False
    lut: str | None = None

    def __post_init__(self) -> None:
        if self.lut is not None and self.lut not in NAMED_LUTS:
            raise ConfigError(f"label map lut={self.lut!r}: choose one of {sorted(NAMED_LUTS)}")

    @property
    def identity(self) -> bool:
        return not self.reduce_zero_label and self.lut is None

    def table(self) -> np.ndarray:
        """The 256-entry lookup table of this map."""
        table = np.arange(256, dtype=np.uint8)
        if self.lut is not None:
            table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
            for raw, cid in NAMED_LUTS[self.lut].items():
                table[raw] = cid
        if self.reduce_zero_label:
            reduced = np.where(table == 0, IGNORE_INDEX, table.astype(np.int16) - 1)
            table = np.where(table == IGNORE_INDEX, IGNORE_INDEX, reduced).astype(np.uint8)
        return table

    def apply(self, raw: np.ndarray) -> np.ndarray:
        return raw if self.identity else self.table()[raw]
