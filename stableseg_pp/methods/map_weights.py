"""Learning one weight per attention map (StableSeg++, docs/method.md, "Stage 2").

The weighted aggregate of stage 0's stored per-layer class maps, normalised and
given its background channel by stage 0's rule (methods/background.py), is fitted to
pseudo ground truth (the DeepLabV3+ predictions) with cross-entropy. No
diffusion forward is needed: the maps were stored by stage 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.methods.background import BackgroundRule
from stableseg_pp.methods.capm import minmax_normalize


@dataclass
class MapExample:
    """One image's stored maps, stacked at a common resolution, and its target."""

    maps: torch.Tensor  # (S, C, h, w): site maps of the image's C classes
    target: torch.Tensor  # (h, w) channel index (0 = background, c + 1 = class c), 255 = ignore


class AttentionMapWeights(torch.nn.Module):
    """Positive weights (softplus) over L maps, plus a temperature for the logits.

    Args:
        layer_names: the map ids, in the order of the examples' maps.
        background: stage 0's background rule (a constant channel: ``threshold`` or ``none``).
        init: the starting weights (default uniform).
    """

    def __init__(self, layer_names: Sequence[str], background: BackgroundRule | None = None, init: Sequence[float] | None = None):
        super().__init__()
        self.layer_names = list(layer_names)
        w0 = torch.tensor(init if init is not None else [1.0] * len(self.layer_names), dtype=torch.float32)
        self.raw = torch.nn.Parameter(torch.log(torch.expm1(w0.clamp(min=1e-3))))  # softplus^-1
        self.log_temperature = torch.nn.Parameter(torch.tensor(-2.0))
        self.background = background or BackgroundRule()
        self.background.prepend(torch.zeros(1, 1, 1, 1))  # a rule without a constant channel (word) fails here

    @property
    def weights(self) -> torch.Tensor:
        w = F.softplus(self.raw)
        return w / w.sum()

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, L, C, h, w) -> (B, 1 + C, h, w) logits (channel 0 = background)."""
        agg = torch.einsum("l,blchw->bchw", self.weights, maps)
        norm = minmax_normalize(agg)
        return self.background.prepend(norm, self.log_temperature.exp())

    def as_dict(self) -> dict[str, float]:
        return {n: float(w) for n, w in zip(self.layer_names, self.weights.detach(), strict=True)}


def _batches(examples: Sequence[MapExample], batch_size: int, generator: torch.Generator):
    order = torch.randperm(len(examples), generator=generator).tolist()
    # images with the same number of classes and size batch together
    groups: dict[tuple, list[int]] = {}
    for i in order:
        groups.setdefault(tuple(examples[i].maps.shape), []).append(i)
    for idx in groups.values():
        for s in range(0, len(idx), batch_size):
            chunk = [examples[i] for i in idx[s : s + batch_size]]
            yield torch.stack([e.maps for e in chunk]).float(), torch.stack([e.target for e in chunk]).long()


def fit_map_weights(
    examples: Sequence[MapExample],
    layer_names: Sequence[str],
    background: BackgroundRule | None = None,
    epochs: int = 30,
    lr: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[AttentionMapWeights, list[float]]:
    """Fit the map weights to the examples' targets; returns the model and the loss per epoch."""
    if not examples:
        raise ValueError("no examples to learn attention-map weights from")
    model = AttentionMapWeights(layer_names, background)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for maps, target in _batches(examples, batch_size, gen):
            if not (target != IGNORE_INDEX).any():
                continue  # nothing to learn from (e.g. only classes no channel stands for)
            loss = F.cross_entropy(model(maps), target, ignore_index=IGNORE_INDEX)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(maps)
            count += len(maps)
        history.append(total / max(count, 1))
    return model, history
