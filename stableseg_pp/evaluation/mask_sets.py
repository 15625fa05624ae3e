"""mIoU of a written mask set against the dataset's ground truth, under the dataset's protocol."""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from stableseg_pp.artifacts import MaskSetLayout
from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.evaluation.miou import SegmentationMetrics

log = logging.getLogger(__name__)


def evaluate_masks(dataset: DatasetDescription, split: str, ids: list[str], masks: MaskSetLayout) -> dict | None:
    """Metrics of the masks in ``masks`` for ``ids`` that have ground truth; None when none has.

    The protocol (background counted / ignored / none; oracle or all labels) is
    part of the result. Background ignored (e.g. VOC-20): ground-truth background
    pixels are left out and ``miou`` is the mean over the other classes.
    """
    layout = dataset.layout
    names = dataset.class_names
    setting = dataset.protocol(split)
    bg = dataset.background_index
    metrics = SegmentationMetrics(names, background_index=bg, sync=False)  # rank 0 reads every mask itself
    n = 0
    for sid in ids:
        if not masks.is_done(sid) or not layout.has_mask(split, sid):
            continue
        gt = layout.read_mask(split, sid, len(names))
        if setting["background"] == "ignored":
            gt = np.where(gt == bg, IGNORE_INDEX, gt).astype(np.uint8)
        pred = np.array(Image.open(masks.mask_path(sid)))
        metrics.update(torch.from_numpy(pred), torch.from_numpy(gt))
        n += 1
    if n == 0:
        return None
    result = metrics.compute()
    if setting["background"] == "ignored":
        result["miou"] = result["miou_without_background"]
    return {**result, "images": n, "labels": dataset.labels, "protocol": setting}


def report_split(step: str, dataset: DatasetDescription, split: str, ids: list[str], masks: MaskSetLayout, **extra) -> dict:
    """Evaluate one split's masks and log the mIoU; returns the split's entry for the completion record."""
    metrics = evaluate_masks(dataset, split, ids, masks)
    if metrics:
        log.info("%s [%s]: mIoU %.4f (%s labels)", step, split, metrics["miou"], metrics["labels"])
    return {"images": len(ids), **extra, "metrics": metrics}
