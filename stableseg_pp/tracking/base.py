"""The tracker interface, the no-op tracker, and the tracker of the running ``fit``."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger

from stableseg_pp.data.description import DatasetDescription


def step_kind(folder: Path) -> str:
    """A step's kind (W&B job and artifact type): its folder prefix, which is also its module under ``stages/``."""
    return folder.name.split("-")[0]


class StepRecord:
    """What one pipeline step reports; the base class records nothing."""

    def lightning_loggers(self) -> list[Logger]:
        """Loggers for the step's Lightning Trainers (training curves)."""
        return []

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Scalar results of the step (e.g. ``val/miou``)."""

    def log_masks(self, dataset: DatasetDescription, split: str, ids: Sequence[str], mask_sets: Mapping[str, Path]) -> None:
        """Class-labelled masks over their images: ``mask_sets`` maps a name to a folder of palette PNGs."""

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """A table (e.g. the results table, the learned map weights)."""

    def log_image(self, name: str, path: Path) -> None:
        """An image file (e.g. the weights plot)."""


class Tracker:
    """No tracking: steps record nothing. Subclasses return real :class:`StepRecord` objects."""

    def __init__(self) -> None:
        self.config: dict = {}

    def start(self, config: dict) -> None:
        """Called once per ``fit`` with the resolved configuration."""
        self.config = config

    @contextmanager
    def step(
        self, folder: Path, inputs: Sequence[Path] = (), key: Mapping[str, Any] | None = None, log_output: bool = True
    ) -> Iterator[StepRecord]:
        """Record the computation of ``folder`` from the ``inputs`` folders; ends the record also on error.

        ``log_output=False``: the step reports results but ``folder`` is not an output of its own.
        """
        yield StepRecord()

    def close(self) -> None:
        """Called once when ``fit`` ends, also on error."""


NoTracker = Tracker

_ACTIVE: Tracker = NoTracker()


def active() -> Tracker:
    """The tracker of the running ``fit`` (a no-op one outside ``fit``)."""
    return _ACTIVE


@contextmanager
def activate(tracker: Tracker, config: dict) -> Iterator[Tracker]:
    """Make ``tracker`` the active one for the duration of a ``fit``, and close it at the end."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, tracker
    try:
        tracker.start(config)
        yield tracker
    finally:
        _ACTIVE = previous
        tracker.close()


def read_metrics(folder: Path) -> dict[str, float]:
    """``<split>/miou`` etc. from a step's ``metrics.json`` (empty when it has none)."""
    path = folder / "metrics.json"
    if not path.exists():
        return {}
    flat: dict[str, float] = {}
    for split, m in json.loads(path.read_text()).items():
        if not m:
            continue
        for name, value in m.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                flat[f"{split}/{name}"] = value
            elif isinstance(value, dict):
                flat.update({f"{split}/{name}/{k}": v for k, v in value.items() if isinstance(v, int | float)})
    return flat


def track_results(record: StepRecord, dataset: DatasetDescription, out: Path, mask_sets: Mapping[str, Path]) -> None:
    """Send a finished step's metrics and its val masks (``mask_sets``: name -> folder of val masks) to the tracker."""
    record.log_metrics(read_metrics(out))
    if mask_sets:
        record.log_masks(dataset, "val", dataset.split_ids("val"), mask_sets)
