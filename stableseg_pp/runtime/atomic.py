"""Atomic file writes: a temporary file in the same folder, then ``os.replace``.

A killed run never leaves a half-written file under its final name, so the
existence of a file means it is complete. Temporary names are hidden and end
in ``.tmp`` (never in the final suffix, so no ``*.png`` glob picks one up); a
step that owns its folder removes the ones a killed run left
(:func:`remove_stale_temporaries`). A writer is given the temporary path and
must name the format itself (``format="PNG"``, a file object for ``np.save``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
# ``.<final name>.<random>.tmp``; earlier versions appended the final suffix (``.tmp.png``), also recognised
TEMPORARY = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)?$")


@functools.cache
def file_mode() -> int:
    """The mode a plain ``open()`` gives a new file under this process's umask (read once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_save(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` in one step.

    The file gets the mode a plain ``open()`` would give it (``mkstemp``'s
    private 0600 would otherwise survive the rename), so colleagues can read it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_save(path, _write)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_save(path, _write)


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_bytes(path, json.dumps(obj, indent=2).encode())


def temporary_name(path: str | Path) -> str:
    """A hidden name beside ``path`` for a temporary file or folder (``.<name>.tmp``)."""
    return f".{Path(path).name}.tmp"


def remove_stale_temporaries(folder: str | Path) -> int:
    """Remove the temporary files and folders that killed writers left below ``folder``; returns how many.

    Call only while owning the folder (a step's lock), so no live writer's file is taken."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.rglob(".*") if TEMPORARY.match(p.name)]
    for p in sorted(stale, key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temporary file(s) a stopped run left in %s", len(stale), folder)
    return len(stale)
