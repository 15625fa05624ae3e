"""Stored mask values -> the class ids a dataset is evaluated on (255 = ignore).

Each dataset stores its labels its own way: ADE20K and Pascal Context-59 keep 0
for "no class" (``reduce_zero_label``: 0 -> 255, k -> k - 1), Cityscapes'
official ``*_labelIds.png`` hold the 34 raw ids (-> the 19 train ids), COCO-Object
is COCO-Stuff with every stuff class merged into background, COCO-Stuff-27 is
COCO-Stuff with every fine class merged into its super-category, UECFoodPix keeps
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

# COCO-Stuff's 182 fine classes in the order of its labels.txt (github.com/nightrome/cocostuff, labels.txt), 0-indexed
# as the stuffthingmaps_trainval2017 PNGs store them (labels.txt id - 1; 255 = unlabeled): things 0..90, stuff 91..181.
COCO_STUFF_FINE_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk", "toilet",
    "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
    "hair brush", "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard",
    "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light",
    "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement",
    "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock",
    "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other",
    "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip
# The 11 thing classes COCO removed (never annotated, "Removed from COCO." in cocostuff's labels.md). mmsegmentation's
# converter (tools/dataset_converters/coco_stuff164k.py, clsID_to_trID) skips them when it numbers the 171 train ids.
COCO_STUFF_UNUSED_IDS = frozenset(
    COCO_STUFF_FINE_NAMES.index(n) for n in ("street sign", "hat", "shoe", "eye glasses", "plate", "mirror", "window",
                                             "desk", "door", "blender", "hair brush")
)  # fmt: skip
# train id (0..170, *_labelTrainIds.png) -> fine id (0..181): the used fine ids in order.
COCO_STUFF_TRAIN_TO_FINE = tuple(i for i in range(len(COCO_STUFF_FINE_NAMES)) if i not in COCO_STUFF_UNUSED_IDS)

# COCO-Stuff-27, the coarse classes of the unsupervised segmentation literature (IIC, PiCIE, STEGO, DiffSeg, EmerDiff):
# every fine class goes to its COCO-Stuff super-category. The table is cocostuff's label hierarchy (the one IIC ships
# as xu-ji/IIC code/datasets/segmentation/util/cocostuff_hierarchy.y), keyed in IIC's / STEGO's coarse id order
# ("electronic-things" 0 .. "vehicle-things" 11, "ceiling-stuff" 12 .. "water-stuff" 26); it reproduces STEGO's
# fine_to_coarse (mhamilton723/STEGO src/data.py, class Coco). The two names things and stuff share are told apart
# by a "-stuff" suffix.
COCO_STUFF27_HIERARCHY = {
    "electronic": ("tv", "laptop", "mouse", "remote", "keyboard", "cell phone"),
    "appliance": ("microwave", "oven", "toaster", "sink", "refrigerator", "blender"),
    "food": ("banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake"),
    "furniture": ("chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk", "toilet", "door"),
    "indoor": ("book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush"),
    "kitchen": ("bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl"),
    "accessory": ("hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase"),
    "animal": ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"),
    "outdoor": ("traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench"),
    "person": ("person",),
    "sports": ("frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
               "surfboard", "tennis racket"),
    "vehicle": ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"),
    "ceiling": ("ceiling-tile", "ceiling-other"),
    "floor": ("carpet", "floor-tile", "floor-wood", "floor-marble", "floor-stone", "floor-other"),
    "food-stuff": ("fruit", "salad", "vegetable", "food-other"),
    "furniture-stuff": ("door-stuff", "desk-stuff", "table", "shelf", "cabinet", "cupboard", "mirror-stuff", "counter",
                        "light", "stairs", "furniture-other"),
    "rawmaterial": ("cardboard", "paper", "plastic", "metal"),
    "textile": ("rug", "mat", "towel", "napkin", "clothes", "cloth", "curtain", "blanket", "pillow", "banner",
                "textile-other"),
    "wall": ("wall-tile", "wall-panel", "wall-wood", "wall-brick", "wall-stone", "wall-concrete", "wall-other"),
    "window": ("window-blind", "window-other"),
    "building": ("house", "skyscraper", "bridge", "tent", "roof", "building-other"),
    "ground": ("sand", "snow", "dirt", "mud", "gravel", "road", "pavement", "railroad", "platform", "playingfield",
               "ground-other"),
    "plant": ("grass", "tree", "bush", "leaves", "flower", "branch", "moss", "straw", "plant-other"),
    "sky": ("clouds", "sky-other"),
    "solid": ("wood", "rock", "stone", "mountain", "hill", "solid-other"),
    "structural": ("fence", "cage", "net", "railing", "structural-other"),
    "water": ("fog", "river", "sea", "waterdrops", "water-other"),
}  # fmt: skip
COCO_STUFF27_CLASSES = tuple(COCO_STUFF27_HIERARCHY)
_COARSE_OF_FINE_NAME = {fine: c for c, fines in enumerate(COCO_STUFF27_HIERARCHY.values()) for fine in fines}
# raw stuffthingmaps fine id -> coarse id (the unused ids and 255 are not in it: ignored)
COCO_STUFF27_IDS = {
    fid: _COARSE_OF_FINE_NAME[name] for fid, name in enumerate(COCO_STUFF_FINE_NAMES) if fid not in COCO_STUFF_UNUSED_IDS
}
# mmsegmentation train id -> coarse id
COCO_STUFF27_TRAIN_IDS = {tid: COCO_STUFF27_IDS[fid] for tid, fid in enumerate(COCO_STUFF_TRAIN_TO_FINE)}

NAMED_LUTS = {
    "cityscapes_label_ids": CITYSCAPES_TRAIN_IDS,
    "coco_object": COCO_OBJECT_IDS,
    "coco_stuff27": COCO_STUFF27_IDS,
    "coco_stuff27_train_ids": COCO_STUFF27_TRAIN_IDS,
}


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
