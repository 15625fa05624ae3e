"""The stage registry: ``stage=<key>`` in the config selects what ``fit`` runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from stableseg_pp.config import build
from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.runtime.errors import ConfigError
from stableseg_pp.stages import magnet, refinement, segments, self_training, stage0

# Every stage: ``run(cfg, dataset) -> output folder``.
StageFn = Callable[[DictConfig, DatasetDescription], Path]

SEGMENTERS = ("stableseg", "emerdiff")


def run_stage0(cfg: DictConfig, dataset: DatasetDescription) -> Path:
    """Stage 0 with ``stage0.segmenter``: StableSeg's class masks, or EmerDiff's class-agnostic segments."""
    if cfg.stage0.get("segmenter", "stableseg") == "emerdiff":
        return segments.run(cfg, dataset)
    return stage0.run(cfg, dataset)


STAGES: dict[str, StageFn] = {
    "0": run_stage0,  # StableSeg zero-shot pseudo-masks (or EmerDiff's unsupervised segments)
    "1": self_training.run_stage1,  # StableSeg+: CRF + DeepLabV3+
    "2": self_training.run_stage2,  # StableSeg++: learned map weights, regenerate, retrain
    "magnet": magnet.run_stage,  # MAGNET: LoRA on an MM-DiT from its own refined pseudo-masks
}
# ``all`` runs the whole pipeline; stage 2 reuses (or runs) stages 0 and 1 through content-addressed outputs.
PIPELINE: tuple[str, ...] = ("2",)
# The steps each stage runs in order (a SLURM chain queues one job per entry), and the zero_shot splits it needs.
CHAINS: dict[str, tuple[str, ...]] = {"0": ("0",), "1": ("0", "1"), "2": ("0", "1", "2"), "magnet": ("0", "magnet")}
NEEDED_SPLITS: dict[str, tuple[str, ...]] = {"0": (), "1": ("train",), "2": ("train",), "magnet": ("train",)}


def resolve_stages(stage: object) -> list[str]:
    """``0`` / ``"0"`` -> ["0"]; ``all`` -> the whole pipeline; anything else is a clear error."""
    key = str(stage).strip().lower()
    if key == "all":
        return list(PIPELINE)
    if key not in STAGES:
        raise ConfigError(f"stage={stage!r} is not a stage; choose one of {sorted(STAGES) + ['all']}")
    return [key]


def planned_steps(cfg: DictConfig) -> int:
    """How many step folders ``fit`` opens for ``cfg.stage`` (the count behind "step k of N")."""
    key = resolve_stages(cfg.stage)[-1]
    labeling = relabeling = 0  # data.labels=predicted: each round's labels step (and its evidence, stage 0 with every
    if cfg.data.get("labels") == "predicted":  # class; a segmenter labeler reads the previous round's DeepLabV3+)
        from stableseg_pp.stages.labels import round_labeler

        labeling = 2 if build(round_labeler(cfg)).evidence == "stage0" else 1
        labeler = build(cfg.labeler)  # with a second opinion it opens round 1's labels (and their evidence) again
        relabeling = 1 + labeling * labeler.second_opinion if labeler.evidence == "segmenter" else labeling
    if key == "0":
        return labeling + 1
    round1 = labeling + 1 + refinement.steps(cfg) + 1  # stage 0, refinement, DeepLabV3+ (magnet: ..., MAGNET)
    if key in ("1", "magnet"):
        return round1
    # map weights, (MAGNET), the round's labels, regenerate, refine, retrain
    later = 1 + int(bool(cfg.self_training.get("magnet"))) + relabeling + round1 - labeling
    return round1 + (int(cfg.self_training.rounds) - 1) * later


def stage_chain(stage: object) -> list[str]:
    """The stages a run of ``stage`` goes through, in order (``all`` -> 0, 1, 2)."""
    return list(CHAINS[resolve_stages(stage)[-1]])


def check_segmenter(stage: object, segmenter: object) -> None:
    """``stage0.segmenter``: one of :data:`SEGMENTERS`; the class-agnostic one only for stage 0."""
    if str(segmenter) not in SEGMENTERS:
        raise ConfigError(f"stage0.segmenter={segmenter}: use one of {', '.join(SEGMENTERS)}")
    if str(segmenter) != "stableseg" and resolve_stages(stage) != ["0"]:
        raise ConfigError(
            f"stage0.segmenter={segmenter} writes class-agnostic segments, which stage={stage} cannot train on: "
            "run it with stage=0, or use stage0.segmenter=stableseg (refine=emerdiff refines StableSeg's masks)"
        )


def check_stage_splits(stage: object, splits: list[str]) -> None:
    """Stages 1, 2 and magnet train on the pseudo-masks of the train split: stage 0 must make them."""
    for key in resolve_stages(stage):
        missing = [s for s in NEEDED_SPLITS[key] if s not in splits]
        if missing:
            raise ConfigError(
                f"stage={stage} trains DeepLabV3+ on stage 0's pseudo-masks of the {'/'.join(missing)} split, but "
                f"stage0.splits={splits}: add {'/'.join(missing)} to stage0.splits, or run stage=0"
            )
