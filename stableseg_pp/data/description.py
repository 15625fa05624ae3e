"""The dataset of a run, described once: layout, classes, background, palette, protocol, split ids.

``fit`` builds one :class:`DatasetDescription` per run (writing the miniature
world on first use) and passes it to every step, so no step re-derives these
facts from ``cfg.data``.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from stableseg_pp.data.files import image_mode, image_size, load_rgb
from stableseg_pp.data.layouts import DatasetLayout, VOCLayout
from stableseg_pp.data.miniature import write_miniature_voc
from stableseg_pp.data.palette import palette_for
from stableseg_pp.data.prompted_images import PromptedImages
from stableseg_pp.runtime.errors import ConfigError
from stableseg_pp.runtime.hashing import config_hash

log = logging.getLogger(__name__)
# settings of ``cfg.data`` that change how fast images are read, or what happens at a bad file, not what any
# step computes for the images it computes: a run stopped at a bad image resumes its folder with on_bad_input=skip
EXECUTION_KEYS = ("batch_size", "num_workers", "on_bad_input")
# settings of ``cfg.data`` that only change how written masks are scored (``metrics.json``), not any mask: a step
# folder keeps its hash when they change (a finished folder keeps its metrics; ``force=true`` recomputes it)
EVALUATION_KEYS = ("boundary_tolerance", "protocol")
PROTOCOLS = ("supervised", "unsupervised")


def build_layout(data: DictConfig) -> DatasetLayout:
    """``data.layout`` (a ``_target_`` node) at ``data.root``; the VOC layout when none is configured."""
    spec = data.get("layout")
    if spec is None:
        return VOCLayout(data.root)
    return instantiate(spec, root=data.root, _convert_="all")


@dataclass
class DatasetDescription:
    """Everything the steps need to know about the configured dataset.

    Args:
        name: ``data.name``.
        layout: where images and masks are (:mod:`stableseg_pp.data.layouts`).
        class_names: evaluation names; class id = position.
        prompt_names: class name -> word(s) used in prompts.
        background_index: the class that means "no object", or None (Context-59, ADE20K, ...).
        palette: flat RGB palette of the written masks (None: VOC colours).
        eval_background: whether mIoU counts the background class.
        labels: ``oracle`` (classes from the ground truth), ``all`` (every class in every prompt) or ``predicted``
            (the classes a labels step names, no ground truth).
        require_masks / on_bad_input / convert_to_rgb: how images and masks are read.
        limit: first N images of each split (None: all).
        settings: the resolved ``cfg.data`` (class names filled in), for content keys.
        boundary_tolerance: pixels a boundary may be off and still match (boundary F-score).
        evaluation_protocol: ``supervised`` (masks hold class ids) or ``unsupervised`` (masks hold segment ids,
            matched to classes with the Hungarian algorithm over the split).
    """

    name: str
    layout: DatasetLayout
    class_names: list[str]
    prompt_names: dict[str, str]
    background_index: int | None
    palette: list[int] | None
    eval_background: bool
    labels: str
    require_masks: bool
    on_bad_input: str
    convert_to_rgb: bool
    limit: int | None
    settings: dict[str, Any]
    boundary_tolerance: float = 2
    evaluation_protocol: str = "supervised"
    _ids: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _listing: dict[str, str] | None = field(default=None, repr=False)

    @property
    def has_background(self) -> bool:
        return self.background_index is not None

    def split_ids(self, split: str) -> list[str]:
        """Ids of ``split``, cut to ``limit`` (listed once per run)."""
        if split not in self._ids:
            ids = self.layout.split_ids(split)
            self._ids[split] = ids[: self.limit] if self.limit else ids
        return list(self._ids[split])

    def prompt_name(self, class_id: int) -> str:
        name = self.class_names[class_id]
        return self.prompt_names.get(name, name)

    def read_image(self, split: str, sid: str):
        return load_rgb(self.layout.image_path(split, sid), self.convert_to_rgb, exif_transpose=self.layout.exif_transpose)

    def image_side(self, split: str, sample: int = 1000) -> int | None:
        """The median shorter side, in pixels, of the split's images (read from their headers; at most ``sample``
        images, evenly spread); None when none can be read."""
        ids = self.split_ids(split)
        step = max(1, len(ids) // sample)
        sides = [min(size) for sid in ids[::step] if (size := image_size(self.layout.image_path(split, sid)))]
        return int(statistics.median(sides)) if sides else None

    def converted_images(self, split: str, ids: Sequence[str]) -> dict[str, int]:
        """How many of ``ids`` are stored in another mode than RGB (converted when read), by mode."""
        modes = Counter(image_mode(self.layout.image_path(split, sid)) for sid in ids)
        return {str(m): n for m, n in sorted(modes.items(), key=lambda kv: str(kv[0])) if m not in ("RGB", None)}

    def key(self) -> dict[str, Any]:
        """What the dataset contributes to a step's content key (execution and evaluation settings left out)."""
        key = {k: v for k, v in self.settings.items() if k not in EXECUTION_KEYS + EVALUATION_KEYS}
        key["root"] = str(Path(key["root"]).resolve())
        if self.layout.listing_in_key:  # a folder of photos: a photo added, removed or replaced recomputes the steps
            if self._listing is None:  # read once per run, like the split ids (every step's key asks)
                self._listing = {split: self._listing_hash(split) for split in ("train", "val")}
            key["pictures"] = dict(self._listing)
        return key

    def _listing_hash(self, split: str) -> str:
        """A hash of the split's photos: each one's id, file size and modification time."""
        return config_hash([[sid, *_file_state(self.layout.image_path(split, sid))] for sid in self.split_ids(split)])

    def protocol(self, split: str) -> dict:
        """The evaluation setting, written into every metrics file: numbers are comparable only when it matches."""
        bg = self.background_index
        label_map = (self.settings.get("layout") or {}).get("label_map")
        setting = {
            "dataset": self.name,
            "split": self.layout.dataset_split(split),
            "classes": len(self.class_names),
            "background": "none" if bg is None else ("counted" if self.eval_background else "ignored"),
            "labels": self.labels,
            "label_map": label_map or None,
        }
        if self.evaluation_protocol == "unsupervised":
            setting["segments"] = "hungarian"  # masks hold segment ids, matched to classes over the split
        return setting

    def prompted_images(
        self,
        split: str,
        ids: Sequence[str],
        resolution: int,
        predicted: Mapping[str, Sequence[int]] | None = None,
        confidence: Mapping[str, Mapping[int, float]] | None = None,
    ) -> PromptedImages:
        """The images of ``ids`` resized for a diffusion model, with the classes to prompt for (``predicted``: each
        image's classes from a labels step, for ``labels=predicted``; ``confidence``: the labeler's confidence in
        each, where it gives one)."""
        return PromptedImages(
            layout=self.layout,
            split=split,
            class_names=self.class_names,
            resolution=resolution,
            labels=self.labels,
            require_masks=self.require_masks,
            on_bad_input=self.on_bad_input,
            convert_to_rgb=self.convert_to_rgb,
            ids=ids,
            background_index=self.background_index,
            predicted=predicted,
            confidence=confidence,
        )


