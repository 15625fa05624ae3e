"""mIoU from a torchmetrics confusion matrix (ignore label 255)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from stableseg_pp.data.palette import IGNORE_INDEX


class SegmentationMetrics:
    """Accumulates a confusion matrix; reports per-class IoU and mIoU with and without background.

    Classes that appear neither in the ground truth nor in the predictions are
    left out of the mean (their IoU is undefined). ``sync``: sum the matrices of
    all ranks on compute (collective); off when one rank evaluates on its own.
    """

    def __init__(self, class_names: Sequence[str], background_index: int | None = 0, sync: bool = True):
        self.class_names = list(class_names)
        self.background_index = background_index
        self.confmat = MulticlassConfusionMatrix(num_classes=len(class_names), ignore_index=IGNORE_INDEX, sync_on_compute=sync)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred = torch.as_tensor(pred).long().flatten()
        target = torch.as_tensor(target).long().flatten()
        bad = (pred >= len(self.class_names)) & (pred != IGNORE_INDEX)
        if bad.any():
            raise ValueError(f"prediction holds class ids >= {len(self.class_names)}")
        pred = torch.where(pred == IGNORE_INDEX, torch.zeros_like(pred), pred)
        self.confmat.update(pred, target)

    def compute(self) -> dict:
        return scores_from_confusion(self.confmat.compute(), self.class_names, self.background_index)


def scores_from_confusion(confusion: torch.Tensor, class_names: Sequence[str], background_index: int | None) -> dict:
    """Per-class IoU, mIoU with and without background and pixel accuracy of a (target x prediction) confusion
    matrix; classes in neither the ground truth nor the predictions are left out of the means."""
    cm = torch.as_tensor(confusion).double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    per_class = {n: (None if torch.isnan(v) else float(v)) for n, v in zip(class_names, iou, strict=False)}
    keep = ~torch.isnan(iou)
    fg = keep.clone()
    if background_index is not None:
        fg[background_index] = False
    pixels = cm.sum()
    return {
        "miou": float(iou[keep].mean()) if keep.any() else float("nan"),
        "miou_without_background": float(iou[fg].mean()) if fg.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / pixels) if pixels > 0 else float("nan"),
        "per_class_iou": per_class,
        "pixels": int(pixels),
    }
