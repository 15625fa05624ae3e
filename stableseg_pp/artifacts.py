"""The artifacts steps hand each other: one home for their format on disk.

* :class:`ChannelClasses`: the one mapping between a prediction's channels
  (0 = "no prompted class", c = the c-th prompted class) and dataset class ids;
* :class:`MaskSetLayout`: where a split's masks, stored maps and overlays live;
* :class:`MaskRecord`: stage 0's result for one image (mask, per-site class
  maps, scores), written by :class:`MaskSetWriter` and read back by
  :func:`load_stored_maps`;
* :class:`SegmenterMaskWriter`: DeepLabV3+ predictions (mask + confidence);
* :class:`SiteWeights`: learned attention-map weights (``weights.json``).

Every file is written atomically; a mask is written last, so a mask means its
image is done.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from stableseg_pp.data.files import BadInputError, load_rgb
from stableseg_pp.data.layouts import IMAGE_SUFFIXES, find_images
from stableseg_pp.data.palette import IGNORE_INDEX, save_palette_png
from stableseg_pp.pictures import overlay_png
from stableseg_pp.runtime.atomic import atomic_save, atomic_write_bytes, atomic_write_text, write_json
from stableseg_pp.runtime.errors import ConfigError, UserError, one_line
from stableseg_pp.runtime.transfer import HostBatch

log = logging.getLogger(__name__)

__all__ = [
    "ChannelClasses",
    "MaskSetLayout",
    "Pictures",
    "SegmenterMaskWriter",
    "SiteWeights",
    "MaskBatch",
    "MaskImage",
    "MaskRecord",
    "MaskSetWriter",
    "StoredMaps",
    "check_legend",
    "check_output_folder",
    "check_pictures",
    "load_stored_maps",
    "overlay_png",
    "unique_stems",
    "write_picture_masks",
]


@dataclass(frozen=True)
class ChannelClasses:
    """Which dataset class each channel of one image's prediction stands for.

    Args:
        class_ids: dataset ids of the prompted classes, channel c + 1 = ``class_ids[c]``.
        background_index: the dataset's background class, or None when it has none.
    """

    class_ids: tuple[int, ...]
    background_index: int | None

    @property
    def empty_label(self) -> int:
        """What channel 0 ("none of the prompted classes") becomes: the background class, or ignore."""
        return IGNORE_INDEX if self.background_index is None else self.background_index

    def channel_to_class(self) -> np.ndarray:
        """(1 + C,) uint8 lookup table: channel -> dataset class id."""
        return np.array([self.empty_label, *self.class_ids], dtype=np.uint8)

    def class_to_channel(self) -> np.ndarray:
        """(256,) uint8 lookup table: dataset class id -> channel; 255 for classes this image's channels cannot express.

        The background class maps to channel 0 only when the dataset has one: on a
        dataset without background, class 0 is a real class and, when it was not
        prompted, no channel stands for it.
        """
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        if self.background_index is not None:
            lut[self.background_index] = 0
        for c, cid in enumerate(self.class_ids):
            lut[cid] = c + 1
        return lut

    def to_classes(self, channels: np.ndarray) -> np.ndarray:
        """Channel indices (255 = ignore kept) -> dataset class ids."""
        lut = self.channel_to_class()
        out = lut[np.minimum(channels, len(lut) - 1)]
        return np.where(channels == IGNORE_INDEX, IGNORE_INDEX, out).astype(np.uint8)

    def to_channels(self, classes: np.ndarray) -> np.ndarray:
        """Dataset class ids -> channel indices (255 where no channel stands for the class)."""
        return self.class_to_channel()[classes]


class MaskSetLayout:
    """Where a split's masks, stored maps, confidences, class peaks and overlays live:
    ``<root>/{masks,maps,confidence,class_peaks,overlays}``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.masks = self.root / "masks"
        self.maps = self.root / "maps"
        self.overlays = self.root / "overlays"
        self.confidence = self.root / "confidence"
        self.class_peaks = self.root / "class_peaks"

    def mask_path(self, sid: str) -> Path:
        return self.masks / f"{sid}.png"

    def maps_path(self, sid: str) -> Path:
        return self.maps / f"{sid}.npz"

    def overlay_path(self, sid: str) -> Path:
        return self.overlays / f"{sid}.png"

    def confidence_path(self, sid: str) -> Path:
        return self.confidence / f"{sid}.png"

    def class_peaks_path(self, sid: str) -> Path:
        return self.class_peaks / f"{sid}.json"

    def read_class_peaks(self, sid: str) -> list[float]:
        """A segmenter's peak probability of each class (class id -> value) in one image."""
        path = self.class_peaks_path(sid)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: the DeepLabV3+ step {self.root.parent.name} predates class peaks; delete that "
                "folder and run the same command again"
            )
        return [float(v) for v in json.loads(path.read_text())]

    def is_done(self, sid: str) -> bool:
        """Maps are written before the mask, so a mask means both are complete."""
        return self.mask_path(sid).exists()

    def record_ranks(self, rank: int, ids: Sequence[str]) -> None:
        """Append the ids this rank wrote to ``ranks/rank<r>.txt`` (how the images were sharded)."""
        record = self.root / "ranks" / f"rank{rank}.txt"
        before = record.read_text() if record.exists() else ""
        atomic_write_text(record, before + "".join(f"{i}\n" for i in ids))


