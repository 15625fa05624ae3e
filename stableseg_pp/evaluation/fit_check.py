"""Did a trained segmenter learn its pseudo-masks? A loud warning when it did not.

A DeepLabV3+ trained too briefly or at the wrong size ends below the masks it was trained on, and the pipeline
would announce it as its result. With ground truth: its val mIoU against that of its training masks. Without:
how well it agrees with its training masks on the train pictures, against how well those masks agree with the
masks they were refined from (the pseudo-labels' own agreement between steps).
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
from stableseg_pp.evaluation.mask_sets import val_miou
from stableseg_pp.evaluation.miou import SegmentationMetrics

log = logging.getLogger(__name__)
TOLERANCE = 0.005  # half a point of mIoU: closer than this is a tie, not a warning
SAMPLE = 1000  # pictures compared at most (evenly spread) for the agreement without ground truth
ADVICE = (
    "it has not learned them; the usual causes are a training too short or at the wrong size for these pictures "
    "(docs/guide.md, 'Training on your own data': segmenter.train.iterations, crop_size)"
)


def agreement(dataset: DatasetDescription, ids: list[str], masks: MaskSetLayout, reference: MaskSetLayout) -> float | None:
    """mIoU of ``masks`` taking ``reference`` as the truth, over the ids both hold (None: none)."""
    metrics = SegmentationMetrics(dataset.class_names, background_index=dataset.background_index, sync=False)
    step = max(1, len(ids) // SAMPLE)
    n = 0
    for sid in ids[::step]:
        if masks.is_done(sid) and reference.is_done(sid):
            pred = np.array(Image.open(masks.mask_path(sid)))
            ref = np.array(Image.open(reference.mask_path(sid)))
            metrics.update(torch.from_numpy(pred), torch.from_numpy(ref))
            n += 1
    return float(metrics.compute()["miou"]) if n else None


def _source_of(masks_dir: Path) -> Path | None:
    """The folder a refined mask set was refined from (its key's ``input``), when it is a mask set of this run."""
    try:
        source = json.loads((masks_dir / "key.json").read_text()).get("input")
    except (OSError, ValueError):
        return None
    folder = masks_dir.parent / str(source) if source else None
    return folder if folder is not None and (folder / "train").is_dir() else None


def check_segmenter_fit(dataset: DatasetDescription, segmenter_dir: Path, masks_dir: Path, segmenter_miou: float | None) -> dict:
    """The comparison for a finished training (``segmenter_miou``: its val mIoU, None without ground truth); ``warning``
    holds the one-line warning, or None."""
    masks_miou = val_miou(masks_dir)
    if segmenter_miou is not None and masks_miou is not None:
        result = {"basis": "val mIoU", "segmenter": segmenter_miou, "training_masks": masks_miou}
        below = segmenter_miou < masks_miou - TOLERANCE
        text = f"scores {100 * segmenter_miou:.1f} val mIoU, below the {100 * masks_miou:.1f} of the pseudo-masks it trained on"
    else:
        ids = dataset.split_ids("train")
        fit = agreement(dataset, ids, MaskSetLayout(segmenter_dir / "train"), MaskSetLayout(masks_dir / "train"))
        source = _source_of(masks_dir)
        steps = agreement(dataset, ids, MaskSetLayout(masks_dir / "train"), MaskSetLayout(source / "train")) if source else None
        result = {"basis": "train agreement (no ground truth)", "segmenter": fit, "training_masks": steps}
        below = fit is not None and steps is not None and fit < steps - TOLERANCE
        text = (f"agrees with its training pseudo-masks at {100 * (fit or 0):.1f} mIoU, less than those masks agree "
                f"with the masks they were refined from ({100 * (steps or 0):.1f})")  # fmt: skip
    result["warning"] = f"DeepLabV3+ {segmenter_dir.name} {text}: {ADVICE}" if below else None
    if below:
        log.warning("WARNING: %s", result["warning"])
    return result
