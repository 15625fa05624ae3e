"""Image-level labels predicted without ground truth (``data.labels=predicted``): which classes each image holds.

Reads the evidence a labeler scores (the ``diffusion`` labeler: stage 0's masks
with every class in the prompt), writes one scores file per image
(``<split>/scores/<id>.json``, atomically; finished images are kept on resume),
then the split's threshold and labels (``<split>/labels.json``) and, where the
dataset has ground truth, the labels' quality (``metrics.json``: per-class
precision and recall, mean F1, mAP). Stage 0 prompts for these classes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from stableseg_pp.artifacts import MaskSetLayout
from stableseg_pp.config import build
from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.evaluation.image_labels import label_metrics
from stableseg_pp.runtime import distributed
from stableseg_pp.runtime.atomic import write_json
from stableseg_pp.runtime.run_dir import finish_stage
from stableseg_pp.stages.step import Step, method_settings
from stableseg_pp.tracking.base import StepRecord

log = logging.getLogger(__name__)
STEP = Step("labels")
LABELS_FILE = "labels.json"


def run(cfg: DictConfig, dataset: DatasetDescription, evidence: Path) -> Path:
    """Label every split of ``stage0.splits`` from the labeler's ``evidence`` folder; returns the step folder."""
    labeler = build(cfg.labeler)  # its constructor checks its settings before any work
    key = {"evidence": evidence.name, "labeler": method_settings(cfg.labeler), "splits": list(cfg.stage0.splits)}

    def compute(out: Path, key: dict, record: StepRecord) -> None:
        # rank 0 scores the stored evidence (no forward); the others wait, then read the labels
        distributed.on_main(lambda: _label(cfg, dataset, labeler, evidence, out, key, record))
        distributed.barrier()

    return STEP.run(cfg, key, [evidence], compute)


def candidates(dataset: DatasetDescription) -> list[int]:
    """The classes a labeler decides on: every class but the background."""
    return [c for c in range(len(dataset.class_names)) if c != dataset.background_index]


def _scores(labeler, dataset: DatasetDescription, evidence: MaskSetLayout, folder: Path, sid: str) -> dict[int, float]:
    """One image's scores, read back when a previous run wrote them (the file is written whole or not at all)."""
    path = folder / f"{sid}.json"
    names = dataset.class_names
    if path.exists():
        return {names.index(n): float(v) for n, v in json.loads(path.read_text()).items()}
    scores = labeler.scores(np.array(Image.open(evidence.mask_path(sid))), candidates(dataset))
    write_json(path, {names[c]: round(v, 6) for c, v in scores.items()})
    return {c: round(v, 6) for c, v in scores.items()}


def _truth(dataset: DatasetDescription, split: str, ids: list[str]) -> np.ndarray | None:
    """(N, K) which candidate classes each image's ground truth holds; None without ground truth."""
    if not all(dataset.layout.has_mask(split, sid) for sid in ids):
        return None
    classes = candidates(dataset)
    rows = []
    for sid in ids:
        present = set(np.unique(dataset.layout.read_mask(split, sid, len(dataset.class_names))).tolist()) - {IGNORE_INDEX}
        rows.append([c in present for c in classes])
    return np.array(rows, bool).reshape(len(ids), len(classes))


def _label(cfg, dataset: DatasetDescription, labeler, evidence: Path, out: Path, key: dict, record: StepRecord) -> None:
    splits, classes = {}, candidates(dataset)
    for split in cfg.stage0.splits:
        source = MaskSetLayout(evidence / split)
        ids = [sid for sid in dataset.split_ids(split) if source.is_done(sid)]
        scores = {sid: _scores(labeler, dataset, source, out / split / "scores", sid) for sid in ids}
        threshold = labeler.fit_threshold(list(scores.values()))
        labels = {sid: labeler.decide(scores[sid], threshold, dataset.has_background) for sid in ids}
        empty = [sid for sid, named in labels.items() if not named]
        write_json(out / split / LABELS_FILE, {"threshold": threshold, "labels": labels})
        truth = _truth(dataset, split, ids)
        metrics = None
        if truth is not None and ids:
            predicted = np.array([[c in labels[sid] for c in classes] for sid in ids], bool)
            score_matrix = np.array([[scores[sid][c] for c in classes] for sid in ids], np.float32)
            metrics = label_metrics(truth, predicted, [dataset.class_names[c] for c in classes], score_matrix)
            record.log_metrics({f"{split}/labels/{k}": metrics[k] for k in ("mean_f1", "map") if metrics[k] is not None})
        quality = "no ground truth to score against"
        if metrics is not None:
            quality = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("mean_f1", "map") if metrics[k] is not None)
        log.info("labels [%s]: %d images, threshold %.4f, %d with no class named (background only); %s",
                 split, len(ids), threshold, len(empty), quality)  # fmt: skip
        splits[split] = {"metrics": metrics, "images": len(ids), "threshold": threshold, "no_class_named": len(empty)}
    finish_stage(out, key, splits)


def read_labels(folder: Path) -> dict[str, dict[str, list[int]]]:
    """A finished labels step's classes: split -> image id -> class ids."""
    return {
        path.parent.name: {sid: [int(c) for c in named] for sid, named in json.loads(path.read_text())["labels"].items()}
        for path in sorted(Path(folder).glob(f"*/{LABELS_FILE}"))
    }