@dataclass
class MaskRecord:
    """One image's pseudo-mask with what it was made from (stage 0's, or EmerDiff's).

    Args:
        id: the image id.
        mask: (H, W) uint8 dataset class ids.
        channels: which class each channel stands for.
        family: the backbone family whose sites key ``site_maps``.
        site_maps: site id -> (C, h, w) float16 class maps.
        scores: (1 + C, h, w) float16 final class scores at the latent resolution (for the CRF); None with no class.
        image / ground_truth: for the overlay (the original image and its mask, if any).
    """

    id: str
    mask: np.ndarray
    channels: ChannelClasses
    family: str
    site_maps: dict[str, np.ndarray]
    scores: np.ndarray | None
    image: np.ndarray
    ground_truth: np.ndarray | None = None


@dataclass
class MaskImage:
    """What a mask record needs besides the arrays: the image's id, classes, and (for the overlay) pixels."""

    id: str
    channels: ChannelClasses
    image: np.ndarray
    ground_truth: np.ndarray | None


@dataclass
class MaskBatch:
    """One batch's mask records, packed: every array in one host buffer (:class:`HostBatch`, copied from the
    device in one transfer that may still be in flight), turned into :class:`MaskRecord` objects by the writer.

    ``host`` holds ``mask/<i>`` ((H, W) uint8 class ids), ``map/<site>`` ((B, K, h, w) float16, one row per image with
    classes) and ``scores`` ((B, 1 + K, h, w) float16); ``rows[i]`` is image i's row in them (None: no class).
    """

    images: list[MaskImage]
    rows: list[int | None]
    family: str
    host: HostBatch | None

    def records(self) -> list[MaskRecord]:
        arrays = self.host.arrays() if self.host is not None else {}
        maps = {k[len("map/") :]: v for k, v in arrays.items() if k.startswith("map/")}
        records = []
        for i, (image, row) in enumerate(zip(self.images, self.rows, strict=True)):
            if row is None:  # nothing to look for: all background
                mask = np.full(image.image.shape[:2], image.channels.empty_label, dtype=np.uint8)
                records.append(MaskRecord(image.id, mask, image.channels, self.family, {}, None, image.image, image.ground_truth))
                continue
            n = len(image.channels.class_ids)
            site_maps = {k: v[row, :n] for k, v in maps.items()}
            scores = arrays["scores"][row, : n + 1]
            records.append(MaskRecord(image.id, arrays[f"mask/{i}"], image.channels, self.family, site_maps, scores,
                                        image.image, image.ground_truth))  # fmt: skip
        return records


@dataclass
class StoredMaps:
    """What :class:`MaskSetWriter` stored for one image."""

    class_ids: list[int]  # dataset ids of channels 1.. (channel 0 = no prompted class)
    family: str | None  # backbone family of the site ids (None: written before families were recorded)
    site_maps: dict[str, np.ndarray]  # site id -> (C, h, w)
    scores: np.ndarray | None  # (1 + C, h, w) final scores at the latent resolution


def stage0_maps_bytes(record: MaskRecord) -> bytes:
    buf = io.BytesIO()
    arrays = {f"map/{k}": v for k, v in record.site_maps.items()}
    if record.scores is not None:
        arrays["scores"] = record.scores
    np.savez_compressed(
        buf, class_ids=np.array(record.channels.class_ids, dtype=np.int64), family=np.array(record.family), **arrays
    )
    return buf.getvalue()


