"""The capture processors compute exactly what the stock processors compute, and the maps are right."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from stableseg_pp.backbones.base import AttentionStore, CaptureRequest, DiffusionBackbone, ModulationState
from stableseg_pp.backbones.capture import CrossAttentionMapProcessor, SelfAttentionQKProcessor
from stableseg_pp.methods.stableseg import StableSeg


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


def test_backbone_forward_unchanged_by_capture(random_backbone):
    """A whole denoiser forward through the backbone interface with StableSeg's processors equals the stock forward."""
    backbone: DiffusionBackbone = random_backbone
    assert isinstance(backbone, DiffusionBackbone)
    torch.manual_seed(1)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    text = backbone.encode_text([["circle"], ["square", "star"]], "a photo of a {}", " and ")
    latents, time = backbone.noise(backbone.encode_images(pixels))
    backbone.remove_capture()
    with torch.no_grad():
        ref = backbone.denoise(latents, time, text)
    seg = StableSeg(backbone, resolution=64, cross_scales="all", self_scales="all", mode="ca+sa")
    seg.store.reset(text.token_weights, tuple(latents.shape[-2:]))
    with torch.no_grad():
        ours = backbone.denoise(latents, time, text)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    sites = backbone.sites(64)
    assert set(seg.store.cross) == {s.id for s in sites if s.kind == "cross"}
    assert set(seg.store.self_qk) == {s.id for s in sites if s.kind == "self"}
    backbone.remove_capture()


def test_sites_come_from_the_block_structure(random_backbone):
    """Kinds from the attention modules, grids from the block level, depth = forward order (down, mid, up)."""
    sites = random_backbone.sites(64)  # 16x16 latent
    assert [s.depth for s in sites] == list(range(len(sites)))
    for s in sites:
        module = random_backbone.unet.get_submodule(s.id)
        assert (s.kind == "cross") == module.is_cross_attention
        assert s.attends_to_text == (s.kind == "cross") and s.attends_to_image == (s.kind == "self")
    order = [s.id.split(".")[0] for s in sites]
    assert order == sorted(order, key=["down_blocks", "mid_block", "up_blocks"].index)
    mid = [s for s in sites if s.id.startswith("mid_block")]
    assert mid and all(s.grid == (4, 4) for s in mid)  # the coarsest level of a 3-level U-Net
    assert {s.grid for s in sites if s.id.startswith("down_blocks.0.")} == {(16, 16)}


def test_sites_without_maps_keep_the_fused_processor(random_backbone):
    seg = StableSeg(random_backbone, resolution=64, cross_scales=[8], stored_cross_scales=[8], mode="ca")
    procs = random_backbone.unet.attn_processors
    captured = {n.removesuffix(".processor") for n, p in procs.items() if isinstance(p, CrossAttentionMapProcessor)}
    assert captured == {s.id for s in seg.cross_sites}
    assert all(s.side == 8 for s in seg.cross_sites)
    others = [p for n, p in procs.items() if n.removesuffix(".processor") not in captured]
    assert others and all(isinstance(p, AttnProcessor2_0) for p in others)


def test_the_installer_refuses_unknown_sites_and_skips_a_repeated_install(random_backbone):
    import pytest

    with pytest.raises(ValueError, match=r"capture request names sites this U-Net does not have: \['nowhere.attn2'\]"):
        random_backbone.install_capture(CaptureRequest(class_maps=("nowhere.attn2",)), AttentionStore())
    with pytest.raises(ValueError, match=r"emerdiff.site names sites this U-Net does not have: \['nowhere'\]"):
        random_backbone.install_modulation(ModulationState(), "nowhere")
    image_only = next(s.id for s in random_backbone.sites(64) if s.kind == "self")
    with pytest.raises(ValueError, match=rf"site {image_only} attends to the image only"):
        random_backbone.install_capture(CaptureRequest(class_maps=(image_only,)), AttentionStore())
    seg = StableSeg(random_backbone, resolution=64, cross_scales=[8], stored_cross_scales=[8], mode="ca")
    before = dict(random_backbone.unet.attn_processors)
    random_backbone.install_capture(seg.capture, seg.store)  # the same request and store: nothing replaced
    assert all(random_backbone.unet.attn_processors[n] is p for n, p in before.items())
    random_backbone.remove_capture()


def test_unknown_scale_is_a_clear_error(random_backbone):
    import pytest

    with pytest.raises(ValueError, match=r"zero_shot.cross_scales=\[7\].*available: \[4, 8, 16\]"):
        StableSeg(random_backbone, resolution=64, cross_scales=[7])


def test_select_sites_by_side_and_by_depth(random_backbone):
    from stableseg_pp.backbones.base import select_sites

    sites = random_backbone.sites(64)
    text = select_sites(sites, "text")
    assert text and all(s.kind == "cross" for s in text)
    by_side = select_sites(sites, "text", [8])
    assert by_side and {s.side for s in by_side} == {8}
    depths = [text[0].depth, text[-1].depth]
    assert [s.id for s in select_sites(sites, "text", depths=depths)] == [text[0].id, text[-1].id]
    import pytest

    with pytest.raises(ValueError, match=r"depths \[999\] do not exist"):
        select_sites(sites, "text", depths=[999])
