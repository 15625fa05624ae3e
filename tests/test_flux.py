"""The FLUX.1 family: captured maps are the joint softmax (double- and single-stream blocks), capture leaves every
output unchanged, the per-class T5 pass, packed latents, sites and the flow-matching schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from stableseg_pp.backbones.base import AttentionStore, CaptureRequest, select_sites
from stableseg_pp.backbones.flux import (
    FluxBackbone,
    FluxSingleCaptureProcessor,
    TextLength,
    pack_latents,
    unpack_latents,
)
from stableseg_pp.backbones.prompts import map_class_tokens
from stableseg_pp.methods.emerdiff import EmerDiff
from stableseg_pp.miniature_sd.architecture import WORDS, build_tokenizer
from stableseg_pp.runtime.errors import ConfigError
from tests.concept_reference import reference_concept_maps
from tests.test_mmdit import t5_tokenizer

TEMPLATE = "a photo of a {}"
DOUBLE = ("transformer_blocks.0.attn", "transformer_blocks.1.attn")
SINGLE = ("single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn")


def transformer(guidance_embeds: bool = False) -> FluxTransformer2DModel:
    """2 double- and 2 single-stream blocks, 2 heads x 16 dims, RoPE axes 4 + 6 + 6."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> FluxPipeline:
    """A small FLUX.1-dev-shaped pipeline with random weights (dynamic shifting; no guidance embedding)."""
    torch.manual_seed(0)
    tok = build_tokenizer(tmp_path_factory.mktemp("tok"), max_length=24)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=24, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    )  # fmt: skip
    t5 = T5EncoderModel(T5Config(vocab_size=64 + len(WORDS), d_model=32, d_kv=8, d_ff=32, num_layers=2, num_heads=4))
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, shift_factor=0.1, scaling_factor=1.5,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae.eval(), text_encoder=clip.eval(), tokenizer=tok, text_encoder_2=t5.eval(),
        tokenizer_2=t5_tokenizer(), transformer=transformer(),
    )  # fmt: skip


def backbone(pipe, **kwargs) -> FluxBackbone:
    return FluxBackbone.from_pipeline(pipe, **({"name": "random", "t5_tokens": 12, "dtype": "float32"} | kwargs))


