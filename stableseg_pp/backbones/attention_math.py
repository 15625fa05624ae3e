"""The stock ``AttnProcessor2_0`` computation, split around the attention itself.

Every processor of the ``Attention`` path (capture, EmerDiff's modulation)
replaces only the step between :func:`project` and :func:`finish`, so its
output equals the stock processor's wherever it does not change the attention.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention


def project(attn: Attention, hidden_states, encoder_hidden_states, attention_mask, temb):
    """Q, K, V split into heads, exactly as ``AttnProcessor2_0`` computes them."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_shape = hidden_states.shape
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, attention_mask, residual, input_shape


def finish(
    attn: Attention, out: torch.Tensor, query: torch.Tensor, residual, input_shape, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """Output projection, reshape and residual, as ``AttnProcessor2_0`` does; ``offset`` (B, N) is added to every
    channel of the projected output (EmerDiff's modulation)."""
    b, heads, n, d = out.shape
    out = out.transpose(1, 2).reshape(b, n, heads * d).to(query.dtype)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if offset is not None:
        out = out + offset.to(out.dtype)[:, :, None]
    if len(input_shape) == 4:
        out = out.transpose(-1, -2).reshape(*input_shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor
