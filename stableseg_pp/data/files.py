"""Reading images and masks, with errors that name the file and say what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from stableseg_pp.data.labels import LabelMap
from stableseg_pp.data.palette import IGNORE_INDEX


class BadInputError(ValueError):
    """An input file cannot be used; the message names it and says what to do."""


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


def load_mask(path: Path, n_classes: int, label_map: LabelMap | None = None) -> np.ndarray:
    """Read a mask file as class ids (through ``label_map``) and check them against the class range."""
    label_map = label_map or LabelMap()
    if not path.exists():
        raise BadInputError(
            f"ground-truth mask {path} does not exist: add it, or set data.labels=all and "
            "data.require_masks=false to run without ground truth, or data.on_bad_input=skip"
        )
    try:
        with Image.open(path) as img:
            img.load()
            if label_map.channel is not None:
                if img.mode != "RGB":
                    raise BadInputError(f"mask {path} is {img.mode}: this dataset stores its classes in an RGB PNG")
                raw = np.asarray(img, dtype=np.uint8)[..., label_map.channel].copy()
            elif img.mode in ("P", "L"):
                raw = np.asarray(img, dtype=np.uint8).copy()
            else:
                raise BadInputError(f"mask {path} is {img.mode}: expected a palette ('P') or 'L' PNG of class ids")
    except (UnidentifiedImageError, OSError) as err:
        raise BadInputError(f"mask {path} cannot be read ({err})") from err
    mask = label_map.apply(raw)
    bad = np.unique(mask[(mask >= n_classes) & (mask != IGNORE_INDEX)])
    if bad.size:
        raise BadInputError(f"mask {path} holds class ids {bad.tolist()} outside 0..{n_classes - 1} (and 255 = ignore)")
    return mask
