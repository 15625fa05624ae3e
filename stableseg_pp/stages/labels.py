"""Image-level labels predicted without ground truth (``data.labels=predicted``): which classes each image holds.

Scores each image with the labeler (``diffusion``: the backbone's denoising
error per class prompt; ``diffusion_maps``: stage 0's masks with every class in
the prompt; ``segmenter``: the previous round's DeepLabV3+ predictions; the
last two read their evidence folder), writes one scores file per image
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
import torch
from omegaconf import DictConfig
from PIL import Image

from stableseg_pp.artifacts import MaskSetLayout
from stableseg_pp.config import build
from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.evaluation.image_labels import label_metrics
from stableseg_pp.methods.labelers.thresholds import describe_threshold
from stableseg_pp.runtime import distributed
from stableseg_pp.runtime.atomic import write_json
from stableseg_pp.runtime.run_dir import finish_stage
from stableseg_pp.stages.step import Step, build_backbone, diffusion_key, load_on_device, method_settings, this_device
from stableseg_pp.tracking.base import StepRecord

log = logging.getLogger(__name__)
STEP = Step("labels")
LABELS_FILE = "labels.json"


def round_labeler(cfg: DictConfig, segmenter: Path | None = None) -> DictConfig:
    """The labeler node that labels a round: ``cfg.labeler``, or its ``first_round`` where it reads a segmenter
    and none is trained yet (round 1)."""
    if build(cfg.labeler).evidence == "segmenter" and segmenter is None:
        return cfg.labeler.first_round
    return cfg.labeler


def run(
    cfg: DictConfig,
    dataset: DatasetDescription,
    evidence: Path | None = None,
    node: DictConfig | None = None,
    second_opinion: Path | None = None,
) -> Path:
    """Label every split of ``stage0.splits`` with the labeler ``node`` (default ``cfg.labeler``): from its
    ``evidence`` folder (a mask set: stage 0 with every class, or a DeepLabV3+ step) or with the configured
    backbone; returns the step folder. ``second_opinion``: a finished labels step (round 1's) whose scores settle
    the classes the labeler is in doubt about (a labeler with ``second_opinion``)."""
    node = cfg.labeler if node is None else node
    labeler = build(node)  # its constructor checks its settings before any work
    key: dict = {"labeler": method_settings(node), "splits": list(cfg.stage0.splits)}
    backbone = None
    if labeler.second_opinion and second_opinion is None:
        raise ValueError(f"labeler {labeler.name} settles its doubts with another labels step: give second_opinion")
    if second_opinion is not None:
        key["second_opinion"] = second_opinion.name
    if evidence is not None:
        key["evidence"] = evidence.name
    else:  # the labeler reads the pictures: with the diffusion backbone, or with a model of its own
        key |= {"data": dataset.key(), "resolution": cfg.zero_shot.resolution}
        if labeler.needs_backbone:
            backbone = build_backbone(cfg)
            labeler.require(backbone)
            key["diffusion"] = diffusion_key(cfg, backbone)
        else:
            key["model"] = labeler.identity()

    def compute(out: Path, key: dict, record: StepRecord) -> None:
        # rank 0 scores the images; the others wait, then read the labels
        distributed.on_main(lambda: _label(cfg, dataset, labeler, backbone, evidence, out, key, record, second_opinion))
        distributed.barrier()

    return STEP.run(cfg, key, [f for f in (evidence, second_opinion) if f is not None], compute)


#: how the labels step reads one image's evidence from a mask set, by what the labeler ``reads``
READERS = {
    "mask": lambda source, sid: np.array(Image.open(source.mask_path(sid))),  # (H, W) class ids
    "class_peaks": lambda source, sid: np.array(source.read_class_peaks(sid)),  # (K,) by class id
}


def candidates(dataset: DatasetDescription) -> list[int]:
    """The classes a labeler decides on: every class but the background."""
    return [c for c in range(len(dataset.class_names)) if c != dataset.background_index]


def _read_scores(dataset: DatasetDescription, path: Path) -> dict[int, float]:
    return {dataset.class_names.index(n): float(v) for n, v in json.loads(path.read_text()).items()}


def _write_scores(dataset: DatasetDescription, path: Path, scores: dict[int, float]) -> dict[int, float]:
    """Write one image's scores (whole or not at all); returns them as read back on a resumed run."""
    rounded = {c: round(float(v), 6) for c, v in scores.items()}
    write_json(path, {dataset.class_names[c]: v for c, v in rounded.items()})
    return rounded


def _score_split(cfg, dataset: DatasetDescription, scoring: tuple, split: str, folder: Path):
    """Every image's scores for ``split`` (those a previous run wrote are read back); returns (ids, scores).
    ``scoring``: the labeler, and the loaded backbone and its device, or the labeler's evidence folder."""
    labeler, backbone, device, evidence = scoring
    classes = candidates(dataset)
    if evidence is not None:
        source = MaskSetLayout(evidence / split)
        ids = [sid for sid in dataset.split_ids(split) if source.is_done(sid)]
    else:
        ids = dataset.split_ids(split)
    scores = {sid: _read_scores(dataset, folder / f"{sid}.json") for sid in ids if (folder / f"{sid}.json").exists()}
    todo = [sid for sid in ids if sid not in scores]
    if evidence is not None:
        for sid in todo:
            evidence_of = READERS[labeler.reads](source, sid)
            scores[sid] = _write_scores(dataset, folder / f"{sid}.json", labeler.scores(evidence_of, classes))
        return ids, scores
    names = [dataset.prompt_name(c) for c in classes]
    batch = max(1, int(cfg.data.batch_size))
    for start in range(0, len(todo), batch):
        images = dataset.prompted_images(split, todo[start : start + batch], cfg.zero_shot.resolution, predicted={})
        samples = [s for s in (images[i] for i in range(len(images))) if s is not None]  # bad input: skipped, counted
        if not samples:
            continue
        pixels = torch.stack([s.pixels for s in samples]).to(device)
        result = labeler.score_pictures(pixels, [s.id for s in samples], names, backbone).cpu()
        for s, row in zip(samples, result.tolist(), strict=True):
            scores[s.id] = _write_scores(dataset, folder / f"{s.id}.json", dict(zip(classes, row, strict=True)))
    return [sid for sid in ids if sid in scores], scores


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


def _label(cfg, dataset: DatasetDescription, labeler, backbone, evidence: Path | None, out: Path, key: dict,
           record: StepRecord, second_opinion: Path | None = None) -> None:  # fmt: skip
    splits, classes = {}, candidates(dataset)
    device = None
    if evidence is None:
        device = load_on_device(cfg, backbone) if backbone is not None else this_device(cfg)
        labeler.load(device)
    for split in cfg.stage0.splits:
        scoring = (labeler, backbone, device, evidence)
        ids, scores = _score_split(cfg, dataset, scoring, split, out / split / "scores")
        threshold = labeler.fit_threshold(list(scores.values()))
        labels = {sid: labeler.decide(scores[sid], threshold, dataset.has_background) for sid in ids}
        settled = None
        if second_opinion is not None:  # the classes in doubt, settled by round 1's scores of the same images
            first = {sid: _read_scores(dataset, path) for sid in ids
                     if (path := second_opinion / split / "scores" / f"{sid}.json").exists()}  # fmt: skip
            before = sum(map(len, labels.values()))
            labels, cuts = labeler.reconsider(scores, threshold, labels, first)
            settled = {"from": second_opinion.name, "cuts": cuts, "named": sum(map(len, labels.values())) - before}
            log.info("labels [%s]: %d classes in doubt named on %s's scores", split, settled["named"], second_opinion.name)
        empty = no_class_named(labeler, scores, threshold, labels, dataset.has_background)
        written = {"threshold": threshold, "labels": labels, **({"second_opinion": settled} if settled else {})}
        if labeler.confidences:  # a weight per named class: stage 0 lets the surer class win a contested pixel
            written["confidence"] = labeler.confidence(scores, labels)
        write_json(out / split / LABELS_FILE, written)
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
        log.info("labels [%s]: %d images, threshold %s, %d with no class named (%s); %s", split, len(ids),
                 describe_threshold(threshold), len(empty), "background only" if dataset.has_background else
                 "prompted for their top-scoring class", quality)  # fmt: skip
        unscored = len(dataset.split_ids(split)) - len(ids)  # unreadable (data.on_bad_input=skip) or not in the evidence
        splits[split] = {"metrics": metrics, "images": len(ids), "unscored": unscored, "threshold": threshold,
                         "no_class_named": len(empty), "named_on_second_opinion": settled and settled["named"]}  # fmt: skip
    finish_stage(out, key, splits)


def no_class_named(labeler, scores: dict, threshold, labels: dict[str, list[int]], has_background: bool) -> list[str]:
    """The images where no class reached its threshold (nor was named on a second opinion): prompted for nothing
    (background only), or, on a dataset without a background class, for their top-scoring class alone."""
    fallback = 0 if has_background else 1
    return [sid for sid, named in labels.items()
            if len(named) <= fallback and not labeler.decide(scores[sid], threshold, True)]  # fmt: skip


def read_label_files(folder: Path) -> tuple[dict[str, dict[str, list[int]]], dict[str, dict[str, dict[int, float]]]]:
    """A finished labels step's classes (split -> image id -> class ids) and its confidence in each named class where
    its labeler gives one (split -> image id -> class id -> confidence; empty for a split without), each
    ``labels.json`` read once."""
    labels, confidences = {}, {}
    for path in sorted(Path(folder).glob(f"*/{LABELS_FILE}")):
        written = json.loads(path.read_text())
        split = path.parent.name
        labels[split] = {sid: [int(c) for c in named] for sid, named in written["labels"].items()}
        confidences[split] = {sid: {int(c): float(v) for c, v in row.items()}
                              for sid, row in written.get("confidence", {}).items()}  # fmt: skip
    return labels, confidences


def read_confidences(folder: Path) -> dict[str, dict[str, dict[int, float]]]:
    """A finished labels step's confidence in each named class (:func:`read_label_files`)."""
    return read_label_files(folder)[1]


def read_labels(folder: Path) -> dict[str, dict[str, list[int]]]:
    """A finished labels step's classes: split -> image id -> class ids."""
    return read_label_files(folder)[0]
