"""``logger=csv``: one CSV of every step's results for the whole run (training curves stay in each folder's ``logs/``)."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stableseg_pp.runtime.atomic import atomic_write_text
from stableseg_pp.tracking.base import StepRecord, Tracker, step_kind

FIELDS = ["time", "step", "kind", "inputs", "metric", "value"]


class CSVStep(StepRecord):
    def __init__(self, folder: Path, inputs: Sequence[Path]):
        self.folder, self.inputs = folder, inputs
        self.rows: list[dict] = []

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        inputs = " ".join(p.name for p in self.inputs)
        for name, value in metrics.items():
            row = {"time": stamp, "step": self.folder.name, "kind": step_kind(self.folder), "inputs": inputs}
            self.rows.append({**row, "metric": name, "value": value})


class CSVTracker(Tracker):
    """Appends ``time, step, kind, inputs, metric, value`` rows to ``path`` as each step ends."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    @contextmanager
    def step(
        self, folder: Path, inputs: Sequence[Path] = (), key: Mapping[str, Any] | None = None, log_output: bool = True
    ) -> Iterator[StepRecord]:
        record = CSVStep(folder, inputs)
        try:
            yield record
        finally:
            if record.rows:
                self._append(record.rows)

    def _append(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS)
        before = self.path.read_text() if self.path.exists() else ""
        if not before:
            writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, before + buf.getvalue())
