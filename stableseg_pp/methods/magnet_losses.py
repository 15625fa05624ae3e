"""MAGNET's mask loss (Seg4Diff, docs/magnet.md): sigmoid focal + dice between attention logits and masks.

The logits are the grounding-expert block's pre-softmax image-to-text scores of
each class's tokens; a mask is 1 inside its class, 0 outside, and pixels that
are ignored (255 in the target) count for nothing. The focal loss is
torchvision's ``sigmoid_focal_loss``: the modulating factor ``(1 - p_t)^gamma``
uses the sigmoid probability ``p``, not the raw logit (the published MAGNET code
gets this wrong). When the prompt does not say which tokens go with which mask
(free captions, class-agnostic masks), predictions and masks are paired by
bipartite matching (``scipy.optimize.linear_sum_assignment``) on a focal + dice
cost, as in Mask2Former and Seg4Diff.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import sigmoid_focal_loss

PAIRINGS = ("prompt", "hungarian")


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss of (K, P) logits against (K, P) binary targets, the mean over the ``valid`` (P,) pixels
    of each mask, then over masks."""
    per_pixel = sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="none")
    weight = valid.to(logits.dtype)
    return ((per_pixel * weight).sum(-1) / weight.sum().clamp(min=1)).mean()


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 |p t| + s) / (|p| + |t| + s)`` per mask over the ``valid`` pixels (p = sigmoid(logits)), mean over masks."""
    weight = valid.to(logits.dtype)
    p = logits.sigmoid() * weight
    t = targets.to(logits.dtype) * weight
    return (1 - (2 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)).mean()


def pairwise_cost(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    focal_weight: float = 1.0,
    dice_weight: float = 1.0,
    smooth: float = 1.0,
) -> torch.Tensor:
    """(K, M) cost of pairing each of K predictions with each of M masks: the focal loss and the dice loss each
    pair would have (the same formulas as :func:`focal_loss` and :func:`dice_loss`), weighted."""
    x = logits.float()
    t = targets.float()
    w = valid.float()
    p = x.sigmoid()
    # focal loss of every pixel as if its target were 1 (pos) or 0 (neg), then summed against each mask
    ce_pos = torch.nn.functional.softplus(-x)
    ce_neg = torch.nn.functional.softplus(x)
    pos = alpha * (1 - p) ** gamma * ce_pos * w
    neg = (1 - alpha) * p**gamma * ce_neg * w
    focal = (pos @ t.T + neg @ (1 - t).T) / w.sum().clamp(min=1)
    pw, tw = p * w, t * w
    dice = 1 - (2 * pw @ tw.T + smooth) / (pw.sum(-1)[:, None] + tw.sum(-1)[None, :] + smooth)
    return focal_weight * focal + dice_weight * dice


def match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of the least-cost one-to-one pairing of a (K, M) cost matrix (min(K, M) pairs)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


@dataclass
class MaskLoss:
    """Focal and dice parts of the mask loss of one image (each a scalar tensor)."""

    focal: torch.Tensor
    dice: torch.Tensor


def mask_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    valid: torch.Tensor,
    pairing: str = "prompt",
    alpha: float = 0.25,
    gamma: float = 2.0,
    focal_weight: float = 0.1,
    dice_weight: float = 0.2,
) -> MaskLoss:
    """The mask loss of one image.

    Args:
        logits: (K, H, W) attention logits, one map per token group (class).
        masks: (M, H, W) binary masks; with ``pairing="prompt"`` mask i belongs to logits i (M == K).
        valid: (H, W) pixels that count (False where the target is ignored).
        pairing: ``prompt`` (the prompt fixes the pairs) or ``hungarian`` (bipartite matching on the weighted
            focal + dice cost).
        focal_weight / dice_weight: weights of the two parts in the matching cost (the loss weights).
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r} is not one of {PAIRINGS}")
    x = logits.flatten(1).float()
    t = masks.flatten(1).float()
    v = valid.flatten()
    if pairing == "prompt":
        if x.shape[0] != t.shape[0]:
            raise ValueError(f"pairing by prompt needs one mask per prediction: {x.shape[0]} predictions, {t.shape[0]} masks")
        rows = cols = torch.arange(x.shape[0])
    else:
        rows, cols = match(pairwise_cost(x, t, v, alpha, gamma, focal_weight, dice_weight))
    rows, cols = rows.to(x.device), cols.to(x.device)
    return MaskLoss(focal_loss(x[rows], t[cols], v, alpha, gamma), dice_loss(x[rows], t[cols], v))
