"""CAPM: the cross-attention probability map, a weighted aggregate of per-layer class maps."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from stableseg_pp.runtime.errors import ConfigError


def aggregate_maps(maps: Mapping[str, torch.Tensor], weights: Mapping[str, float], size: tuple[int, int]) -> torch.Tensor:
    """Weighted mean of (B, C, h_l, w_l) maps, each upsampled (bilinear) to ``size``.

    Layers with weight 0 are skipped; the weights are normalised to sum to 1.
    """
    total = None
    norm = 0.0
    for name, w in weights.items():
        if w == 0:
            continue
        if name not in maps:
            raise KeyError(f"no captured map for layer {name!r}; captured: {sorted(maps)}")
        m = F.interpolate(maps[name].float(), size=size, mode="bilinear", align_corners=False)
        total = m * w if total is None else total + m * w
        norm += w
    if total is None:
        raise ConfigError("every cross-attention layer has weight 0: nothing to aggregate")
    return total / norm


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each (image, class) map to [0, 1] over its pixels."""
    flat = maps.flatten(2)
    lo = flat.min(dim=2, keepdim=True).values
    hi = flat.max(dim=2, keepdim=True).values
    return ((flat - lo) / (hi - lo + eps)).view_as(maps)
