"""Content hashing: stable hashes of resolved settings, and fingerprints of model folders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


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


def file_fingerprint(path: str | Path, chunk: int = 1 << 20) -> str:
    """Identity of a large file (a single-file checkpoint): its size and the hash of its first and last MiB."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:16]