def load_stored_maps(path: str | Path) -> StoredMaps:
    """Read back what :class:`MaskSetWriter` stored for one image."""
    with np.load(path) as data:
        maps = {k[len("map/") :]: data[k] for k in data.files if k.startswith("map/")}
        scores = data["scores"] if "scores" in data.files else None
        family = str(data["family"]) if "family" in data.files else None
        return StoredMaps(data["class_ids"].tolist(), family, maps, scores)


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """A distinct output name per input: its file stem, with as many parent folders as it takes to tell
    same-named inputs apart (``a/photo.jpg``, ``b/photo.jpg`` -> ``a_photo``, ``b_photo``)."""
    resolved = [p.resolve() for p in paths]
    stems = [p.stem for p in resolved]
    for depth in range(1, max(len(p.parts) for p in resolved) + 1):
        clashes = {s for s in stems if stems.count(s) > 1}
        if not clashes:
            break
        stems = [
            "_".join([*p.parent.parts[-depth:], p.stem]).lstrip("/_") if stem in clashes else stem
            for p, stem in zip(resolved, stems, strict=True)
        ]
    seen: dict[str, int] = {}
    unique = []
    for stem in stems:  # the same file given twice
        seen[stem] = seen.get(stem, 0) + 1
        unique.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return unique


LEGEND = "classes.json"
# what segment and predict advise about a picture they cannot use (their own options, not fit's config keys)
PICTURE_HINT = "; replace it, or leave it out of the command"
PICTURE_STRICT_HINT = " (--strict refuses images that are not RGB; without it they are converted)"


def check_output_folder(out: Path, option: str = "--out") -> None:
    """The folder of a picture command's masks, before any model loads: not a file, and writable (it is created
    when the first mask is written)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file, not a folder: give a folder for the masks (a new one, or one this "
                        "command wrote before)")  # fmt: skip
    existing = next(p for p in (out.resolve(), *out.resolve().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {out}: cannot write there ({existing} is not a writable folder); give another folder")


def check_legend(out: Path, legend: Mapping[int, str], option: str = "--out") -> None:
    """A folder holds the masks of one class list: its ``classes.json`` must say what this run's masks mean."""
    path = out / LEGEND
    if not path.exists():
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        before = None
    if before != {str(k): v for k, v in legend.items()}:
        held = ", ".join(map(str, before.values())) if isinstance(before, dict) else "unknown (unreadable legend)"
        raise UserError(
            f"{option} {out} holds masks of the classes {held} ({path}), not {', '.join(legend.values())}: give "
            "another folder, or remove that one to start again"
        )


@dataclass
class Pictures:
    """The inputs of a picture command, each read once before any model loads.

    Args:
        usable: (path, output stem) of every input that reads as a picture.
        problems: one line per input that cannot be used.
        total: how many inputs were given.
        strict: refuse pictures that are not RGB instead of converting them (``--strict``).
    """

    usable: list[tuple[Path, str]]
    problems: list[str]
    total: int
    strict: bool = False

    def read(self, path: Path) -> np.ndarray:
        """A picture as RGB, turned as its EXIF orientation says (as a viewer shows it)."""
        return load_rgb(path, not self.strict, exif_transpose=True, hint=PICTURE_HINT, strict_hint=PICTURE_STRICT_HINT)


def check_pictures(images: Sequence[Path], strict: bool = False) -> Pictures:
    """Read every input (missing files, truncated or non-image files found now, not after the model has loaded); a
    folder stands for every picture in it and its sub-folders; none usable is a ``UserError`` before anything is
    written."""
    expanded: list[Path] = []
    problems = []
    for path in map(Path, images):
        if not path.is_dir():
            expanded.append(path)
        elif found := list(find_images(path).values()):
            expanded += found
        else:
            problems.append(f"{path}: a folder with no pictures ({', '.join(IMAGE_SUFFIXES)}) in it or below")
    images = expanded
    pictures = Pictures([], problems, len(images) + len(problems), strict)
    for path, stem in zip(images, unique_stems(images) if images else [], strict=True):
        try:
            pictures.read(path)
        except BadInputError as err:
            pictures.problems.append(one_line(err))
            continue
        pictures.usable.append((path, stem))
    if not pictures.usable:
        raise UserError(f"none of the {pictures.total} inputs can be used, nothing was written: {' | '.join(pictures.problems)}")
    return pictures


