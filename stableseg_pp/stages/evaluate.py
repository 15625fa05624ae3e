"""mIoU of a written mask set against the dataset's ground truth."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from stableseg_pp.data.datasets import background_index, build_layout, protocol, split_ids
from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.evaluation.miou import SegmentationMetrics
from stableseg_pp.pipeline import distributed
from stableseg_pp.pipeline.run_dir import write_record
from stableseg_pp.pipeline.writers import PseudoMaskLayout, write_json
from stableseg_pp.tracking.base import StepRecord, read_metrics

log = logging.getLogger(__name__)


def evaluate_masks(data: DictConfig, split: str, ids: list[str], layout: PseudoMaskLayout) -> dict | None:
    """Metrics of the masks in ``layout`` for ``ids`` that have ground truth; None when none has.

    The protocol (background counted / ignored / none; oracle or all labels) is
    part of the result. Background ignored (e.g. VOC-20): ground-truth background
    pixels are left out and ``miou`` is the mean over the other classes.
    """
    dataset = build_layout(data)
    names = list(data.class_names)
    setting = protocol(data, split)
    bg = background_index(data)
    metrics = SegmentationMetrics(names, background_index=bg, sync=False)  # rank 0 reads every mask itself
    n = 0
    for sid in ids:
        if not layout.is_done(sid) or not dataset.has_mask(split, sid):
            continue
        gt = dataset.read_mask(split, sid, len(names))
        if setting["background"] == "ignored":
            gt = np.where(gt == bg, IGNORE_INDEX, gt).astype(np.uint8)
        pred = np.array(Image.open(layout.mask_path(sid)))
        metrics.update(torch.from_numpy(pred), torch.from_numpy(gt))
        n += 1
    if n == 0:
        return None
    result = metrics.compute()
    if setting["background"] == "ignored":
        result["miou"] = result["miou_without_background"]
    return {**result, "images": n, "labels": data.labels, "protocol": setting}


def report_split(stage: str, data: DictConfig, split: str, ids: list[str], layout: PseudoMaskLayout, **extra) -> dict:
    """Evaluate one split's masks and log the mIoU; returns the split's entry for the completion record."""
    metrics = evaluate_masks(data, split, ids, layout)
    if metrics:
        log.info("%s [%s]: mIoU %.4f (%s labels)", stage, split, metrics["miou"], metrics["labels"])
    return {"images": len(ids), **extra, "metrics": metrics}


def finish_stage(out: Path, key: dict, splits: dict[str, dict], **payload) -> Path:
    """Write ``metrics.json`` and, last, the completion record (call on rank 0)."""
    write_json(out / "metrics.json", {s: r["metrics"] for s, r in splits.items()})
    write_record(out, key, splits=splits, **payload)
    return out


def evaluate_and_finish(out: Path, key: dict, report: Callable[[], dict[str, dict]], **payload) -> Path:
    """Collective end of a stage: rank 0 evaluates (``report`` -> split entries) and writes the record; all wait.

    ``payload``: more entries for the completion record (e.g. timings).
    """
    distributed.barrier()  # every rank's files are written
    distributed.on_main(lambda: finish_stage(out, key, report(), world_size=distributed.world_size(), **payload))
    return out


def track_results(record: StepRecord, data: DictConfig, out: Path, mask_sets: dict[str, Path]) -> None:
    """Send a finished step's metrics and its val masks (``mask_sets``: name -> folder of val masks) to the tracker."""
    record.log_metrics(read_metrics(out))
    if mask_sets:
        record.log_masks(data, "val", split_ids(data, "val"), mask_sets)
