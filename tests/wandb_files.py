"""Reading a W&B offline run directory back: its transaction log (``run-<id>.wandb``) and its media files.

The log is a LevelDB-style record log of ``wandb_internal_pb2.Record`` messages:
a 7-byte file header, then 32 KiB blocks of records, each with a 7-byte header
(crc32, length, type: full / first / middle / last).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[pb.Record]:
    raw = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", raw[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B run log"
    records, pos, parts = [], HEADER, b""
    while pos + HEADER <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + HEADER])
        if pos + HEADER + length > len(raw):  # a record still being written
            break
        data = raw[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        parts = data if kind in (FULL, FIRST) else parts + data
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


@dataclass
class OfflineRun:
    folder: Path
    job_type: str = ""
    name: str = ""
    group: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    artifacts: list[tuple[str, str]] = field(default_factory=list)  # (name, type)
    exit_code: int | None = None
    start_time: float = 0.0

    @property
    def logged_keys(self) -> set[str]:
        return {k for row in self.history for k in row}

    def images(self) -> list[Path]:
        return sorted((self.folder / "files" / "media").rglob("*.png"))


def read_offline_run(folder: Path) -> OfflineRun:
    run = OfflineRun(folder)
    for r in read_records(next(folder.glob("run-*.wandb"))):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.job_type, run.name, run.group = r.run.job_type, r.run.display_name, r.run.run_group
            run.start_time = r.run.start_time.seconds + r.run.start_time.nanos / 1e9
            for item in r.run.config.update:
                run.config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "artifact":
            run.artifacts.append((r.artifact.name, r.artifact.type))
        elif kind == "exit":
            run.exit_code = r.exit.exit_code
    return run


def read_offline_runs(wandb_dir: Path, timeout: float = 30.0) -> list[OfflineRun]:
    """Every offline run under ``wandb_dir``, in the order they started.

    W&B's service writes the log asynchronously and may still be flushing a run's
    last records (its exit record) just after ``finish``: read again until every
    run has one, for at most ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        runs = sorted((read_offline_run(f) for f in wandb_dir.glob("offline-run-*")), key=lambda r: r.start_time)
        if all(r.exit_code is not None for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)
