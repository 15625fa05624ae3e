"""mIoU and boundary F-score of a written mask set against the dataset's ground truth, under the dataset's protocol.

Supervised protocol: the masks hold class ids. Unsupervised protocol (``data.protocol=unsupervised``): they hold
segment ids, matched to classes with the Hungarian algorithm over the split (:mod:`stableseg_pp.evaluation.hungarian`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stableseg_pp.artifacts import MaskSetLayout
from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.evaluation.boundary import BoundaryFScore
from stableseg_pp.evaluation.hungarian import UnsupervisedMetrics
from stableseg_pp.evaluation.miou import SegmentationMetrics

log = logging.getLogger(__name__)


def ground_truth(dataset: DatasetDescription, split: str, sid: str) -> np.ndarray | None:
    """An image's ground truth as the protocol scores it (background ignored: background pixels set to 255);
    None when it has none."""
    if not dataset.layout.has_mask(split, sid):
        return None
    gt = dataset.layout.read_mask(split, sid, len(dataset.class_names))
    if dataset.protocol(split)["background"] == "ignored":
        gt = np.where(gt == dataset.background_index, IGNORE_INDEX, gt).astype(np.uint8)
    return gt


def protocol_result(dataset: DatasetDescription, split: str, result: dict, images: int) -> dict:
    """A :class:`SegmentationMetrics` (or :class:`UnsupervisedMetrics`) result under the split's protocol (``miou``
    without background where the protocol ignores it), with the protocol written into it."""
    setting = dataset.protocol(split)
    if setting["background"] == "ignored":
        result["miou"] = result["miou_without_background"]
        if "miou_per_image_matching" in result:
            result["miou_per_image_matching"] = result["miou_without_background_per_image_matching"]
    return {**result, "images": images, "labels": dataset.labels, "protocol": setting}


def evaluate_masks(dataset: DatasetDescription, split: str, ids: list[str], masks: MaskSetLayout) -> dict | None:
    """Metrics of the masks in ``masks`` for ``ids`` that have ground truth; None when none has.

    The protocol (background counted / ignored / none; oracle or all labels;
    segments matched to classes) is part of the result. Background ignored (e.g.
    VOC-20): ground-truth background pixels are left out and ``miou`` is the mean
    over the other classes. Every result holds the boundary F-score
    (``boundary_f``, ``boundary_precision``, ``boundary_recall`` at
    ``boundary_tolerance_px``); the unsupervised protocol adds ``assignment``,
    ``segments`` and ``miou_per_image_matching``.
    """
    if dataset.protocol(split).get("segments") == "hungarian":
        metrics = UnsupervisedMetrics(dataset.class_names, background_index=dataset.background_index, per_image=True)
    else:
        metrics = SegmentationMetrics(dataset.class_names, background_index=dataset.background_index, sync=False)
    boundary = BoundaryFScore(dataset.boundary_tolerance)
    n = 0  # rank 0 reads every mask itself
    for sid in ids:
        if not masks.is_done(sid) or (gt := ground_truth(dataset, split, sid)) is None:
            continue
        pred = np.array(Image.open(masks.mask_path(sid)))
        metrics.update(torch.from_numpy(pred), torch.from_numpy(gt))
        boundary.update(pred, gt)
        n += 1
    if n == 0:
        return None
    return protocol_result(dataset, split, {**metrics.compute(), **boundary.compute()}, n)


#: what a run on pictures without masks says instead of a score
NO_GROUND_TRUTH = (
    "no ground truth to score against (to get a score, add a few labelled pictures: data.layout.val_images=<folder> "
    "data.layout.val_masks=<folder of <id>.png class ids>, docs/guide.md)"
)


def val_miou(step_folder: Path) -> float | None:
    """The val mIoU a step wrote to its ``metrics.json`` (None: no val split, no ground truth, or no metrics file)."""
    try:
        metrics = json.loads((Path(step_folder) / "metrics.json").read_text()).get("val")
    except (OSError, ValueError):
        return None
    return None if metrics is None else metrics.get("miou")


def report_split(step: str, dataset: DatasetDescription, split: str, ids: list[str], masks: MaskSetLayout, **extra) -> dict:
    """Evaluate one split's masks and log the mIoU; returns the split's entry for the completion record."""
    metrics = evaluate_masks(dataset, split, ids, masks)
    if metrics:
        log.info("%s [%s]: mIoU %.4f, boundary F %.4f at %s px (%s labels%s)", step, split, metrics["miou"],
                 metrics["boundary_f"], metrics["boundary_tolerance_px"], metrics["labels"],
                 ", segments Hungarian-matched" if "assignment" in metrics else "")  # fmt: skip
    elif split == "val" and ids:
        log.info("%s [val]: %d pictures, %s", step, len(ids), NO_GROUND_TRUTH)
    return {"images": len(ids), **extra, "metrics": metrics}