def inputs(b: int = 2, n_text: int = 10, grid: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """The transformer's inputs as the pipeline builds them (zero text ids, the image ids of the token grid)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(b, grid * grid, 16, generator=g),
        "encoder_hidden_states": torch.randn(b, n_text, 32, generator=g),
        "pooled_projections": torch.randn(b, 16, generator=g),
        "timestep": torch.tensor([0.001, 0.6])[:b],
        "txt_ids": torch.zeros(n_text, 3),
        "img_ids": FluxPipeline._prepare_latent_image_ids(b, grid, grid, "cpu", torch.float32),
    }


def reference_probabilities(m, hs, ehs, rope) -> tuple[torch.Tensor, ...]:
    """The full joint softmax of one attention, recomputed explicitly: (B, heads, T + N, T + N) over [text; image],
    and the joint Q and K after RoPE and V (B, heads, T + N, d)."""

    def heads(y):
        return y.view(y.shape[0], y.shape[1], m.heads, -1).transpose(1, 2)  # (B, heads, L, d)

    q, k, v = m.norm_q(heads(m.to_q(hs))), m.norm_k(heads(m.to_k(hs))), heads(m.to_v(hs))
    if ehs is not None:  # double-stream: text projections of their own, text first
        q = torch.cat([m.norm_added_q(heads(m.add_q_proj(ehs))), q], 2)
        k = torch.cat([m.norm_added_k(heads(m.add_k_proj(ehs))), k], 2)
        v = torch.cat([heads(m.add_v_proj(ehs)), v], 2)
    q, k = apply_rotary_emb(q, rope, sequence_dim=2), apply_rotary_emb(k, rope, sequence_dim=2)
    return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1), q, k, v


def test_sites_follow_the_block_structure_and_select_by_depth(pipe):
    b = backbone(pipe)
    sites = b.sites(16)
    assert [(s.id, s.kind, s.depth, s.heads) for s in sites] == [
        ("transformer_blocks.0.attn", "joint", 0, 2),
        ("transformer_blocks.1.attn", "joint", 1, 2),
        ("single_transformer_blocks.0.attn", "joint", 2, 2),  # single-stream blocks follow the double-stream ones
        ("single_transformer_blocks.1.attn", "joint", 3, 2),
    ]
    assert {s.grid for s in sites} == {(4, 4)}  # 16 px -> 8x8 latent -> 4x4 tokens
    assert [s.id for s in select_sites(sites, "text", depths=[1, 2])] == [DOUBLE[1], SINGLE[0]]
    assert [s.id for s in select_sites(sites, "image", depths=[3])] == [SINGLE[1]]
    assert len(select_sites(sites, "image")) == 4 and select_sites(sites, "text", sides=[4]) == sites
    with pytest.raises(ConfigError, match=r"zero_shot.cross_depths=\[4\].*available: \[0, 1, 2, 3\]"):
        select_sites(sites, "text", depths=[4], depth_setting="zero_shot.cross_depths")
    assert [b._is_single(s) for s in sites] == [False, False, True, True]
    with pytest.raises(ConfigError, match="multiple of 4"):
        b.latent_grid(18)


@pytest.mark.parametrize("directions", ["image_to_text", "both"])
def test_captured_maps_are_the_joint_softmax_and_outputs_unchanged(pipe, directions):
    b = backbone(pipe, attention_maps=directions)
    tr, x = b.transformer, inputs()
    n_text = x["encoder_hidden_states"].shape[1]
    weights = torch.rand(2, n_text, 3, generator=torch.Generator().manual_seed(2))
    weights[1, :, 2] = 0  # image 1's prompt names two classes
    blocks = [*tr.transformer_blocks, *tr.single_transformer_blocks]
    seen: dict[str, list] = {"stock": [], "capture": []}
    attn_inputs: dict[int, tuple] = {}
    run = ["stock"]
    hooks = [blk.register_forward_hook(lambda m, a, out: seen[run[0]].append(out)) for blk in blocks]

    def keep_inputs(i):
        def hook(m, args, kw):
            attn_inputs[i] = (m, kw["hidden_states"], kw.get("encoder_hidden_states"), kw["image_rotary_emb"])

        return hook

    hooks += [blk.attn.register_forward_pre_hook(keep_inputs(i), with_kwargs=True) for i, blk in enumerate(blocks)]
    b.remove_capture()
    with torch.no_grad():
        stock = tr(**x).sample
    sites = DOUBLE + SINGLE
    store = AttentionStore()
    request = CaptureRequest(
        class_maps=sites, query_keys=sites, text_logits=(DOUBLE[0], SINGLE[1]), head_maps=(DOUBLE[1], SINGLE[0])
    )
    b.install_capture(request, store)
    b.install_capture(request, store)  # a repeated install changes nothing (one text-length hook per block)
    assert all(len(blk._forward_pre_hooks) == 1 for blk in tr.single_transformer_blocks)
    store.reset(weights, b.latent_grid(16))
    run[0] = "capture"
    with torch.no_grad():
        captured = tr(**x).sample
    for h in hooks:
        h.remove()
    b.remove_capture()
    assert not any(blk._forward_pre_hooks for blk in tr.single_transformer_blocks)

    # every block's outputs and the transformer's output are the stock ones
    for got, ref in zip(seen["capture"], seen["stock"], strict=True):
        for part, expected in zip(got, ref, strict=True):
            torch.testing.assert_close(part, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(captured, stock, rtol=1e-5, atol=1e-6)

    for i, (m, hs, ehs, rope) in attn_inputs.items():
        site = sites[i]
        with torch.no_grad():
            probs, q, k, _ = reference_probabilities(m, hs, ehs, rope)
        heads = probs[:, :, n_text:, :n_text] @ weights[:, None]  # image queries over text keys, all keys normalised
        if directions == "both":
            heads = (heads + probs[:, :, :n_text, n_text:].transpose(-1, -2) @ weights[:, None]) / 2
        got = store.cross[site]
        assert got.shape == (2, 3, 4, 4)
        torch.testing.assert_close(got.flatten(2).transpose(1, 2), heads.mean(1), rtol=1e-4, atol=1e-6)
        if site in request.head_maps:
            torch.testing.assert_close(store.cross_heads[site].flatten(3).transpose(-1, -2), heads, rtol=1e-4, atol=1e-6)
        else:
            assert site not in store.cross_heads
        # SAR's image Q/K: after RoPE, image tokens only
        sq, sk = store.self_qk[site]
        assert sq.shape == (2, 2, 16, 16)
        torch.testing.assert_close(sq, q[:, :, n_text:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sk, k[:, :, n_text:], rtol=1e-5, atol=1e-6)
        if site in request.text_logits:
            logits = (q[:, :, n_text:] @ k[:, :, :n_text].transpose(-1, -2) * 16**-0.5).mean(1) @ weights
            torch.testing.assert_close(store.text_logits[site].flatten(2).transpose(1, 2), logits, rtol=1e-5, atol=1e-6)
        else:
            assert site not in store.text_logits
    assert len(attn_inputs) == 4


def test_output_space_maps_follow_the_concept_stream_through_double_and_single_blocks(pipe):
    """``attention_maps=output_space`` on FLUX: the class tokens ride through both double-stream blocks (the first
    records nothing) into the first single-stream block, each block's concepts attending to [concepts; image] with
    zero RoPE positions (recomputed by running each block with the concepts as its text); the stock outputs."""
    b = backbone(pipe, attention_maps="output_space")
    tr, x = b.transformer, inputs()
    weights = torch.rand(2, x["encoder_hidden_states"].shape[1], 3, generator=torch.Generator().manual_seed(2))
    weights[1, :, 2] = 0  # image 1's prompt names two classes
    b.remove_capture()
    with torch.no_grad():
        stock = tr(**x).sample
    path = [*tr.transformer_blocks, tr.single_transformer_blocks[0]]
    expected, expected_heads = reference_concept_maps(path, lambda: tr(**x), weights)
    store = AttentionStore()
    b.install_capture(CaptureRequest(class_maps=(DOUBLE[1], SINGLE[0]), head_maps=(SINGLE[0],)), store)
    assert not tr.single_transformer_blocks[1]._forward_hooks  # the stream stops at the deepest class-map site
    store.reset(weights, b.latent_grid(16))
    with torch.no_grad():
        captured = tr(**x).sample
    torch.testing.assert_close(captured, stock, rtol=1e-5, atol=1e-6)
    assert sorted(store.cross) == sorted([DOUBLE[1], SINGLE[0]])
    for site, i in ((DOUBLE[1], 1), (SINGLE[0], 2)):
        got = store.cross[site].flatten(2).transpose(1, 2)
        torch.testing.assert_close(got, expected[i], rtol=1e-4, atol=1e-5)
        assert torch.all(got[1, :, 2] == 0)  # a class the prompt does not name scores 0
    got_heads = store.cross_heads[SINGLE[0]].flatten(3).transpose(-1, -2)
    torch.testing.assert_close(got_heads, expected_heads[2], rtol=1e-4, atol=1e-5)
    b.remove_capture()
    assert not any(blk._forward_hooks for blk in path)


def test_single_stream_capture_needs_the_text_length(pipe):
    attn = pipe.transformer.single_transformer_blocks[0].attn
    processor = FluxSingleCaptureProcessor(AttentionStore(), SINGLE[0], TextLength())
    with pytest.raises(RuntimeError, match="text length of this single-stream block is unknown"):
        processor(attn, torch.randn(1, 20, 32))


def test_per_class_t5_pass_equals_separate_passes(pipe):
    b = backbone(pipe, conditioning="per_class")
    classes = [["circle", "half moon"], ["star"]]
    names = ["circle", "half moon", "star", "square", "cross", "triangle"]
    lists = [pipe.tokenizer_2(TEMPLATE.format(n)).input_ids for n in names]
    with torch.no_grad():
        together = b._t5_packed(lists)
        for ids, hidden in zip(lists, together, strict=True):
            torch.testing.assert_close(hidden, pipe.text_encoder_2(torch.tensor([ids]))[0][0], rtol=1e-5, atol=1e-5)
        cond = b.encode_text(classes, TEMPLATE, " and ")
        emb, pooled = cond.embeddings
        assert emb.shape == (2, 12, 32) and pooled.shape == (2, 16)
        empty = b._t5_padded([""])[0]
        for img, image_names in enumerate(classes):
            for c, name in enumerate(image_names):
                m = map_class_tokens(pipe.tokenizer_2, [name], TEMPLATE, max_length=12)
                alone = pipe.text_encoder_2(torch.tensor([m.input_ids]))[0][0]  # its own pass, unpadded
                torch.testing.assert_close(emb[img, c], alone[m.positions[0]].sum(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(emb[img, len(image_names) :], empty[len(image_names) :])
        ref_pooled = pipe._get_clip_prompt_embeds(["a photo of a circle and half moon", "a photo of a star"], device="cpu")
        torch.testing.assert_close(pooled, ref_pooled)  # CLIP's pooled vector of the joined prompt
    assert len(pipe.tokenizer_2("half moon", add_special_tokens=False).input_ids) == 2  # a multi-token name
    assert cond.token_weights.shape == (2, 12, 2) and cond.token_weights[0, :2].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert cond.valid.tolist() == [[True, True], [True, False]]


def test_joined_prompt_equals_the_pipeline_encoding(pipe):
    b = backbone(pipe, conditioning="joined")
    with torch.no_grad():
        cond = b.encode_text([["circle", "half moon"]], TEMPLATE, " and ")
        ref, ref_pooled, _ = pipe.encode_prompt("a photo of a circle and half moon", device="cpu", max_sequence_length=12)
    torch.testing.assert_close(cond.embeddings[0], ref)
    torch.testing.assert_close(cond.embeddings[1], ref_pooled)
    half_moon = map_class_tokens(pipe.tokenizer_2, ["circle", "half moon"], TEMPLATE, max_length=12).positions[1]
    assert len(half_moon) == 2 and torch.allclose(cond.token_weights[0, half_moon, 1], torch.tensor(0.5))
    captions = b.encode_captions(["a photo of a star"])
    assert captions.token_weights.shape == (1, 12, 0) and captions.embeddings[0].shape == (1, 12, 32)


def test_packed_latents_round_trip_and_match_the_grid(pipe):
    b = backbone(pipe)
    latents = torch.randn(2, 4, 8, 6)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 8, 6))
    assert torch.equal(unpack_latents(packed, (4, 3)), latents)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 8 * 8, 6 * 8, 8), latents)
    with torch.no_grad():
        tokens = b.encode_images(torch.rand(2, 3, 16, 16) * 2 - 1)
    h, w = b.latent_grid(16)
    assert (h, w) == (8, 8) and tokens.shape == (2, h * w // 4, 16)
    assert tokens.shape[1] == np.prod(b.sites(16)[0].grid)
    store = AttentionStore()
    store.reset(None, (h, w))
    assert store.map_shape(tokens.shape[1]) == b.sites(16)[0].grid  # what the capture processors reshape maps to
    with torch.no_grad():
        ref = (pipe.vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean - 0.1) * 1.5
        torch.testing.assert_close(b.encode_images(torch.zeros(1, 3, 16, 16)), pack_latents(ref))


def test_flow_matching_noise_on_the_shifted_schedule(pipe):
    b = backbone(pipe, add_noise=True, num_inference_steps=28, noise_step=8)
    x = torch.randn(2, 16, 16)  # 16 packed tokens
    noisy, t = b.noise(x, torch.Generator().manual_seed(3))
    ref = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=calculate_shift(16, 256, 4096, 0.5, 1.15))  # as the pipeline
    assert torch.equal(t, ref.timesteps[7].expand(2))
    sigma = ref.sigmas[7]
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(noisy, (1 - sigma) * x + sigma * eps)
    torch.testing.assert_close(b.noise_to(x, float(t[0]), eps), noisy)  # time = sigma * 1000
    torch.testing.assert_close(b.prediction_target(x, eps, 500), eps - x)
    assert b.time_input(500, 3, torch.device("cpu")).tolist() == [500.0] * 3
    clean, t1 = backbone(pipe).noise(x)
    assert torch.equal(clean, x) and t1.tolist() == [1.0, 1.0]


def test_denoise_calls_the_transformer_as_the_pipeline(pipe):
    x = inputs(b=2, n_text=12)
    text = backbone(pipe).encode_captions(["a photo of a star"] * 2)
    latents, time = x["hidden_states"], torch.tensor([1.0, 600.0])
    for guided in (False, True):
        torch.manual_seed(5)
        tr = transformer(guidance_embeds=guided)
        b = FluxBackbone.from_pipeline(
            FluxPipeline(pipe.scheduler, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2, tr),
            name="random", t5_tokens=12, dtype="float32", guidance=4.0,
        )  # fmt: skip
        emb, pooled = text.embeddings
        with torch.no_grad():
            got = b.denoise(latents, time, text)
            ref = tr(
                hidden_states=latents, timestep=time / 1000, guidance=torch.full((2,), 4.0) if guided else None,
                pooled_projections=pooled, encoder_hidden_states=emb, txt_ids=x["txt_ids"], img_ids=x["img_ids"],
            ).sample  # fmt: skip
        torch.testing.assert_close(got, ref)


def test_configs_are_checked_before_weights_load(pipe, tmp_path):
    for bad, match in [
        ({"conditioning": "both"}, "diffusion.conditioning"),
        ({"attention_maps": "text"}, "diffusion.attention_maps"),
        ({"t5_tokens": 0}, "diffusion.t5_tokens=0"),
        ({"noise_step": 29}, "diffusion.noise_step=29"),
        ({"guidance": -1}, "diffusion.guidance=-1"),
        ({"timestep": 2000}, "diffusion.timestep=2000"),
    ]:
        with pytest.raises(ConfigError, match=match):
            FluxBackbone(**bad)
    pipe.save_pretrained(tmp_path / "flux")
    b = FluxBackbone(name="saved", pretrained=str(tmp_path / "flux"), dtype="float32", t5_tokens=12)
    sites = b.sites(16)
    assert not b.loaded and b._structure().transformer.device.type == "meta"
    assert sites == backbone(pipe).sites(16)
    with pytest.raises(ValueError, match="but the text encoder takes 12"):
        b.check_prompt(["circle and half moon and star and square"], "a photo of a {} with a background", " and ")
    assert b.load().sites(16) == sites and b.identity()["family"] == "flux"


@pytest.mark.parametrize("conditioning", ["per_class", "joined"])
def test_stableseg_runs_on_flux(pipe, conditioning):
    """Through StableSeg (class maps of a double- and a single-stream block, SAR on every block, flow-matching noise)."""
    from stableseg_pp.backbones.base import NoisingBackbone
    from stableseg_pp.methods.stableseg import StableSeg

    b = backbone(pipe, conditioning=conditioning, add_noise=True)
    assert isinstance(b, NoisingBackbone)
    seg = StableSeg(b, resolution=16, cross_scales="all", cross_depths=[1, 2], mode="ca+sa")
    assert [s.id for s in seg.aggregated_sites] == [DOUBLE[1], SINGLE[0]]
    out = seg(torch.rand(2, 3, 16, 16) * 2 - 1, [["circle", "half moon"], ["star"]], torch.Generator().manual_seed(0))
    assert out.scores.shape == (2, 3, 16, 16) and out.valid.tolist() == [[True, True, True], [True, True, False]]
    assert set(out.cross_maps) == set(DOUBLE + SINGLE) and out.scores.isfinite().all()
    b.remove_capture()


def test_emerdiff_on_flux_modulates_a_double_block_and_injects_the_reference_attention_everywhere(pipe):
    """EmerDiff on FLUX: the modulated double-stream block's image output moves by exactly c * M_i (its text output
    and every block before it unchanged); after it, in double- and single-stream blocks alike, the modulated run
    attends with the reference run's Q and K (after RoPE) over [text; image], applied to its own values (explicit
    softmax). A single-stream block cannot be the modulated site; a size-shifted schedule cannot be sampled."""
    from stableseg_pp.backbones.flux import double_stream_outputs
    from stableseg_pp.backbones.modulation import ModulationState
    from stableseg_pp.methods.emerdiff import segment_offsets

    bb = backbone(pipe)
    site = DOUBLE[1]
    seen, handles = {}, []
    for name in (*DOUBLE, *SINGLE):

        def hook(module, args, kwargs, output, name=name):
            seen[name] = {"hidden": kwargs["hidden_states"], "context": kwargs.get("encoder_hidden_states"),
                          "rope": kwargs["image_rotary_emb"], "out": output}  # fmt: skip

        handles.append(bb.transformer.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    segments = torch.zeros(4, 4, dtype=torch.long)
    segments[1:3, 0:2] = 1
    offsets = torch.stack([torch.zeros(16), segment_offsets(segments, 1, 10.0)])
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 16).expand(2, -1, -1).clone()
    text = bb.encode_captions([""]).expand(2)
    bb.install_modulation(ModulationState(reference=torch.tensor([0, 0]), offset=offsets), site)
    try:
        with torch.no_grad():
            bb.denoise(latents, bb.time_input(281.0, 2, latents.device), text)
    finally:
        for h in handles:
            h.remove()
        bb.remove_capture()
    torch.testing.assert_close(seen[DOUBLE[0]]["out"][0][1], seen[DOUBLE[0]]["out"][0][0])  # before the site
    image, text_out = seen[site]["out"]
    inside, diff = segments.flatten().bool(), image[1] - image[0]
    torch.testing.assert_close(diff[inside], torch.full_like(diff[inside], 10.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(diff[~inside], torch.zeros_like(diff[~inside]), atol=1e-5, rtol=0)
    torch.testing.assert_close(text_out[1], text_out[0])
    for name in SINGLE:  # after the site: the reference's probabilities, the run's own values
        m, s = bb.transformer.get_submodule(name), seen[name]
        with torch.no_grad():
            probs = reference_probabilities(m, s["hidden"][:1], None, s["rope"])[0]
            v = m.to_v(s["hidden"][1:]).view(1, -1, m.heads, m.head_dim).transpose(1, 2)
            expected = (probs @ v).transpose(1, 2).flatten(2, 3)
        torch.testing.assert_close(s["out"][1:], expected, atol=2e-5, rtol=1e-4)
        assert (s["hidden"][1] - s["hidden"][0]).abs().max() > 1e-4  # the runs differ here: injection is tested
    m, s = bb.transformer.get_submodule(site), seen[site]
    with torch.no_grad():  # the modulated block itself attends with the reference's Q and K too
        probs = reference_probabilities(m, s["hidden"][:1], s["context"][:1], s["rope"])[0]
        heads = m.heads

        def split(y):
            return y.view(1, -1, heads, m.head_dim).transpose(1, 2)

        v = torch.cat([split(m.add_v_proj(s["context"][1:])), split(m.to_v(s["hidden"][1:]))], 2)
        out_image, out_text = double_stream_outputs(m, probs @ v, s["context"].shape[1])
    torch.testing.assert_close(image[1:] - offsets[1:, :, None], out_image, atol=2e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="single-stream block has no image output"):
        bb.install_modulation(ModulationState(), SINGLE[0])


def test_sampler_of_a_size_shifted_schedule_takes_the_shift_of_the_latents(pipe):
    """FLUX.1-dev's scheduler shifts with the image size: the sampler's sigmas are the unshifted grid moved by
    ``mu`` = the line through (256 tokens, 0.5) and (4096 tokens, 1.15), for the token count of the latents sampled."""
    bb = backbone(pipe)
    unshifted = FlowMatchEulerDiscreteScheduler(shift=1.0)
    unshifted.set_timesteps(50)
    grid = unshifted.sigmas[:-1].double()
    for tokens in (16, 1024):
        mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / grid - 1))
        times = bb.sampling_times(1000, 50, torch.zeros(1, tokens, 64))
        np.testing.assert_allclose(times, (sigmas * 1000).tolist(), rtol=1e-5)
        assert bb.sampling_times(281, 50, torch.zeros(1, tokens, 64)) == [t for t in times if t <= 281]
    small, large = (bb.sampling_times(1000, 50, torch.zeros(1, n, 64))[25] for n in (16, 1024))
    assert large > small  # a larger image spends more of its steps at high noise
    assert bb.sampling_times(1000, 50) == bb.sampling_times(1000, 50, torch.zeros(1, 256, 64))  # check-only: base size
    # EmerDiff samples on it: its times are those of its latents' size
    emerdiff = EmerDiff(bb, DOUBLE[1], (4, 4), timestep=600, sampler_steps=6, sigma=0.0, runs_per_forward=4)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(1, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g)
    segments = [torch.arange(16).view(4, 4) // 8]  # two segments
    changes = emerdiff.change_maps(latents, segments, noise)
    assert emerdiff.times == bb.sampling_times(600, 6, latents) and sorted(changes[0]) == [0, 1]
    assert all(c.shape == (16, 16) and c.max() > 0 for c in changes[0].values())
