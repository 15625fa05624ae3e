"""Where a dataset keeps its images and masks on disk, in the layouts users already have.

``VOCLayout``: PASCAL VOC 2012 (with SBD "train-aug") and Pascal Context, as
mmsegmentation documents them, and the miniature world. ``FolderLayout``: one
folder of images and one of masks per split (ADE20K, COCO-Stuff/-Object,
FoodSeg103, UECFoodPix; Cityscapes with its city sub-folders). A layout maps the
pipeline's split names (``train``, ``val``) to the dataset's own, lists the ids
of a split, gives each id's image and mask path, reads a mask as class ids, and
says clearly what it expected when the folder is not what it should be.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from stableseg_pp.data.files import load_mask
from stableseg_pp.data.labels import LabelMap
from stableseg_pp.runtime.errors import UserError


class DatasetLayoutError(UserError, FileNotFoundError):
    """A dataset folder is missing or not in the expected layout; the message says what was expected."""


class DatasetLayout:
    """Base: split names, mask reading and checks; subclasses say where the files are."""

    #: the page of docs/datasets/ on preparing this dataset
    doc = "docs/datasets/README.md"
    #: turn each picture as its EXIF orientation says before use (photographs as a viewer shows them); False for
    #: datasets whose masks were drawn on the pixels as stored
    exif_transpose = False
    #: whether the steps' keys hold the listing of the pictures (ids, file sizes and times): True for a folder whose
    #: pictures are the dataset, where adding or replacing a photo must recompute, not reuse a finished step
    listing_in_key = False

    def __init__(self, root: str | Path, splits: Mapping[str, str] | None = None, label_map: LabelMap | Mapping | None = None,
                 class_file: str | None = None, class_file_background: str | None = None,
                 doc: str | None = None):  # fmt: skip
        self.root = Path(root)
        self.splits = dict(splits or {})
        self.label_map = label_map if isinstance(label_map, LabelMap) else LabelMap(**dict(label_map or {}))
        self.class_file = class_file
        self.class_file_background = class_file_background  # the name of class 0 when the list starts at 1
        if doc:
            self.doc = doc

    def dataset_split(self, split: str) -> str:
        """The dataset's own name of the pipeline's split (e.g. val -> validation)."""
        return self.splits.get(split, split)

    def fail(self, problem: str) -> DatasetLayoutError:
        return DatasetLayoutError(f"{problem}\n  expected:\n{self.describe()}\n  how to prepare it: {self.doc}")

    def describe(self) -> str:
        raise NotImplementedError

    def check(self, splits: list[str]) -> None:
        if not self.root.is_dir():
            raise self.fail(f"dataset folder {self.root} does not exist (set data.root or paths.data_dir)")
        for split in splits:
            if not self.split_ids(split):
                raise self.fail(f"split {split!r} ({self.dataset_split(split)}) of {self.root} has no images")

    def split_ids(self, split: str) -> list[str]:
        raise NotImplementedError

    def image_path(self, split: str, sid: str) -> Path:
        raise NotImplementedError

    def mask_path(self, split: str, sid: str) -> Path:
        raise NotImplementedError

    def read_mask(self, split: str, sid: str, n_classes: int) -> np.ndarray:
        """The ground truth of ``sid`` as class ids (255 = ignore), checked against the class range."""
        return self.read_mask_file(self.mask_path(split, sid), n_classes)

    def read_mask_file(self, path: Path, n_classes: int) -> np.ndarray:
        return load_mask(path, n_classes, self.label_map)

    def has_mask(self, split: str, sid: str) -> bool:
        return self.mask_path(split, sid).exists()

    def class_names(self) -> list[str] | None:
        """Class names from the dataset's own list (``class_file``: "<id> <name>" per line), if it has one."""
        if not self.class_file:
            return None
        path = self.root / self.class_file
        if not path.exists():
            raise self.fail(f"class list {path} not found: add it or set data.class_names")
        entries = []
        for line in path.read_text().splitlines():
            parts = line.strip().split(maxsplit=1)
            if len(parts) == 2 and parts[0].isdigit():
                entries.append((int(parts[0]), parts[1].strip()))
        entries.sort()
        if entries and entries[0][0] == 1 and self.class_file_background:
            entries.insert(0, (0, self.class_file_background))
        if [i for i, _ in entries] != list(range(len(entries))):
            raise self.fail(f"class list {path} must number its classes 0..N-1 (or 1..N), one '<id> <name>' per line")
        return [name for _, name in entries]


