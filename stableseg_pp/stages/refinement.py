"""The refinement step between stage 0 and DeepLabV3+ training (``refine``): DenseCRF, EmerDiff, both, or none."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.runtime.errors import ConfigError
from stableseg_pp.stages import crf, emerdiff

Refiner = Callable[[DictConfig, DatasetDescription, Path], Path]

REFINERS: dict[str, Refiner] = {
    "crf": crf.run,  # StableSeg+'s DenseCRF on the stage-0 scores
    "emerdiff": emerdiff.run,  # EmerDiff's modulated denoising
    # DenseCRF on EmerDiff's per-segment pixel-change scores
    "emerdiff+crf": lambda cfg, dataset, s0: crf.run(cfg, dataset, emerdiff.run(cfg, dataset, s0)),
    "none": lambda cfg, dataset, s0: s0,  # train on the stage-0 masks themselves
}
# how the results table names the refined masks
LABELS = {"crf": "CRF", "emerdiff": "EmerDiff", "emerdiff+crf": "EmerDiff + CRF", "none": None}


def check_refine(value: object) -> str:
    choice = str(value)
    if choice not in REFINERS:
        raise ConfigError(f"refine={choice}: use one of {', '.join(REFINERS)}")
    return choice


def run(cfg: DictConfig, dataset: DatasetDescription, stage0_dir: Path) -> Path:
    """The configured refinement of ``stage0_dir`` (its folder; ``none``: ``stage0_dir`` itself)."""
    return REFINERS[check_refine(cfg.get("refine", "crf"))](cfg, dataset, stage0_dir)


def steps(cfg: DictConfig) -> int:
    """How many step folders the refinement writes (``emerdiff+crf``: two; ``none``: none)."""
    choice = check_refine(cfg.get("refine", "crf"))
    return 0 if choice == "none" else len(choice.split("+"))


def label(cfg: DictConfig) -> str | None:
    """The refinement's name in the results table (None: no refinement step)."""
    return LABELS[check_refine(cfg.get("refine", "crf"))]
