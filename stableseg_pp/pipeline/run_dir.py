"""Content-addressed stage outputs and completion records.

A stage's output folder is ``<run_dir>/<stage>-<hash>`` where the hash covers
the resolved configuration the stage depends on and the identity of its
inputs. The completion record is written last (atomically): a folder with a
record is finished and is skipped when the stage runs again; ``force=true``
recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from stableseg_pp.pipeline import distributed
from stableseg_pp.pipeline.atomic import atomic_write_text

COMPLETE = "_COMPLETE.json"
log = logging.getLogger(__name__)


class IncompleteStageError(RuntimeError):
    """A stage stopped before it finished (time limit, requeue signal): its folder is left to resume in."""


def to_plain(obj: Any) -> Any:
    """Resolved plain Python containers from OmegaConf nodes (anything else unchanged)."""
    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def config_hash(*parts: Any, length: int = 12) -> str:
    """Stable hash of JSON-serialisable parts (OmegaConf nodes are resolved first)."""
    text = json.dumps([to_plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def folder_fingerprint(path: str | Path) -> str:
    """Identity of a model folder: every file's relative path and size, and the content of its JSON files.

    Cheap for multi-GB weights, yet any re-saved or re-trained model changes it.
    """
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = f.relative_to(root).as_posix()
        h.update(f"{rel}:{f.stat().st_size}\n".encode())
        if f.suffix == ".json" and f.stat().st_size < 1_000_000:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def stage_dir(run_dir: str | Path, stage: str, key: Mapping[str, Any]) -> Path:
    """The content-addressed folder of ``stage`` for configuration ``key``."""
    return Path(run_dir) / f"{stage}-{config_hash(key)}"


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


def open_stage(run_dir: str | Path, stage: str, key: Mapping[str, Any], force: bool = False) -> tuple[Path, bool]:
    """The stage's folder and whether it is already finished (then the caller skips it).

    ``force`` removes a finished or partial folder so that everything is recomputed;
    otherwise a partial folder is kept and the stage resumes in it. Collective:
    every rank calls it, and all get the same answer.
    """
    out = stage_dir(run_dir, stage, key)
    with distributed.main_first():  # rank 0 clears / creates the folder; the others then see it as it is
        if distributed.is_main() and force and out.exists():
            shutil.rmtree(out)
        finished = is_complete(out)
        if distributed.is_main() and not finished:
            write_key(out, key)
    if finished:
        log.info("%s: finished outputs at %s, skipped (force=true recomputes)", stage, out)
    return out, finished