def check_evaluation_settings(data: DictConfig) -> tuple[float, str]:
    """``data.boundary_tolerance`` (a non-negative number of pixels) and ``data.protocol`` (supervised |
    unsupervised), checked; their defaults when not set."""
    tolerance = data.get("boundary_tolerance", 2)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not 0 <= tolerance < math.inf:
        raise ConfigError(f"data.boundary_tolerance={tolerance}: use a finite non-negative number of pixels (e.g. 2)")
    protocol = data.get("protocol", "supervised")
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"data.protocol={protocol}: use supervised (masks hold class ids) or unsupervised "
            "(masks hold segment ids, Hungarian-matched to classes)"
        )
    return tolerance, str(protocol)


def _file_state(path: Path) -> list[int]:
    """A picture's size and modification time: a replaced photo changes them (without reading every picture)."""
    try:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    except OSError:  # gone since the listing: the step's reader names it
        return [-1, -1]


def check_class_names(names: Sequence[object], background_index: object) -> None:
    """``data.class_names``: at least one class besides the background, each named once, as text."""
    if isinstance(names, str) or not isinstance(names, Sequence):  # a bare word would be split into its letters
        raise ConfigError(
            f"data.class_names={names!r} is not a list: give the background first, then the classes, e.g. "
            "data.class_names=[background,cat,dog]"
        )
    if bad := [n for n in names if not isinstance(n, str) or not n.strip()]:
        raise ConfigError(f"data.class_names={list(names)}: {bad} are not class names; give each class as a word or phrase")
    if len(names) - (background_index is not None) < 1:
        raise ConfigError(
            f"data.class_names={list(names)}: no class to segment; give the background first, then the classes, e.g. "
            "data.class_names=[background,cat,dog]"
        )
    if repeated := sorted({n for n in names if list(names).count(n) > 1}):
        raise ConfigError(f"data.class_names names {repeated} more than once: give each class once")
    if background_index is not None and not (isinstance(background_index, int) and 0 <= background_index < len(names)):
        raise ConfigError(f"data.background_index={background_index}: give the position of the background class in "
                          f"data.class_names (0..{len(names) - 1}), or null for a dataset without one")  # fmt: skip


def describe_dataset(data: DictConfig, splits: Sequence[str] = ("train", "val")) -> DatasetDescription:
    """Check the dataset folder for ``splits`` (writing the miniature world on first use) and describe it."""
    boundary_tolerance, evaluation_protocol = check_evaluation_settings(data)
    root = Path(data.root)
    gen = data.get("generate")
    if gen:
        if not (root / "miniature.json").exists():
            log.info("writing the miniature world to %s", root)
        write_miniature_voc(root, **gen)
    layout = build_layout(data)
    layout.check(list(splits))
    settings = OmegaConf.to_container(data, resolve=True)
    if settings.get("class_names") is None:
        names = layout.class_names()
        if not names:
            raise ConfigError(f"dataset {data.name}: set data.class_names, the background first, e.g. "
                              "\"data.class_names=[background,cat,dog]\" (the dataset has no class list file)")  # fmt: skip
        settings["class_names"] = list(names)
    check_class_names(settings["class_names"], settings.get("background_index", 0))
    prompt_names = dict(settings.get("prompt_names") or {})
    if unknown := sorted(set(prompt_names) - set(settings["class_names"])):
        raise ConfigError(f"data.prompt_names names unknown classes {unknown}; classes: {settings['class_names']}")
    limit = settings.get("limit")
    return DatasetDescription(
        name=str(settings["name"]),
        layout=layout,
        class_names=list(settings["class_names"]),
        prompt_names=prompt_names,
        background_index=settings.get("background_index", 0),
        palette=palette_for(settings.get("palette")),
        eval_background=bool(settings.get("eval_background", True)),
        labels=str(settings.get("labels", "oracle")),
        require_masks=bool(settings.get("require_masks", True)),
        on_bad_input=str(settings.get("on_bad_input", "error")),
        convert_to_rgb=bool(settings.get("convert_to_rgb", True)),  # the same default as data/common.yaml and the readers
        limit=int(limit) if limit else None,
        settings=settings,
        boundary_tolerance=boundary_tolerance,
        evaluation_protocol=evaluation_protocol,
    )
