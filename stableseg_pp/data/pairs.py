"""Image / mask pairs for training a segmenter on pseudo-masks (and validating on ground truth).

Augmentation (training): random scale, random crop (padded with ignore 255),
horizontal flip — applied jointly to image and mask with torchvision's v2
transforms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from stableseg_pp.data.files import BadInputError, image_size, load_mask, load_rgb
from stableseg_pp.data.palette import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(crop_size: int, scale: tuple[float, float] = (0.5, 2.0), base_size: int | None = None) -> v2.Compose:
    """Random scale of the shorter side around ``base_size`` (or the crop size), crop and flip."""
    base = base_size or crop_size
    return v2.Compose(
        [
            v2.RandomResize(int(base * scale[0]), int(base * scale[1]) + 1),
            v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
            v2.RandomHorizontalFlip(),
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(size: int | None = None) -> v2.Compose:
    """Normalise; optionally resize (masks by nearest neighbour)."""
    steps = [v2.Resize((size, size))] if size else []
    return v2.Compose(
        [
            *steps,
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ImageMaskPairs(Dataset):
    """(image, mask) pairs; masks are checked against their image and the class range.

    ``read_mask``: how to read a mask file as class ids (a dataset's ground truth goes
    through its layout's label map); default: a palette PNG of class ids.
    ``exif_transpose``: turn each picture as its EXIF orientation says (the dataset layout's setting).
    """

    def __init__(
        self,
        image_paths: Sequence[Path],
        mask_paths: Sequence[Path] | None,
        n_classes: int,
        transform: v2.Compose,
        convert_to_rgb: bool = True,
        read_mask: Callable[[Path], np.ndarray] | None = None,
        exif_transpose: bool = False,
    ):
        if mask_paths is not None and len(mask_paths) != len(image_paths):
            raise ValueError(f"{len(image_paths)} images but {len(mask_paths)} masks")
        self.image_paths = list(image_paths)
        self.mask_paths = list(mask_paths) if mask_paths is not None else None
        self.n_classes = n_classes
        self.transform = transform
        self.convert_to_rgb = convert_to_rgb
        self.read_mask = read_mask or partial(load_mask, n_classes=n_classes)
        self.exif_transpose = exif_transpose

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int):
        img_path = self.image_paths[i]
        image = load_rgb(Path(img_path), self.convert_to_rgb, exif_transpose=self.exif_transpose)
        img = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        if self.mask_paths is None:
            return self.transform(img), i
        mask_path = self.mask_paths[i]
        mask = self.read_mask(Path(mask_path))
        if mask.shape != image.shape[:2]:
            raise BadInputError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {img_path} is "
                f"{image.shape[1]}x{image.shape[0]}: regenerate the pseudo-masks for this dataset"
            )
        img, m = self.transform(img, tv_tensors.Mask(torch.from_numpy(mask)))
        return img, m


def evaluation_batch_size(items: ImageMaskPairs, batch_size: int) -> int:
    """``batch_size`` where every picture has one size; 1 where sizes differ (a folder of photos). Each picture is
    predicted whole at its own size: pictures of different sizes cannot be stacked, and padding them to one would
    make a picture's prediction depend on its batch. (One picture per batch keeps Lightning's sharding of the
    pictures over DDP ranks as it is.)"""
    sizes = {image_size(p, items.exif_transpose) for p in items.image_paths}
    return batch_size if len(sizes) <= 1 else 1
