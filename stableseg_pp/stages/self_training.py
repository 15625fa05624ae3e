"""StableSeg+ (stage 1) and StableSeg++ (stage 2): self-training on pseudo-masks (docs/method.md).

stage 1: stage-0 masks -> refinement (``refine``: DenseCRF by default, EmerDiff, both or none) -> DeepLabV3+.
stage 2: + learn the attention-map weights from DeepLabV3+'s predictions ->
regenerate the pseudo-masks with them (stage 0 given the learned site weights,
a diffusion forward again, so SAR uses the new CA map) -> CRF -> retrain;
``self_training.rounds`` DeepLabV3+ trainings in all (2 = the paper). With
``self_training.warm_start`` (the paper: "retrain StableSeg+'s DeepLabV3+")
each round's DeepLabV3+ starts from the previous round's weights.
Every step is content-addressed, so finished steps are reused and a changed
setting recomputes exactly what depends on it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from stableseg_pp import tracking
from stableseg_pp.artifacts import SiteWeights
from stableseg_pp.config import build
from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.evaluation.mask_sets import NO_GROUND_TRUTH, val_miou
from stableseg_pp.runtime import distributed
from stableseg_pp.runtime.atomic import atomic_write_text, write_json
from stableseg_pp.runtime.run_dir import COMPLETE
from stableseg_pp.stages import deeplab, magnet, refinement, stage0, weights

log = logging.getLogger(__name__)


def _fit_warning(folder: Path) -> str | None:
    """The warning a DeepLabV3+ step recorded when it ended below its own pseudo-masks (None for other steps)."""
    try:
        record = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    return ((record.get("splits", {}).get("train") or {}).get("fit_to_masks") or {}).get("warning")


def stableseg_plus(cfg: DictConfig, dataset: DatasetDescription) -> dict[str, Path]:
    s0 = stage0.run(cfg, dataset)
    refined = refinement.run(cfg, dataset, s0)
    seg = deeplab.run(cfg, dataset, refined)
    return {"stage0": s0, "refined": refined, "deeplab": seg}


def run_stage1(cfg: DictConfig, dataset: DatasetDescription) -> Path:
    return stableseg_plus(cfg, dataset)["deeplab"]


def run_stage2(cfg: DictConfig, dataset: DatasetDescription) -> Path:
    first = stableseg_plus(cfg, dataset)
    refined_as = refinement.label(cfg)
    rows = [
        ("init (stage-0 masks)", first["stage0"]),
        *([(f"init + {refined_as}", first["refined"])] if refined_as else []),
        ("+ (DeepLabV3+, round 1)", first["deeplab"]),
    ]
    steps = dict(first)
    seg, s0 = first["deeplab"], first["stage0"]
    weight_dirs = []
    for r in range(2, int(cfg.self_training.rounds) + 1):
        wdir = weights.run(cfg, dataset, s0, seg)
        weight_dirs.append(wdir)
        adapter = None
        if cfg.self_training.magnet:  # MAGNET on the latest masks (magnet.targets) before regenerating them
            adapter = magnet.run(cfg, dataset, magnet.targets_of(cfg, steps))
            rows.append((f"MAGNET adapter (round {r})", adapter))
        s0 = stage0.run(cfg, dataset, weights=SiteWeights.load(wdir), inputs=[wdir, *([adapter] if adapter else [])],
                           adapter=adapter, segmenter=seg)  # fmt: skip
        refined = refinement.run(cfg, dataset, s0)
        seg = deeplab.run(cfg, dataset, refined, init=seg if cfg.self_training.warm_start else None)
        steps = {"stage0": s0, "refined": refined, "deeplab": seg}
        rows += [
            (f"learned-weight masks (round {r})", s0),
            *([(f"learned-weight masks + {refined_as} (round {r})", refined)] if refined_as else []),
            (f"++ (DeepLabV3+, round {r})", seg),
        ]
    run_dir = Path(cfg.paths.run_dir)
    protocol = label_protocol(cfg, dataset)
    table = distributed.on_main(lambda: write_results(run_dir, rows, weight_dirs, protocol))
    with tracking.active().step(run_dir / "results", inputs=[seg, *weight_dirs], log_output=False) as record:
        record.log_table("results", table or [])
        record.log_metrics({"results/final_val_miou": table[-1]["val_miou"]} if table and table[-1]["val_miou"] else {})
    return seg


def label_protocol(cfg: DictConfig, dataset: DatasetDescription) -> str:
    """Where the prompts' classes came from: ``oracle`` (the ground truth), ``all``, or ``predicted (<labeler>)``."""
    if dataset.labels != "predicted":
        return dataset.labels
    labeler = build(cfg.labeler)
    first = getattr(labeler, "first_round", None)  # a labeler that starts from another one in round 1
    return f"predicted ({first.name}, then {labeler.name})" if first is not None else f"predicted ({labeler.name})"


def write_results(run_dir: Path, rows: list[tuple[str, Path]], weight_dirs: list[Path], labels: str = "oracle") -> list[dict]:
    """The paper's Table 5 layout: val mIoU at each step of the self-training, and the label protocol of the run."""
    table = [{"step": name, "val_miou": val_miou(folder), "labels": labels, "folder": folder.name,
              "warning": _fit_warning(folder)} for name, folder in rows]  # fmt: skip
    lines = ["| step | val mIoU | labels | outputs |", "| --- | --- | --- | --- |"]
    for row in table:
        v = "no masks" if row["val_miou"] is None else f"{100 * row['val_miou']:.1f}"
        warned = " (**see warning**)" if row["warning"] else ""
        lines.append(f"| {row['step']}{warned} | {v} | {row['labels']} | `{row['folder']}` |")
    for w in weight_dirs:
        lines.append(f"\nLearned attention-map weights: `{w.name}/weights.json`, plot `{w.name}/weights.png`")
    if all(row["val_miou"] is None for row in table):
        lines.append(f"\nNo val mIoU: {NO_GROUND_TRUTH}.")
    for row in table:
        if row["warning"]:
            lines.append(f"\n**Warning ({row['step']}):** {row['warning']}")
    atomic_write_text(run_dir / "results.md", "\n".join(lines) + "\n")
    write_json(run_dir / "results.json", table)
    log.info("results:\n%s", "\n".join(lines))
    return table
