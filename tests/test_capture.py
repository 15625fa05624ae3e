"""The capture processors compute exactly what the stock processors compute, and the maps are right."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from stableseg_pp.diffusion.capture import (
    AttentionStore,
    CrossAttentionMapProcessor,
    SelfAttentionQKProcessor,
    stock_processors,
)
from stableseg_pp.models.stableseg import StableSeg


def _attention(cross_dim: int | None) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=32, cross_attention_dim=cross_dim, heads=4, dim_head=8).eval()


def test_cross_processor_matches_stock_and_softmax():
    attn = _attention(cross_dim=16)
    x = torch.randn(2, 6 * 5, 32)  # a 6x5 map
    ctx = torch.randn(2, 7, 16)
    stock = AttnProcessor2_0()(attn, x, encoder_hidden_states=ctx)
    store = AttentionStore()
    store.reset(torch.eye(7).expand(2, 7, 7), (6, 5))  # one "class" per token
    ours = CrossAttentionMapProcessor(store, "layer")(attn, x, encoder_hidden_states=ctx)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)

    # the stored map, recomputed independently: softmax(QK^T / sqrt(d)), mean over heads
    q = attn.to_q(x).view(2, -1, 4, 8).transpose(1, 2)
    k = attn.to_k(ctx).view(2, -1, 4, 8).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1).mean(1)  # (2, 30, 7)
    expected = probs.transpose(1, 2).reshape(2, 7, 6, 5)
    torch.testing.assert_close(store.cross["layer"], expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(store.cross["layer"].sum(1), torch.ones(2, 6, 5), atol=1e-5)


def test_cross_processor_averages_multi_token_classes():
    attn = _attention(cross_dim=16)
    x, ctx = torch.randn(1, 16, 32), torch.randn(1, 5, 16)
    store = AttentionStore()
    weights = torch.zeros(1, 5, 2)
    weights[0, 1, 0] = 1.0  # class 0: token 1
    weights[0, 2:4, 1] = 0.5  # class 1: tokens 2 and 3
    store.reset(weights, (4, 4))
    CrossAttentionMapProcessor(store, "l")(attn, x, encoder_hidden_states=ctx)
    q = attn.to_q(x).view(1, -1, 4, 8).transpose(1, 2)
    k = attn.to_k(ctx).view(1, -1, 4, 8).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1).mean(1)[0]  # (16, 5)
    torch.testing.assert_close(store.cross["l"][0, 0].flatten(), probs[:, 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(store.cross["l"][0, 1].flatten(), probs[:, 2:4].mean(1), rtol=1e-5, atol=1e-6)


def test_self_processor_matches_stock_and_keeps_qk():
    attn = _attention(cross_dim=None)
    x = torch.randn(2, 64, 32)
    stock = AttnProcessor2_0()(attn, x)
    store = AttentionStore()
    store.reset(None, (8, 8))
    ours = SelfAttentionQKProcessor(store, "s")(attn, x)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    q, k = store.self_qk["s"]
    assert q.shape == k.shape == (2, 4, 64, 8)  # features, never a 64x64 map
    torch.testing.assert_close(q, attn.to_q(x).view(2, -1, 4, 8).transpose(1, 2))
    torch.testing.assert_close(k, attn.to_k(x).view(2, -1, 4, 8).transpose(1, 2))


def test_unet_output_unchanged_by_capture(random_backbone):
    """A whole U-Net forward with StableSeg's processors equals the stock forward."""
    unet = random_backbone.unet
    torch.manual_seed(1)
    latents = torch.randn(2, 4, 16, 16)
    emb = torch.randn(2, 77, 64)
    t = torch.tensor([1, 1])
    unet.set_attn_processor(stock_processors(unet))
    with torch.no_grad():
        ref = unet(latents, t, encoder_hidden_states=emb).sample
    seg = StableSeg(random_backbone, resolution=64, cross_scales="all", self_scales="all", mode="ca+sa")
    seg.store.reset(torch.full((2, 77, 1), 1 / 77), (16, 16))
    with torch.no_grad():
        ours = unet(latents, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    n_cross = sum(".attn2." in n for n in unet.attn_processors)
    n_self = sum(".attn1." in n for n in unet.attn_processors)
    assert len(seg.store.cross) == n_cross and len(seg.store.self_qk) == n_self
    unet.set_attn_processor(stock_processors(unet))


def test_layers_without_maps_keep_the_fused_processor(random_backbone):
    seg = StableSeg(random_backbone, resolution=64, cross_scales=[8], stored_cross_scales=[8], mode="ca")
    procs = random_backbone.unet.attn_processors
    captured = {n for n, p in procs.items() if isinstance(p, CrossAttentionMapProcessor)}
    assert captured == {lay.name for lay in seg.cross_layers}
    assert all(lay.side(16) == 8 for lay in seg.cross_layers)
    others = [p for n, p in procs.items() if n not in captured]
    assert others and all(isinstance(p, AttnProcessor2_0) for p in others)
