"""Stopping and resuming Lightning runs.

A resumed training must continue the uninterrupted one exactly: Lightning's
checkpoint restores the weights, the optimizer and the loop counters, but not
the random state that the next epoch draws from (the shuffle order, the
DataLoader workers' seeds, the augmentation of the main process, dropout).
:class:`RandomStateInCheckpoints` stores it with every checkpoint and puts it
back where the resumed run starts its next epoch. Training loaders must not keep
their workers across epochs (``persistent_workers``): a worker's random state
lives in its process, which no checkpoint holds.

Ctrl+C inside a Lightning call ends with Lightning's ``sys.exit(1)`` after its
graceful shutdown; :func:`run_lightning` turns that back into
``KeyboardInterrupt``, so the command exits with 130 and its resume hint.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from lightning.pytorch import Callback

T = TypeVar("T")
KEY = "random_state"


def collect_random_state() -> dict[str, Any]:
    """Every random stream a training draws from, as tensors and plain numbers (loadable with ``weights_only``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": int(version), "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict[str, Any]) -> None:
    """Put back what :func:`collect_random_state` recorded."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class RandomStateInCheckpoints(Callback):
    """Saves the random state with each checkpoint (as the epoch that wrote it ends) and puts it back as soon as a
    resumed run has loaded that checkpoint: nothing draws between the two points in either run (a resumed run skips
    the sanity check and creates its first data iterator straight after loading), so the epochs after the
    checkpoint draw exactly what the uninterrupted run drew."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[KEY] = collect_random_state()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if KEY in checkpoint:
            restore_random_state(checkpoint[KEY])


def run_lightning(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``trainer.fit(...)`` / ``trainer.predict(...)`` / ...: a Ctrl+C reaches the caller as ``KeyboardInterrupt``."""
    trainer = call.__self__
    try:
        return call(*args, **kwargs)
    except SystemExit as err:
        if trainer.interrupted:
            raise KeyboardInterrupt from err
        raise
