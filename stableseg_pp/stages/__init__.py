"""The stage registry: ``stage=<key>`` in the config selects what ``fit`` runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from stableseg_pp.stages import zero_shot

StageFn = Callable[[DictConfig], Path]

STAGES: dict[str, StageFn] = {
    "0": zero_shot.run,
}
# ``all`` runs every stage that exists, in order.
PIPELINE: tuple[str, ...] = ("0",)


def resolve_stages(stage: object) -> list[str]:
    """``0`` / ``"0"`` -> ["0"]; ``all`` -> the whole pipeline; anything else is a clear error."""
    key = str(stage).strip().lower()
    if key == "all":
        return list(PIPELINE)
    if key not in STAGES:
        raise ValueError(f"stage={stage!r} is not a stage; choose one of {sorted(STAGES) + ['all']}")
    return [key]
