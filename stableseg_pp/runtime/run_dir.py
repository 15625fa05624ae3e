"""Content-addressed stage outputs and completion records.

A stage's output folder is ``<run_dir>/<stage>-<hash>`` where the hash covers
the resolved configuration the stage depends on and the identity of its
inputs. The completion record is written last (atomically): a folder with a
record is finished and is skipped when the stage runs again; ``force=true``
recomputes it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from stableseg_pp.runtime import distributed
from stableseg_pp.runtime.atomic import atomic_write_text, remove_stale_temporaries, write_json
from stableseg_pp.runtime.hashing import config_hash, to_plain
from stableseg_pp.runtime.pipeline_progress import PROGRESS

COMPLETE = "_COMPLETE.json"
log = logging.getLogger(__name__)


class IncompleteStageError(RuntimeError):
    """A stage stopped before it finished (time limit, requeue signal): its folder is left to resume in."""


def stage_dir(run_dir: str | Path, stage: str, key: Mapping[str, Any]) -> Path:
    """The content-addressed folder of ``stage`` for configuration ``key``."""
    return Path(run_dir) / f"{stage}-{config_hash(key)}"


def final_checkpoint(folder: str | Path) -> Path:
    """The trained weights of a finished training step folder (``checkpoints/last.ckpt``)."""
    return Path(folder) / "checkpoints" / "last.ckpt"


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / COMPLETE).exists()


def write_record(folder: str | Path, key: Mapping[str, Any], **payload: Any) -> Path:
    """Write the completion record: the last file a finished stage writes."""
    record = {"key": to_plain(key), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **payload}
    return atomic_write_text(Path(folder) / COMPLETE, json.dumps(record, indent=2, default=str))


def write_key(folder: str | Path, key: Mapping[str, Any]) -> None:
    """Record what the folder is keyed by (readable before the stage completes)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(folder) / "key.json", json.dumps(to_plain(key), indent=2, sort_keys=True, default=str))


class StageLock:
    """One writer per step folder: an OS file lock beside it (``<run_dir>/.locks/<folder>.lock``).

    Held by rank 0 for a whole step (all ranks of one job count as one writer);
    a second run of the same step waits for it, saying who holds it, then finds
    the folder finished (or resumes it). The OS releases the lock of a killed
    process, so a crash never leaves the folder locked.
    """

    def __init__(self, folder: Path, poll_seconds: float = 2.0, report_every: float = 60.0):
        self.path = folder.parent / ".locks" / f"{folder.name}.lock"
        self.owner_file = self.path.with_suffix(".owner")
        self.poll_seconds = poll_seconds
        self.report_every = report_every
        self._lock = None

    def owner(self) -> str:
        try:
            return self.owner_file.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def __enter__(self) -> StageLock:
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path))
        waited, reported = 0.0, -self.report_every
        while True:
            try:
                self._lock.acquire(timeout=self.poll_seconds)
                break
            except Timeout:
                waited += self.poll_seconds
                if waited - reported >= self.report_every:
                    log.warning("%s is being written by %s: waiting for it to finish (%.0f s so far)",
                                self.path.name.removesuffix(".lock"), self.owner(), waited)  # fmt: skip
                    reported = waited
        since = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_text(self.owner_file, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n")
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self.owner_file.unlink(missing_ok=True)
            self._lock.release()


@contextmanager
def open_stage(run_dir: str | Path, stage: str, key: Mapping[str, Any], force: bool = False) -> Iterator[tuple[Path, bool]]:
    """Claim the stage's folder for this job: yields the folder and whether it is already finished (then skip it).

    ``force`` removes a finished or partial folder so that everything is recomputed;
    otherwise a partial folder is kept and the stage resumes in it. Collective:
    every rank enters it, and all get the same answer; rank 0 holds the folder's
    lock (:class:`StageLock`) until the block ends.
    """
    out = stage_dir(run_dir, stage, key)
    if distributed.is_main():
        PROGRESS.step(stage)
    with StageLock(out) if distributed.is_main() else nullcontext():
        with distributed.main_first():  # rank 0 clears / creates the folder; the others then see it as it is
            if distributed.is_main() and force and out.exists():
                shutil.rmtree(out)
            finished = is_complete(out)
            if distributed.is_main() and not finished:
                remove_stale_temporaries(out)  # a killed run's half-written files (this job owns the folder now)
                write_key(out, key)
        if finished:
            log.info("%s: finished outputs at %s, skipped (force=true recomputes)", stage, out)
        yield out, finished


def finish_stage(out: Path, key: Mapping[str, Any], splits: dict[str, dict], **payload: Any) -> Path:
    """Write ``metrics.json`` (each split's ``metrics`` entry) and, last, the completion record (call on rank 0)."""
    write_json(out / "metrics.json", {s: r["metrics"] for s, r in splits.items()})
    write_record(out, key, splits=splits, **payload)
    return out


def evaluate_and_finish(out: Path, key: Mapping[str, Any], report: Callable[[], dict[str, dict]], **payload: Any) -> Path:
    """Collective end of a stage: rank 0 evaluates (``report`` -> split entries) and writes the record; all wait.

    ``payload``: more entries for the completion record (e.g. timings).
    """
    distributed.barrier()  # every rank's files are written
    distributed.on_main(lambda: finish_stage(out, key, report(), world_size=distributed.world_size(), **payload))
    return out
