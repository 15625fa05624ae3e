"""A split's images resized for a diffusion model, their ground truth, and the classes to prompt for.

Reads any dataset through its :class:`~stableseg_pp.data.layouts.DatasetLayout`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from stableseg_pp.data.files import BadInputError, load_rgb
from stableseg_pp.data.layouts import DatasetLayout
from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.runtime.errors import ConfigError

# where stage 0's prompts take each image's classes from (data.labels)
LABELS = ("oracle", "all", "predicted")

log = logging.getLogger(__name__)


@dataclass
class Sample:
    id: str
    pixels: torch.Tensor  # (3, R, R) in [-1, 1]
    image: np.ndarray  # (H, W, 3) uint8, original size
    mask: np.ndarray | None  # (H, W) uint8 class ids, 255 = ignore
    class_ids: list[int]  # classes to prompt for
    class_weights: list[float] | None = None  # the labeler's confidence in each of them (None: all alike)

    def pin_memory(self) -> Sample:
        """The DataLoader's ``pin_memory=True`` pins the pixels (page-locked: a non-blocking copy to the GPU)."""
        return Sample(self.id, self.pixels.pin_memory(), self.image, self.mask, self.class_ids, self.class_weights)


def to_model_pixels(image: np.ndarray, resolution: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, R, R) float in [-1, 1], bicubic resize."""
    img = Image.fromarray(image).resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


class PromptedImages(Dataset):
    """One split of a dataset as stage 0 reads it.

    ``labels="oracle"`` prompts for the classes present in the ground truth (the
    papers' setting); ``"all"`` prompts for every class of the dataset;
    ``"predicted"`` for the classes ``predicted`` names for each image (a labels
    step's output, no ground truth; an image it names nothing for gets none).
    ``background_index``: the class that means "no object" (never prompted for);
    None for datasets without one (Context-59, ADE20K, Cityscapes, COCO-Stuff).
    With ``on_bad_input="skip"`` an unusable image or mask is logged and the
    item is ``None`` (dropped by :func:`collate_samples`).
    """

    def __init__(
        self,
        layout: DatasetLayout,
        split: str,
        class_names: Sequence[str],
        resolution: int,
        labels: str = "oracle",
        require_masks: bool = True,
        on_bad_input: str = "error",
        convert_to_rgb: bool = True,
        ids: Sequence[str] | None = None,
        background_index: int | None = 0,
        predicted: Mapping[str, Sequence[int]] | None = None,
        confidence: Mapping[str, Mapping[int, float]] | None = None,
    ):
        if labels not in LABELS:
            raise ConfigError(f"data.labels={labels!r}: use one of {', '.join(LABELS)}")
        if labels == "predicted" and predicted is None:
            raise ValueError("data.labels=predicted: the predicted classes of each image are needed (a labels step)")
        if on_bad_input not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_input={on_bad_input!r}: use 'error' or 'skip'")
        if labels == "oracle" and not require_masks:
            raise ConfigError("data.labels=oracle takes the classes from the ground truth: it needs require_masks=true")
        self.layout = layout
        self.split = split
        self.class_names = list(class_names)
        self.resolution = resolution
        self.labels = labels
        self.require_masks = require_masks
        self.on_bad_input = on_bad_input
        self.convert_to_rgb = convert_to_rgb
        self.background_index = background_index
        self.predicted = predicted
        self.confidence = confidence
        self.ids = list(ids) if ids is not None else layout.split_ids(split)
        self.skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, sid: str) -> Sample:
        image_path = self.layout.image_path(self.split, sid)
        image = load_rgb(image_path, self.convert_to_rgb, exif_transpose=self.layout.exif_transpose)
        mask = None
        if self.require_masks or self.layout.has_mask(self.split, sid):
            mask = self.layout.read_mask(self.split, sid, len(self.class_names))
            if mask.shape != image.shape[:2]:
                raise BadInputError(
                    f"mask {self.layout.mask_path(self.split, sid)} is {mask.shape[1]}x{mask.shape[0]} but its image "
                    f"{image_path} is {image.shape[1]}x{image.shape[0]}"
                )
        not_prompted = {self.background_index, IGNORE_INDEX}
        if self.labels == "oracle":
            class_ids = [int(c) for c in np.unique(mask) if c not in not_prompted]
        elif self.labels == "predicted":
            class_ids = [int(c) for c in self.predicted.get(sid, ()) if c not in not_prompted]
        else:
            class_ids = [c for c in range(len(self.class_names)) if c not in not_prompted]
        weights = None
        if self.labels == "predicted" and self.confidence is not None and sid in self.confidence:
            weights = [float(self.confidence[sid].get(c, 1.0)) for c in class_ids]
        return Sample(sid, to_model_pixels(image, self.resolution), image, mask, class_ids, weights)

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
