"""Attention-capture processors for diffusers ``Attention`` layers (the ``AttnProcessor2_0`` path).

Installed with ``set_attn_processor`` by a backbone on the sites whose maps are needed;
every other layer keeps the stock fused processor. Maps are reduced as they
are produced:

* cross-attention: ``softmax(QK^T / sqrt(d))`` averaged over heads and
  multiplied by a (tokens x classes) weight matrix -> one map per class, so a
  layer costs HW x classes, never HW x 77 x heads;
* self-attention: only the head-split Query and Key features are kept (for
  SAR, which needs O(HW x classes)); the output uses the fused kernel and no
  HW x HW map is ever formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from stableseg_pp.backbones.attention_math import finish, project
from stableseg_pp.backbones.base import AttentionStore


def _probabilities(attn: Attention, q: torch.Tensor, k: torch.Tensor, mask) -> torch.Tensor:
    """softmax(QK^T * scale (+ mask)), explicitly: for the layers whose maps are needed."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1)


class _CaptureProcessor:
    """Shared call path: project as the stock processor does, ``attend``, then finish as it does."""

    needs_context = False  # True for processors that only make sense on cross-attention layers

    def __init__(self, store, name: str):
        self.store = store
        self.name = name

    def attend(self, attn: Attention, q, k, v, mask) -> torch.Tensor:
        raise NotImplementedError

    def __call__(
        self,
        attn: Attention,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        if self.needs_context and encoder_hidden_states is None:
            raise ValueError(f"{self.name}: {type(self).__name__} installed on a self-attention layer")
        q, k, v, mask, residual, shape = project(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return finish(attn, self.attend(attn, q, k, v, mask), q, residual, shape)


class CrossAttentionMapProcessor(_CaptureProcessor):
    """Cross-attention that also records the head-mean probability map of each class.

    The probabilities are computed once and reused for the output, so the layer
    costs one explicit softmax instead of the fused kernel.
    """

    store: AttentionStore
    needs_context = True

    def __init__(self, store: AttentionStore, name: str, per_head: bool = False):
        super().__init__(store, name)
        self.per_head = per_head  # also keep each head's class maps (store.cross_heads)

    def attend(self, attn, q, k, v, mask):
        probs = _probabilities(attn, q, k, mask)
        weights = self.store.token_weights
        if weights is not None:
            weights = weights.to(probs.device, torch.float32)
            mean = probs.mean(dim=1)  # (B, N, T)
            per_class = torch.bmm(mean.float(), weights)  # (B, N, C)
            h, w = self.store.map_shape(mean.shape[1])
            self.store.cross[self.name] = per_class.transpose(1, 2).reshape(mean.shape[0], -1, h, w)
            if self.per_head:
                heads = torch.einsum("bhnt,btc->bhcn", probs.float(), weights)
                self.store.cross_heads[self.name] = heads.reshape(*heads.shape[:3], h, w)
        return torch.matmul(probs, v)


class SelfAttentionQKProcessor(_CaptureProcessor):
    """Fused self-attention that keeps the Query and Key features for SAR."""

    store: AttentionStore

    def attend(self, attn, q, k, v, mask):
        self.store.self_qk[self.name] = (q.detach(), k.detach())  # in the model's dtype (float16 on GPU)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


class FullAttentionStoreProcessor(_CaptureProcessor):
    """The naive 'attention store' (as in prompt-to-prompt): keeps every head-mean
    probability map, self-attention's HW x HW ones included. Only for the benchmark."""

    store: dict[str, torch.Tensor]

    def attend(self, attn, q, k, v, mask):
        probs = _probabilities(attn, q, k, mask)
        self.store[self.name] = probs.mean(dim=1)
        return torch.matmul(probs, v)