def write_picture_masks(
    pictures: Pictures,
    out: Path,
    legend: Mapping[int, str],
    predict: Callable[[np.ndarray], np.ndarray],
) -> list[Path]:
    """Masks of single pictures (``segment``, ``predict``): ``<name>_mask.png`` + ``<name>_overlay.png`` per picture
    and the legend ``classes.json``, written just before the first mask (a mask is never without it, and a run that
    writes no mask writes no legend); EXIF orientation applied. Every usable picture is done; the unusable ones
    (:func:`check_pictures`) end it with one ``UserError``."""
    check_legend(out, legend)
    written, unreadable = [], list(pictures.problems)
    for err in unreadable:
        log.error("%s", err)
    for path, stem in pictures.usable:
        try:
            image = pictures.read(path)
        except BadInputError as err:  # changed since it was checked
            log.error("%s", one_line(err))
            unreadable.append(one_line(err))
            continue
        mask = predict(image)
        if not written:
            atomic_write_text(out / LEGEND, json.dumps({str(k): v for k, v in legend.items()}, indent=2))
        written.append(atomic_save(out / f"{stem}_mask.png", lambda t, m=mask: save_palette_png(m, t)))
        overlay = overlay_png(image, mask, None, class_names=legend)
        atomic_save(out / f"{stem}_overlay.png", lambda t, im=overlay: im.save(t, format="PNG"))
        areas = {name: float((mask == k).mean()) for k, name in legend.items() if k}
        log.info("%s -> %s: %s", path, written[-1].name, ", ".join(f"{n} {v:.1%}" for n, v in areas.items()))
    if unreadable:
        raise UserError(
            f"{len(unreadable)} of {pictures.total} images could not be used; the other {len(written)} were done "
            f"into {out}: {' | '.join(unreadable)}"
        )
    return written


class MaskSetWriter(BasePredictionWriter):
    """Writes a mask set (stage 0's, EmerDiff's): each image's stored maps (float16 npz), then its palette PNG mask,
    atomically, off the main thread.

    ``layouts[i]`` is where the predictions of dataloader ``i`` go. A bounded pool of
    ``threads`` writer threads encodes and writes the batches (zlib and PNG encoding
    release the GIL), so the next batch's forward overlaps the previous batch's
    writes; at most ``threads + 2`` batches wait, after which the predict loop
    waits for the writers (memory stays bounded). A writer error stops the run
    with that error once the writes in flight have finished (never a silent loss);
    ``threads=0`` writes on the main thread. At the end each rank appends the ids
    it wrote to ``<split>/ranks/rank<r>.txt``: a record of how the images were
    sharded (and a check that none was done twice).
    """

    def __init__(
        self,
        layouts: Sequence[MaskSetLayout],
        overlay_ids: Iterable[str] = (),
        palette: list[int] | None = None,
        background_index: int | None = 0,
        threads: int = 4,
        class_names: Sequence[str] | None = None,
    ):
        super().__init__(write_interval="batch")
        self.layouts = list(layouts)
        self.overlay_ids = set(overlay_ids)
        self.palette = palette
        self.background_index = background_index
        self.class_names = list(class_names) if class_names is not None else None
        self.written_ids: list[list[str]] = [[] for _ in self.layouts]
        self.threads = int(threads)
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(self.threads + 2) if self.threads else None
        self._pending: list[Future] = []

    @property
    def written(self) -> int:
        return sum(len(ids) for ids in self.written_ids)

    def write_record(self, record: MaskRecord, layout: MaskSetLayout) -> None:
        atomic_write_bytes(layout.maps_path(record.id), stage0_maps_bytes(record))
        if record.id in self.overlay_ids:
            img = overlay_png(
                record.image, record.mask, record.ground_truth, palette=self.palette,
                background_index=self.background_index, class_names=self.class_names, mask_title="pseudo-masks",
            )  # fmt: skip
            atomic_save(layout.overlay_path(record.id), lambda t, im=img: im.save(t, format="PNG"))
        atomic_save(layout.mask_path(record.id), lambda t: save_palette_png(record.mask, t, self.palette))

    def _write_batch(self, prediction: MaskBatch | Sequence[MaskRecord], dataloader_idx: int) -> None:
        records = prediction.records() if isinstance(prediction, MaskBatch) else prediction
        for record in records:
            self.write_record(record, self.layouts[dataloader_idx])
            self.written_ids[dataloader_idx].append(record.id)

    def _raise_first_error(self, wait: bool) -> None:
        """Forget finished writes; re-raise the first error among them (``wait``: after every write has finished)."""
        if wait:
            for future in self._pending:
                future.exception()  # waits
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            if future.exception() is not None:
                self._drain()
                raise future.exception()

    def _drain(self) -> None:
        """Let the writes in flight finish (each is atomic); stop the pool."""
        for future in self._pending:
            future.exception()
        self._pending = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if not self.threads:
            self._write_batch(prediction, dataloader_idx)
            return
        self._raise_first_error(wait=False)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="stage0-writer")
        self._slots.acquire()  # bounded: waits while threads + 2 batches are queued
        future = self._pool.submit(self._write_batch, prediction, dataloader_idx)
        future.add_done_callback(lambda _: self._slots.release())
        self._pending.append(future)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._raise_first_error(wait=True)
        self._drain()
        for layout, ids in zip(self.layouts, self.written_ids, strict=True):
            layout.record_ranks(trainer.global_rank, ids)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._drain()  # the run stops: the writes in flight still finish (atomically), nothing new starts


