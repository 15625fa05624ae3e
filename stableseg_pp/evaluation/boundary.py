"""Boundary F-score of label maps (Csurka et al. 2013; the DAVIS F measure), class-agnostic, ignore label 255.

A label map's boundary pixels are the pixels with a 4-neighbour of another label.
Ground truth: a boundary pixel is a labelled (non-255) pixel with a differing
neighbour, so the pixels along a 255 band are boundaries and the band itself is
not. Prediction: its boundary pixels on ground-truth 255 pixels are not counted
(they still serve as the predicted edge a ground-truth boundary pixel can be
matched to). A boundary pixel is matched when it lies within ``tolerance``
pixels (Euclidean) of a boundary pixel of the other side. Counts are summed
over the split before precision, recall and F are taken.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from stableseg_pp.data.palette import IGNORE_INDEX


def boundary_pixels(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of ``labels`` that have a 4-neighbour of a different label (any label, 255 too)."""
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, dtype=bool)
    horizontal = labels[:, 1:] != labels[:, :-1]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    vertical = labels[1:, :] != labels[:-1, :]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    return edge


def _distance_to(edge: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest ``edge`` pixel (inf everywhere when there is none)."""
    if not edge.any():
        return np.full(edge.shape, np.inf)
    return distance_transform_edt(~edge)


def boundary_counts(pred: np.ndarray, target: np.ndarray, tolerance: float, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """One image's counts ``[matched predicted, counted predicted, matched ground truth, ground truth]``
    boundary pixels (int64)."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"prediction {pred.shape} and ground truth {target.shape} must be (H, W) maps of one size")
    labelled = target != ignore_index
    gt_edge = boundary_pixels(target) & labelled
    pred_edge = boundary_pixels(pred)
    counted = pred_edge & labelled
    if not gt_edge.any() and not counted.any():
        return np.zeros(4, dtype=np.int64)
    pred_hits = counted & (_distance_to(gt_edge) <= tolerance)
    gt_hits = gt_edge & (_distance_to(pred_edge) <= tolerance)
    return np.array([pred_hits.sum(), counted.sum(), gt_hits.sum(), gt_edge.sum()], dtype=np.int64)


def scores_from_counts(counts: np.ndarray, tolerance: float) -> dict:
    """Precision, recall and F of summed :func:`boundary_counts`; NaN when neither side has a boundary pixel.

    One side without (counted) boundary pixels: its ratio is 1 (nothing of it is wrong), as DAVIS scores it; the
    other side's is then 0 wherever the first has no edge at all, so F = 0.
    """
    matched_pred, pred, matched_gt, gt = (int(c) for c in counts)
    if pred == 0 and gt == 0:
        precision = recall = f = math.nan
    else:
        precision = matched_pred / pred if pred else 1.0
        recall = matched_gt / gt if gt else 1.0
        f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "boundary_f": f,
        "boundary_precision": precision,
        "boundary_recall": recall,
        "boundary_tolerance_px": tolerance,
    }


class BoundaryFScore:
    """Accumulates the boundary counts of a split's images; reports the split's boundary F-score.

    Class-agnostic: works on class ids and on segment ids alike.

    Args:
        tolerance: how far (pixels, Euclidean) a boundary pixel may lie from the other side's boundary and still
            match; 0 asks for the same pixel.
        ignore_index: the ground-truth label of pixels left out (their predicted boundaries are not counted).
    """

    def __init__(self, tolerance: float = 2, ignore_index: int = IGNORE_INDEX):
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not tolerance >= 0:
            raise ValueError(f"boundary tolerance must be a non-negative number of pixels, got {tolerance!r}")
        self.tolerance = tolerance
        self.ignore_index = ignore_index
        self.counts = np.zeros(4, dtype=np.int64)

    def reset(self) -> None:
        self.counts[:] = 0

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Add one image: (H, W) predicted labels and ground truth (255 = ignore)."""
        if isinstance(pred, torch.Tensor):
            pred = pred.cpu().numpy()
        if isinstance(target, torch.Tensor):
            target = target.cpu().numpy()
        self.counts += boundary_counts(pred, target, self.tolerance, self.ignore_index)

    def compute(self) -> dict:
        """``boundary_f``, ``boundary_precision``, ``boundary_recall`` and ``boundary_tolerance_px``."""
        return scores_from_counts(self.counts, self.tolerance)
