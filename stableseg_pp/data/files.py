"""Reading images and masks, with errors that name the file and say what to do."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from stableseg_pp.data.labels import LabelMap
from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.runtime.errors import UserError

log = logging.getLogger(__name__)


class BadInputError(UserError, ValueError):
    """An input file cannot be used; the message names it and says what to do."""


def image_to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL image as (H, W, 3) uint8 RGB, through its own colour model.

    Greyscale of any bit depth is scaled to 8 bits (16-bit: /257; 32-bit
    integer holding 16-bit values likewise; float in [0, 1]: x255) and
    replicated; palette images go through their palette (transparency
    included, then dropped); CMYK through its ICC profile when it has one,
    else Pillow's conversion; an alpha channel is dropped (the colour values
    are kept as stored, not composited).
    """
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode.startswith("I") or mode == "F":
        values = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0
        elif mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        grey = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "CMYK" and img.info.get("icc_profile"):
        from PIL import ImageCms

        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
            img = ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            log.debug("unusable ICC profile: converting CMYK without it")  # a broken profile is no reason to fail
    elif mode in ("P", "PA"):
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


DATA_HINT = "; replace or remove it, or set data.on_bad_input=skip"
# how the strict mode is turned off, said only when it refused an image
DATA_STRICT_HINT = " (data.convert_to_rgb=true converts it)"


def load_rgb(
    path: Path, convert: bool = True, exif_transpose: bool = False, hint: str = DATA_HINT, strict_hint: str = DATA_STRICT_HINT
) -> np.ndarray:
    """Read an image as RGB: other modes are converted (:func:`image_to_rgb`) unless ``convert`` is False (strict).

    ``exif_transpose``: turn a photograph as its EXIF orientation says (as a viewer shows it).
    ``hint``: what the error message advises (each command names its own options); ``strict_hint``: how to leave the
    strict mode, added when it refused an image.
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"image {path} does not exist{hint}")
    if path.is_dir():
        raise BadInputError(f"image {path} is a folder, not an image file{hint}")
    try:
        with Image.open(path) as img:
            img.load()
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            if img.mode != "RGB":
                if not convert:
                    raise BadInputError(
                        f"image {path} is {img.mode}, not RGB, and strict RGB input was asked for{strict_hint}{hint}"
                    )
                log.debug("converting %s from %s to RGB", path, img.mode)
            return image_to_rgb(img)
    except BadInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise BadInputError(f"image {path} cannot be read ({err}): it is truncated or not an image{hint}") from err
    except ValueError as err:  # a colour mode Pillow cannot turn into RGB (e.g. LAB)
        raise BadInputError(f"image {path} cannot be converted to RGB ({err}): save it as RGB{hint}") from err


def image_size(path: Path, exif_transpose: bool = False) -> tuple[int, int] | None:
    """(width, height) of an image as stored, or (``exif_transpose``) as its EXIF orientation turns it (reads the
    header only); None when unreadable."""
    try:
        with Image.open(path) as img:
            turned = exif_transpose and img.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)
            return (img.size[1], img.size[0]) if turned else img.size
    except (UnidentifiedImageError, OSError, SyntaxError):
        return None


def image_mode(path: Path) -> str | None:
    """The stored colour mode of an image (reads the header only); None when unreadable."""
    try:
        with Image.open(path) as img:
            return img.mode
    except (UnidentifiedImageError, OSError, SyntaxError):
        return None


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