class VOCLayout(DatasetLayout):
    """``JPEGImages/<id>.jpg``, ``<mask_dir>/<id>.png``, ``<split_dir>/<split>.txt``.

    The split ``train_aug`` (SBD + VOC train - VOC val, 10,582 images) reads
    ``<split_dir>/aug.txt`` (or ``train_aug.txt``) when present, else every mask of
    ``<aug_mask_dir>`` not in val; an id's mask comes from ``mask_dir`` when it
    has one there, else from ``aug_mask_dir`` (mmsegmentation's ``SegmentationClassAug``).
    """

    doc = "docs/datasets/voc.md"

    def __init__(self, root, image_dir: str = "JPEGImages", mask_dir: str = "SegmentationClass",
                 split_dir: str = "ImageSets/Segmentation", aug_mask_dir: str | None = "SegmentationClassAug",
                 image_suffix: str = ".jpg", mask_suffix: str = ".png", **kwargs):  # fmt: skip
        super().__init__(root, **kwargs)
        self.image_dir, self.mask_dir, self.split_dir = image_dir, mask_dir, split_dir
        self.aug_mask_dir = aug_mask_dir
        self.image_suffix, self.mask_suffix = image_suffix, mask_suffix

    def describe(self) -> str:
        text = (
            f"    {self.root}/{self.image_dir}/<id>{self.image_suffix}\n"
            f"    {self.root}/{self.mask_dir}/<id>{self.mask_suffix}   (class ids, 255 = ignore)\n"
            f"    {self.root}/{self.split_dir}/<split>.txt   (one id per line)"
        )
        if self.aug_mask_dir:
            text += f"\n    for train_aug: {self.root}/{self.aug_mask_dir}/<id>.png and {self.split_dir}/aug.txt"
        return text

    def check(self, splits: list[str]) -> None:
        for sub in (self.image_dir, self.split_dir):
            if self.root.is_dir() and not (self.root / sub).is_dir():
                raise self.fail(f"{self.root} has no {sub}/ folder: this is not the expected layout")
        super().check(splits)

    def split_ids(self, split: str) -> list[str]:
        name = self.dataset_split(split)
        listing = self.root / self.split_dir
        if name == "train_aug":
            for candidate in ("train_aug.txt", "aug.txt"):
                if (listing / candidate).exists():
                    return _read_ids(listing / candidate)
            aug = self.root / (self.aug_mask_dir or "")
            if not self.aug_mask_dir or not aug.is_dir():
                raise self.fail(f"split train_aug needs {listing}/aug.txt or the SBD masks in {aug}/")
            val = set(_read_ids(listing / "val.txt")) if (listing / "val.txt").exists() else set()
            return sorted(p.stem for p in aug.glob(f"*{self.mask_suffix}") if p.stem not in val)
        path = listing / f"{name}.txt"
        if not path.exists():
            raise self.fail(f"split file {path} not found")
        return _read_ids(path)

    def image_path(self, split: str, sid: str) -> Path:
        return self.root / self.image_dir / f"{sid}{self.image_suffix}"

    def mask_path(self, split: str, sid: str) -> Path:
        path = self.root / self.mask_dir / f"{sid}{self.mask_suffix}"
        if not path.exists() and self.aug_mask_dir:
            aug = self.root / self.aug_mask_dir / f"{sid}{self.mask_suffix}"
            if aug.exists():
                return aug
        return path


