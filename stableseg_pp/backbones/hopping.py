"""The hopping mask (Zhao et al.; README "References"; independent form): several prompts through a text encoder in one pass.

Prompts are packed one after another into rows of the encoder's length; the
attention mask ``M[i, j] = 1`` iff ``P(i) == P(j)`` (and ``j <= i`` for a causal
encoder such as CLIP) keeps them independent, and position ids restart at each
prompt, so every prompt's hidden states equal those of its own pass. Twenty
class prompts of about eight tokens fill three CLIP rows instead of twenty
rows of 77 (``python -m stableseg_pp.bench hopping``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedPrompts:
    """Token rows holding several prompts each, and where each prompt lies.

    Args:
        input_ids: (R, L) token ids (pad id after the last prompt of a row).
        position_ids: (R, L) positions restarting at 0 for each prompt.
        attention_mask: (R, 1, L, L) boolean hopping mask (True = may attend).
        spans: per prompt, (row, start, length).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    spans: list[tuple[int, int, int]]


def pack_prompts(token_lists: Sequence[Sequence[int]], length: int, pad_id: int, causal: bool) -> PackedPrompts:
    """Pack tokenised prompts (in order, first fit) into rows of ``length`` tokens with their hopping mask."""
    rows: list[list[int]] = []
    segments: list[list[int]] = []
    spans = []
    for tokens in token_lists:
        if len(tokens) > length:
            raise ValueError(f"a prompt of {len(tokens)} tokens does not fit the text encoder's {length}")
        if not rows or len(rows[-1]) + len(tokens) > length:
            rows.append([])
            segments.append([])
        spans.append((len(rows) - 1, len(rows[-1]), len(tokens)))
        segments[-1].extend([len(spans) - 1] * len(tokens))
        rows[-1].extend(tokens)
    n = len(rows)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    positions = torch.zeros((n, length), dtype=torch.long)
    # padding gets its own negative segment per position: it attends to itself only (no empty softmax rows)
    segment = -1 - torch.arange(length).repeat(n, 1)
    for r, (row, seg) in enumerate(zip(rows, segments, strict=True)):
        ids[r, : len(row)] = torch.tensor(row)
        segment[r, : len(seg)] = torch.tensor(seg)
    for row, start, size in spans:
        positions[row, start : start + size] = torch.arange(size)
    mask = segment[:, :, None] == segment[:, None, :]
    if causal:
        mask &= torch.ones(length, length, dtype=torch.bool).tril()
    return PackedPrompts(ids, positions, mask[:, None], spans)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean hopping mask as an additive float mask (0 or the dtype's minimum), which every attention
    implementation of transformers' text encoders (eager and SDPA) applies the same way."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def encode_packed(
    encoder: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Sequence[torch.Tensor]],
    token_lists: Sequence[Sequence[int]],
    length: int,
    pad_id: int,
    causal: bool,
    device: torch.device | str,
) -> list[list[torch.Tensor]]:
    """Run ``encoder(input_ids, position_ids, attention_mask) -> [(R, L, D) tensors]`` once on the packed prompts;
    returns, per prompt, its slice (n_tokens, D) of each output."""
    packed = pack_prompts(token_lists, length, pad_id, causal)
    outputs = encoder(packed.input_ids.to(device), packed.position_ids.to(device), packed.attention_mask.to(device))
    return [[out[row, start : start + size] for out in outputs] for row, start, size in packed.spans]
