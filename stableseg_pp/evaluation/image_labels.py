"""Image-level label quality: which classes a labeler said are in each image, against the ground truth's classes.

Per class precision, recall and F1 (a class never present and never predicted
has no entry), their means over the classes that occur, and, where the labeler
gives scores, mean average precision (torchmetrics, over the classes present
in at least one image).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import multilabel_average_precision


def label_metrics(truth: np.ndarray, predicted: np.ndarray, class_names: Sequence[str], scores: np.ndarray | None = None) -> dict:
    """(N, K) bool ``truth`` and ``predicted`` (and optional (N, K) float ``scores``) -> the metrics entry.

    Args:
        truth: which classes the ground truth holds, per image.
        predicted: which classes the labeler named, per image.
        class_names: the K classes' names (the keys of the per-class entries).
        scores: the labeler's score per image and class (higher = more likely present), for mAP.
    """
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    tp = (truth & predicted).sum(0)
    fp = (~truth & predicted).sum(0)
    fn = (truth & ~predicted).sum(0)
    per_class, f1s, precisions, recalls = {}, [], [], []
    for k, name in enumerate(class_names):
        if tp[k] + fp[k] + fn[k] == 0:
            continue  # never present, never named: nothing to score
        precision = tp[k] / (tp[k] + fp[k]) if tp[k] + fp[k] else 0.0
        recall = tp[k] / (tp[k] + fn[k]) if tp[k] + fn[k] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "images": int(truth[:, k].sum()), "named": int(predicted[:, k].sum())}  # fmt: skip
        f1s.append(f1)
        precisions.append(precision)
        recalls.append(recall)
    result = {
        "images": int(len(truth)),
        "mean_f1": float(np.mean(f1s)) if f1s else None,
        "mean_precision": float(np.mean(precisions)) if precisions else None,
        "mean_recall": float(np.mean(recalls)) if recalls else None,
        "exact_images": float((truth == predicted).all(1).mean()) if len(truth) else None,
        "per_class": per_class,
        "map": None,
    }
    occurring = truth.any(0)
    if scores is not None and occurring.any():
        ap = multilabel_average_precision(
            torch.as_tensor(np.asarray(scores, np.float32)[:, occurring]),
            torch.as_tensor(truth[:, occurring].astype(np.int64)),
            num_labels=int(occurring.sum()),
            average=None,
        )
        result["map"] = float(ap.mean())
    return result