class FolderLayout(DatasetLayout):
    """``<image_dir>/<id><image_suffix>`` and ``<mask_dir>/<id><mask_suffix>``, ``{split}`` in the folder names.

    The ids of a split are the image files found there (``recursive``: in sub-folders
    too, the id then keeps the sub-folder, e.g. Cityscapes' ``aachen/aachen_000000_000019``).
    ``raw_mask_suffix`` + ``raw_label_map``: masks read through a table when the
    converted ones are missing (Cityscapes' ``labelIds`` -> train ids).
    """

    def __init__(self, root, image_dir: str, mask_dir: str, image_suffix: str = ".jpg", mask_suffix: str = ".png",
                 recursive: bool = False, raw_mask_suffix: str | None = None, raw_label_map: Mapping | None = None,
                 **kwargs):  # fmt: skip
        super().__init__(root, **kwargs)
        self.image_dir, self.mask_dir = image_dir, mask_dir
        self.image_suffix, self.mask_suffix = image_suffix, mask_suffix
        self.recursive = recursive
        self.raw_mask_suffix = raw_mask_suffix
        self.raw_label_map = LabelMap(**dict(raw_label_map or {}))

    def _dir(self, pattern: str, split: str) -> Path:
        return self.root / pattern.format(split=self.dataset_split(split))

    def describe(self) -> str:
        sub = "<sub-folder>/" if self.recursive else ""
        text = (
            f"    {self.root}/{self.image_dir}/{sub}<id>{self.image_suffix}\n"
            f"    {self.root}/{self.mask_dir}/{sub}<id>{self.mask_suffix}   (class ids, 255 = ignore)\n"
            f"    where {{split}} is one of {sorted(set(self.splits.values())) or ['train', 'val']}"
        )
        return text + (f"\n    class list: {self.root}/{self.class_file}" if self.class_file else "")

    def check(self, splits: list[str]) -> None:
        for split in splits:
            if self.root.is_dir() and not self._dir(self.image_dir, split).is_dir():
                raise self.fail(f"{self._dir(self.image_dir, split)} does not exist: this is not the expected layout")
        super().check(splits)

    def split_ids(self, split: str) -> list[str]:
        folder = self._dir(self.image_dir, split)
        if not folder.is_dir():
            raise self.fail(f"image folder {folder} not found")
        files = folder.rglob(f"*{self.image_suffix}") if self.recursive else folder.glob(f"*{self.image_suffix}")
        return sorted(p.relative_to(folder).as_posix()[: -len(self.image_suffix)] for p in files)

    def image_path(self, split: str, sid: str) -> Path:
        return self._dir(self.image_dir, split) / f"{sid}{self.image_suffix}"

    def mask_path(self, split: str, sid: str) -> Path:
        path = self._dir(self.mask_dir, split) / f"{sid}{self.mask_suffix}"
        if not path.exists() and self.raw_mask_suffix:
            raw = self._dir(self.mask_dir, split) / f"{sid}{self.raw_mask_suffix}"
            if raw.exists():
                return raw
        return path

    def read_mask_file(self, path: Path, n_classes: int) -> np.ndarray:
        raw = self.raw_mask_suffix is not None and path.name.endswith(self.raw_mask_suffix)
        return load_mask(path, n_classes, self.raw_label_map if raw else self.label_map)


def _read_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


