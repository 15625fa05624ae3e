"""The stage registry: ``stage=<key>`` in the config selects what ``fit`` runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.runtime.errors import ConfigError
from stableseg_pp.stages import self_training, zero_shot

# Every stage: ``run(cfg, dataset) -> output folder``.
StageFn = Callable[[DictConfig, DatasetDescription], Path]

STAGES: dict[str, StageFn] = {
    "0": zero_shot.run,  # StableSeg zero-shot pseudo-masks
    "1": self_training.run_stage1,  # StableSeg+: CRF + DeepLabV3+
    "2": self_training.run_stage2,  # StableSeg++: learned map weights, regenerate, retrain
}
# ``all`` runs the whole pipeline; stage 2 reuses (or runs) stages 0 and 1 through content-addressed outputs.
PIPELINE: tuple[str, ...] = ("2",)


def resolve_stages(stage: object) -> list[str]:
    """``0`` / ``"0"`` -> ["0"]; ``all`` -> the whole pipeline; anything else is a clear error."""
    key = str(stage).strip().lower()
    if key == "all":
        return list(PIPELINE)
    if key not in STAGES:
        raise ConfigError(f"stage={stage!r} is not a stage; choose one of {sorted(STAGES) + ['all']}")
    return [key]
