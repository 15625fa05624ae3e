"""A reader for datasets in the PASCAL VOC layout (real VOC 2012 and the miniature world).

root/JPEGImages/<id>.jpg
root/SegmentationClass/<id>.png      palette PNG, class ids, 255 = ignore
root/ImageSets/Segmentation/<split>.txt
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from stableseg_pp.data.palette import IGNORE_INDEX

log = logging.getLogger(__name__)


class BadInputError(ValueError):
    """An input file cannot be used; the message names it and says what to do."""


@dataclass
class Sample:
    id: str
    pixels: torch.Tensor  # (3, R, R) in [-1, 1]
    image: np.ndarray  # (H, W, 3) uint8, original size
    mask: np.ndarray | None  # (H, W) uint8 class ids, 255 = ignore
    class_ids: list[int]  # classes to prompt for


def read_split_ids(root: Path, split: str) -> list[str]:
    path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.exists():
        raise FileNotFoundError(
            f"split file {path} not found: expected the PASCAL VOC layout (JPEGImages/, SegmentationClass/, "
            "ImageSets/Segmentation/<split>.txt) under data.root; see docs/datasets.md"
        )
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def load_rgb(path: Path, convert: bool = False) -> np.ndarray:
    """Read an RGB image; other modes (RGBA, greyscale, ...) are an error unless ``convert``."""
    if not path.exists():
        raise BadInputError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode != "RGB":
                if not convert:
                    raise BadInputError(
                        f"image {path} is {mode}, not RGB: convert it to RGB, or set data.convert_to_rgb=true "
                        "(alpha is dropped, grey is replicated) or data.on_bad_input=skip"
                    )
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise BadInputError(
            f"image {path} cannot be read ({err}): it is truncated or not an image; "
            "replace or remove it, or set data.on_bad_input=skip"
        ) from err


def load_mask(path: Path, n_classes: int) -> np.ndarray:
    """Read a class-id mask (palette or 'L' PNG) and check its ids."""
    if not path.exists():
        raise BadInputError(
            f"ground-truth mask {path} does not exist: add it, or set data.labels=all and "
            "data.require_masks=false to run without ground truth, or data.on_bad_input=skip"
        )
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise BadInputError(f"mask {path} is {img.mode}: expected a palette ('P') or 'L' PNG of class ids")
            mask = np.asarray(img, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as err:
        raise BadInputError(f"mask {path} cannot be read ({err})") from err
    bad = np.unique(mask[(mask >= n_classes) & (mask != IGNORE_INDEX)])
    if bad.size:
        raise BadInputError(f"mask {path} holds class ids {bad.tolist()} outside 0..{n_classes - 1} (and 255 = ignore)")
    return mask


def to_model_pixels(image: np.ndarray, resolution: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, R, R) float in [-1, 1], bicubic resize."""
    img = Image.fromarray(image).resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


class VOCSegmentation(Dataset):
    """Images (resized for the diffusion model), masks and the classes to prompt for.

    ``labels="oracle"`` prompts for the classes present in the ground truth (the
    papers' setting); ``"all"`` prompts for every class of the dataset.
    With ``on_bad_input="skip"`` an unusable image or mask is logged and the
    item is ``None`` (dropped by :func:`collate_samples`).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        class_names: Sequence[str],
        resolution: int,
        labels: str = "oracle",
        require_masks: bool = True,
        on_bad_input: str = "error",
        convert_to_rgb: bool = False,
        ids: Sequence[str] | None = None,
        image_dir: str = "JPEGImages",
        mask_dir: str = "SegmentationClass",
        image_suffix: str = ".jpg",
        mask_suffix: str = ".png",
    ):
        if labels not in ("oracle", "all"):
            raise ValueError(f"data.labels={labels!r}: use 'oracle' (classes from the ground truth) or 'all'")
        if on_bad_input not in ("error", "skip"):
            raise ValueError(f"data.on_bad_input={on_bad_input!r}: use 'error' or 'skip'")
        if labels == "oracle" and not require_masks:
            raise ValueError("data.labels=oracle takes the classes from the ground truth: it needs require_masks=true")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder {self.root} does not exist; see docs/datasets.md")
        self.split = split
        self.class_names = list(class_names)
        self.resolution = resolution
        self.labels = labels
        self.require_masks = require_masks
        self.on_bad_input = on_bad_input
        self.convert_to_rgb = convert_to_rgb
        self.image_dir, self.mask_dir = self.root / image_dir, self.root / mask_dir
        self.image_suffix, self.mask_suffix = image_suffix, mask_suffix
        self.ids = list(ids) if ids is not None else read_split_ids(self.root, split)
        self.skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, sid: str) -> Path:
        return self.image_dir / f"{sid}{self.image_suffix}"

    def mask_path(self, sid: str) -> Path:
        return self.mask_dir / f"{sid}{self.mask_suffix}"

    def read(self, sid: str) -> Sample:
        image = load_rgb(self.image_path(sid), self.convert_to_rgb)
        mask = None
        mpath = self.mask_path(sid)
        if self.require_masks or mpath.exists():
            mask = load_mask(mpath, len(self.class_names))
            if mask.shape != image.shape[:2]:
                raise BadInputError(
                    f"mask {mpath} is {mask.shape[1]}x{mask.shape[0]} but its image {self.image_path(sid)} is "
                    f"{image.shape[1]}x{image.shape[0]}"
                )
        if self.labels == "oracle":
            class_ids = [int(c) for c in np.unique(mask) if c not in (0, IGNORE_INDEX)]
        else:
            class_ids = list(range(1, len(self.class_names)))
        return Sample(sid, to_model_pixels(image, self.resolution), image, mask, class_ids)

    def __getitem__(self, index: int) -> Sample | None:
        sid = self.ids[index]
        try:
            return self.read(sid)
        except BadInputError as err:
            if self.on_bad_input == "error":
                raise
            log.warning("skipping %s: %s", sid, err)
            self.skipped.append((sid, str(err)))
            return None


def collate_samples(items: list[Sample | None]) -> list[Sample]:
    """Keep samples as a list (images differ in size); drop skipped ones."""
    return [s for s in items if s is not None]
