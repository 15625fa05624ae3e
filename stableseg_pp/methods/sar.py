"""SAR: self-attention refinement (StableSeg; docs/method.md, "Stage 0", step 4).

For each self-attention layer, the mean Key vector of each class region of the
CA map becomes a "class vector"; ``softmax(Q . classvec^T / sqrt(d))`` over the
classes gives one probability per class per pixel. Cost O(HW x classes): the
HW x HW self-attention map is never formed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def sar_layer(q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """SAPM of one layer.

    q, k: (B, heads, N, d) with N = h * w; labels: (B, h, w) class index per
    pixel of the CA map resized to this layer; valid: (B, K) classes that may be
    predicted. Returns (B, K, h, w) probabilities (head mean).
    """
    b, heads, n, d = q.shape
    n_classes = valid.shape[1]
    onehot = F.one_hot(labels.flatten(1).long(), n_classes).to(k.dtype)  # (B, N, K)
    counts = onehot.sum(dim=1)  # (B, K)
    class_vec = torch.einsum("bnk,bhnd->bhkd", onehot, k) / counts.clamp(min=1)[:, None, :, None]
    logits = torch.einsum("bhnd,bhkd->bhnk", q, class_vec).float() * d**-0.5
    present = (counts > 0) & valid
    logits = logits.masked_fill(~present[:, None, None, :], float("-inf"))
    probs = logits.softmax(dim=-1).mean(dim=1)  # (B, N, K)
    h, w = labels.shape[-2:]
    return probs.transpose(1, 2).reshape(b, n_classes, h, w)


def sar_probabilities(
    qk: Iterable[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]],
    ca_labels: torch.Tensor,
    valid: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """Mean SAPM over layers, each upsampled (bilinear) to ``size``.

    qk yields (q, k, (h, w)) per self-attention layer; ca_labels is the CA map
    (B, H, W) at any resolution (resized to each layer by nearest neighbour).
    """
    total = None
    count = 0
    for q, k, (h, w) in qk:
        labels = F.interpolate(ca_labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        p = sar_layer(q, k, labels, valid)
        p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
        total = p if total is None else total + p
        count += 1
    if total is None:
        raise ValueError("SAR needs at least one self-attention layer; check self_scales")
    return total / count