#: the picture formats a folder of photos is searched for (case-insensitive)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def find_images(folder: Path) -> dict[str, Path]:
    """Every picture under ``folder`` (sub-folders too, hidden ones skipped) by id: its path below ``folder`` without
    the suffix. Two files with one id (``a.jpg`` and ``a.png``) are an error naming both."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.suffix.lower() not in IMAGE_SUFFIXES or any(p.startswith(".") for p in rel.parts) or not path.is_file():
            continue
        sid = rel.with_suffix("").as_posix()
        if sid in found:
            raise DatasetLayoutError(f"{found[sid]} and {path} have the same name but for the suffix: rename one")
        found[sid] = path
    return found


class ImageFolderLayout(DatasetLayout):
    """A folder of photos and nothing else (``data=images``): every picture under ``root``, in sub-folders too, in
    any common format; no masks.

    The val split is ``val_images`` (a folder of pictures, ``val_masks`` their
    ground truth as ``<id>.png`` class ids to get a score) or, without it, every
    ``val_every``-th picture of the folder held out (no masks: nothing is scored).

    Args:
        root: the folder of photos.
        val_images: a folder of val pictures (default: held out from ``root``).
        val_masks: their masks, ``<id>.png`` (class ids, 255 = ignore), ids as in ``val_images``.
        val_every: without ``val_images``, every n-th picture (in name order) is val, at least one.
        exif_transpose: turn each photo as its EXIF orientation says, as ``predict`` does (false: as stored).
    """

    doc = "docs/guide.md"
    listing_in_key = True

    def __init__(self, root, val_images: str | None = None, val_masks: str | None = None, val_every: int = 10,
                 exif_transpose: bool = True, **kwargs):  # fmt: skip
        super().__init__(Path(root).expanduser(), **kwargs)
        if not isinstance(exif_transpose, bool):
            raise DatasetLayoutError(f"data.layout.exif_transpose={exif_transpose!r}: use true or false")
        self.exif_transpose = exif_transpose  # a phone stores a portrait photo sideways and says so in its EXIF
        if isinstance(val_every, bool) or not isinstance(val_every, int) or val_every < 2:
            raise DatasetLayoutError(f"data.layout.val_every={val_every}: give a whole number >= 2 (every n-th picture is val)")
        if val_masks and not val_images:
            raise DatasetLayoutError("data.layout.val_masks needs data.layout.val_images: the pictures the masks belong to")
        self.val_images = Path(val_images).expanduser() if val_images else None
        self.val_masks = Path(val_masks).expanduser() if val_masks else None
        self.val_every = val_every
        self._index: dict[str, dict[str, Path]] | None = None

    def describe(self) -> str:
        text = f"    {self.root}/**/<id>{{{','.join(IMAGE_SUFFIXES)}}}   (any folder of pictures, no masks)"
        if self.val_images:
            text += f"\n    val: {self.val_images}/**/<id>.<suffix>"
            text += f", masks {self.val_masks}/<id>.png (class ids, 255 = ignore)" if self.val_masks else ""
        return text

    def _splits(self) -> dict[str, dict[str, Path]]:
        if self._index is None:
            if not self.root.is_dir():
                raise self.fail(f"picture folder {self.root} does not exist (set data.root to your folder of photos)")
            pictures = find_images(self.root)
            if self.val_images is not None:
                if not self.val_images.is_dir():
                    raise self.fail(f"data.layout.val_images={self.val_images} is not a folder")
                val = find_images(self.val_images)
                train = pictures
            else:
                held = set(list(pictures)[:: self.val_every])
                val = {sid: p for sid, p in pictures.items() if sid in held}
                train = {sid: p for sid, p in pictures.items() if sid not in held}
            self._index = {"train": train, "val": val}
        return self._index

    def check(self, splits: list[str]) -> None:
        index = self._splits()
        if len(index["train"]) + len(index["val"]) == 0:
            raise self.fail(f"{self.root} holds no pictures ({', '.join(IMAGE_SUFFIXES)})")
        super().check(splits)

    def split_ids(self, split: str) -> list[str]:
        index = self._splits()
        if split not in index:
            raise self.fail(f"split {split!r}: a folder of photos has train and val")
        return list(index[split])

    def image_path(self, split: str, sid: str) -> Path:
        return self._splits()[split][sid]

    def mask_path(self, split: str, sid: str) -> Path:
        if split == "val" and self.val_masks is not None:
            return self.val_masks / f"{sid}.png"
        return self.root / ".no-masks" / f"{sid}.png"  # photos have no ground truth: a path that never exists