class SegmenterMaskWriter(BasePredictionWriter):
    """Writes a segmenter's predicted class (palette PNG), its confidence (8-bit PNG) and each class's peak
    probability over the image (JSON list by class id: how sure the segmenter is that the class is anywhere in it,
    the segmenter labeler's evidence) per image, atomically; the mask last, so a mask means all three are there.

    ``prediction`` of a batch: (probabilities (B, K, H, W), dataset indices (B,)).
    """

    def __init__(self, layout: MaskSetLayout, ids: list[str], palette: list[int] | None = None):
        super().__init__(write_interval="batch")
        self.layout = layout
        self.ids = ids
        self.palette = palette

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        import torch

        probs, index = prediction
        conf, labels = probs.max(1)
        peaks = probs.flatten(2).amax(2).float().cpu().tolist()
        for j, i in enumerate(index.tolist()):
            sid = self.ids[i]
            write_json(self.layout.class_peaks_path(sid), [round(v, 6) for v in peaks[j]])
            c = (conf[j].float().cpu().numpy() * 255).round().astype(np.uint8)
            atomic_save(self.layout.confidence_path(sid), lambda t, a=c: Image.fromarray(a).save(t, format="PNG"))
            m = labels[j].to(torch.uint8).cpu().numpy()
            atomic_save(self.layout.mask_path(sid), lambda t, a=m: save_palette_png(a, t, self.palette))


@dataclass(frozen=True)
class SiteWeights:
    """Learned attention-map weights: one per site of one backbone family (``weights.json``).

    Args:
        family: the backbone family whose site ids these are.
        weights: site id -> weight (positive, summing to 1).
    """

    family: str
    weights: Mapping[str, float]

    FILE = "weights.json"

    def save(self, folder: str | Path) -> Path:
        return write_json(Path(folder) / self.FILE, {"family": self.family, "sites": dict(self.weights)})

    @classmethod
    def load(cls, path: str | Path) -> SiteWeights:
        """From a ``weights.json`` file or the folder holding it; a clear error for anything else."""
        path = Path(path)
        if path.is_dir():
            path = path / cls.FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"site weights {path}: cannot be read ({err}); give a weights.json of a weights step") from err
        if not isinstance(data, dict) or "family" not in data or not isinstance(data.get("sites"), dict):
            raise ConfigError(f"site weights {path}: not a weights file (expected keys 'family' and 'sites')")
        return cls(family=str(data["family"]), weights={str(k): float(v) for k, v in data["sites"].items()})

    def check_family(self, family: str) -> None:
        """Weights learned on another backbone family are a clear error (their site ids mean nothing here)."""
        if family != self.family:
            raise ConfigError(
                f"site weights were learned on a {self.family!r} backbone, but this backbone is {family!r}: "
                "learn them again on this backbone (stage=2)"
            )
