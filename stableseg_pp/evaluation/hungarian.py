"""The unsupervised protocol: class-agnostic segments matched to classes with the Hungarian algorithm.

A mask set holds segment ids 0..K-1 (e.g. k-means clusters, ids consistent
across the split) instead of class ids. As STEGO and DiffSeg report, a
(classes x segments) pixel confusion is accumulated over the split, segments
are matched one-to-one to classes maximising the matched pixels
(``scipy.optimize.linear_sum_assignment``; a rectangular matrix is fine), the
segments are renamed to their classes and mIoU / pixel accuracy follow as in the
supervised protocol. Unmatched segments (more segments than classes) and 255
in a prediction (no segment) are wrong wherever the ground truth is labelled.
The per-image variant (DiffSeg) matches within each image, then accumulates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.evaluation.miou import scores_from_confusion

NO_SEGMENT = IGNORE_INDEX  # a prediction's 255: the pixel belongs to no segment


def match_segments(confusion: np.ndarray | torch.Tensor) -> dict[int, int]:
    """Segment -> class of the one-to-one matching of a (classes x segments) pixel confusion that maximises the
    matched pixels; with more segments than classes some segments stay unmatched (and vice versa)."""
    cm = np.asarray(torch.as_tensor(confusion).cpu().numpy() if isinstance(confusion, torch.Tensor) else confusion)
    if cm.ndim != 2:
        raise ValueError(f"confusion must be (classes x segments), got shape {cm.shape}")
    if cm.size == 0:
        return {}
    classes, segments = linear_sum_assignment(cm, maximize=True)
    return {int(s): int(c) for c, s in zip(classes, segments, strict=True)}


def _as_array(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def segment_confusion(pred: np.ndarray, target: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One image's (classes x segments) pixel counts over its labelled pixels (K = its largest segment id + 1),
    and per class the labelled pixels predicted as no segment (255)."""
    pred, target = _as_array(pred).astype(np.int64).ravel(), _as_array(target).astype(np.int64).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"prediction ({pred.size} pixels) and ground truth ({target.size} pixels) differ in size")
    if (pred < 0).any():
        raise ValueError("prediction holds negative segment ids")
    labelled = target != IGNORE_INDEX
    if (target[labelled] >= num_classes).any() or (target[labelled] < 0).any():
        raise ValueError(f"ground truth holds class ids outside 0..{num_classes - 1}")
    segment = pred != NO_SEGMENT
    segments = int(pred[segment].max()) + 1 if segment.any() else 0
    both = labelled & segment
    confusion = np.bincount(target[both] * segments + pred[both], minlength=num_classes * segments)
    confusion = confusion.reshape(num_classes, segments)
    unassigned = np.bincount(target[labelled & ~segment], minlength=num_classes)
    return confusion.astype(np.int64), unassigned.astype(np.int64)


def remap_confusion(confusion: np.ndarray, unassigned: np.ndarray, assignment: dict[int, int]) -> np.ndarray:
    """(classes x (classes + 1)) confusion after renaming every segment to its class; the last column holds the
    pixels of unmatched segments and of no segment (wrong wherever they fall)."""
    num_classes, segments = confusion.shape
    columns = np.array([assignment.get(s, num_classes) for s in range(segments)], dtype=np.int64)
    out = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    np.add.at(out.T, columns, confusion.T)
    out[:, num_classes] += unassigned
    return out


def scores_with_unmatched(remapped: np.ndarray, class_names: Sequence[str], background_index: int | None) -> dict:
    """:func:`scores_from_confusion` of a (classes x (classes + 1)) remapped confusion: the extra column counts
    as nobody's prediction (its pixels are false negatives of their class and false positives of none)."""
    num_classes = len(class_names)
    square = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    square[:num_classes] = remapped
    scores = scores_from_confusion(torch.from_numpy(square), [*class_names, "(no class)"], background_index)
    # the extra class has no ground truth: its IoU is 0 or undefined; the means are over the real classes only
    per_class = {n: scores["per_class_iou"][n] for n in class_names}
    kept = [v for v in per_class.values() if v is not None]
    fg = [v for i, v in enumerate(per_class.values()) if v is not None and i != background_index]
    scores["per_class_iou"] = per_class
    scores["miou"] = float(np.mean(kept)) if kept else math.nan
    scores["miou_without_background"] = float(np.mean(fg)) if fg else math.nan
    return scores


class UnsupervisedMetrics:
    """mIoU of class-agnostic segment masks after Hungarian matching of segments to classes over the split.

    ``compute()`` returns what :class:`~stableseg_pp.evaluation.miou.SegmentationMetrics` returns (``miou``,
    ``miou_without_background``, ``pixel_accuracy``, ``per_class_iou``, ``pixels``) under the split-level
    matching, plus ``assignment`` (segment -> class name) and ``segments`` (K, the largest segment id seen + 1).

    Args:
        class_names: evaluation names; class id = position.
        background_index: the class that means "no object", or None.
        per_image: also match within each image and accumulate the renamed confusions (DiffSeg's protocol),
            reported as ``miou_per_image_matching``, ``miou_without_background_per_image_matching`` and
            ``pixel_accuracy_per_image_matching``.
    """

    def __init__(self, class_names: Sequence[str], background_index: int | None = 0, per_image: bool = False):
        self.class_names = list(class_names)
        self.background_index = background_index
        self.per_image = per_image
        n = len(self.class_names)
        self.confusion = np.zeros((n, 0), dtype=np.int64)
        self.unassigned = np.zeros(n, dtype=np.int64)
        self.per_image_confusion = np.zeros((n, n + 1), dtype=np.int64)
        self.segments = 0

    def update(self, pred_segments: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Add one image: (H, W) segment ids (255 = no segment) and its ground truth (class ids, 255 = ignore)."""
        confusion, unassigned = segment_confusion(pred_segments, target, len(self.class_names))
        pred = _as_array(pred_segments)
        seen = pred[pred != NO_SEGMENT]
        self.segments = max(self.segments, int(seen.max()) + 1 if seen.size else 0)
        if confusion.shape[1] > self.confusion.shape[1]:
            self.confusion = np.pad(self.confusion, ((0, 0), (0, confusion.shape[1] - self.confusion.shape[1])))
        self.confusion[:, : confusion.shape[1]] += confusion
        self.unassigned += unassigned
        if self.per_image:
            self.per_image_confusion += remap_confusion(confusion, unassigned, match_segments(confusion))

    def assignment(self) -> dict[int, int]:
        """The split-level matching: segment id -> class id."""
        return match_segments(self.confusion)

    def compute(self) -> dict:
        assignment = self.assignment()
        remapped = remap_confusion(self.confusion, self.unassigned, assignment)
        result = scores_with_unmatched(remapped, self.class_names, self.background_index)
        result["assignment"] = {s: self.class_names[c] for s, c in sorted(assignment.items())}
        result["segments"] = self.segments
        if self.per_image:
            each = scores_with_unmatched(self.per_image_confusion, self.class_names, self.background_index)
            result["miou_per_image_matching"] = each["miou"]
            result["miou_without_background_per_image_matching"] = each["miou_without_background"]
            result["pixel_accuracy_per_image_matching"] = each["pixel_accuracy"]
        return result
