"""The MM-DiT family (SD3 / SD3.5): joint-attention capture, both text-conditioning schemes, flow-matching noise."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from stableseg_pp.backbones.base import AttentionStore, CaptureRequest, ModulationState
from stableseg_pp.backbones.hopping import additive_mask, encode_packed, pack_prompts
from stableseg_pp.backbones.joint_capture import (
    IMAGE_FIRST,
    TEXT_FIRST,
    JointAttentionMapProcessor,
    joint_attention_maps,
)
from stableseg_pp.backbones.prompts import map_class_tokens
from stableseg_pp.backbones.sd3_mmdit import SD3Backbone
from stableseg_pp.methods.stableseg import StableSeg
from stableseg_pp.miniature_sd.architecture import WORDS, build_tokenizer
from tests.concept_reference import reference_concept_maps

TEMPLATE = "a photo of a {}"


def t5_tokenizer() -> T5TokenizerFast:
    """A real T5 (SentencePiece-style Unigram) tokenizer on the miniature vocabulary: no BOS, ``</s>`` at the end."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(f"▁{w}", -1.0) for w in dict.fromkeys(WORDS)] + [(c, -5.0) for c in letters]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def clip(tokenizer, width: int) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, projection_dim=width,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return CLIPTextModelWithProjection(config).eval()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> StableDiffusion3Pipeline:
    """A small SD3.5-shaped pipeline with random weights and all three text encoders (T5 included)."""
    torch.manual_seed(0)
    tok = build_tokenizer(tmp_path_factory.mktemp("tok"), max_length=24)
    t5 = T5EncoderModel(T5Config(vocab_size=64 + len(WORDS), d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4))
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=48,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, shift_factor=0.1, scaling_factor=1.5,
    )  # fmt: skip
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae.eval(),
        text_encoder=clip(tok, 16), tokenizer=tok, text_encoder_2=clip(tok, 32), tokenizer_2=tok,
        text_encoder_3=t5.eval(), tokenizer_3=t5_tokenizer(),
    )  # fmt: skip


def backbone(pipe, **kwargs) -> SD3Backbone:
    return SD3Backbone.from_pipeline(pipe, **({"name": "random", "t5_tokens": 12} | kwargs))


def test_sites_follow_the_block_structure(pipe):
    sites = backbone(pipe).sites(16)
    assert [(s.id, s.kind, s.depth) for s in sites] == [
        ("transformer_blocks.0.attn", "joint", 0),
        ("transformer_blocks.0.attn2", "self", 0),  # SD3.5's image-only attention
        ("transformer_blocks.1.attn", "joint", 1),
        ("transformer_blocks.2.attn", "joint", 2),  # the last block: context_pre_only
    ]
    assert {s.grid for s in sites} == {(4, 4)}  # 16 px -> 8x8 latent -> 2x2 patches


def transformer_inputs() -> tuple[torch.Tensor, ...]:
    """Latents, text, pooled vector and times of two images, and class weights (image 1's prompt names two)."""
    torch.manual_seed(1)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 10, 64)
    pooled, t = torch.randn(2, 48), torch.tensor([1.0, 500.0])
    weights = torch.rand(2, 10, 3)
    weights[1, :, 2] = 0
    return x, text, pooled, t, weights


@pytest.mark.parametrize("directions", ["image_to_text", "both"])
def test_captured_maps_are_the_joint_softmax_and_outputs_unchanged(pipe, directions):
    b = backbone(pipe, attention_maps=directions)
    tr = b.transformer
    x, text, pooled, t, weights = transformer_inputs()
    b.remove_capture()
    with torch.no_grad():
        stock = tr(x, text, pooled, t).sample
    inputs: dict[str, tuple] = {}
    hooks = [
        tr.get_submodule(f"transformer_blocks.{i}.attn").register_forward_pre_hook(
            lambda m, a, kw, i=i: inputs.__setitem__(i, (m, kw["hidden_states"], kw["encoder_hidden_states"])),
            with_kwargs=True,
        )
        for i in range(3)
    ]
    store = AttentionStore()
    sites = tuple(f"transformer_blocks.{i}.attn" for i in range(3))
    b.install_capture(CaptureRequest(class_maps=sites, text_logits=sites[:1], head_maps=sites[1:2]), store)
    store.reset(weights, (8, 8))
    with torch.no_grad():
        captured = tr(x, text, pooled, t).sample
    for h in hooks:
        h.remove()
    b.remove_capture()
    torch.testing.assert_close(captured, stock, rtol=1e-5, atol=1e-5)
    for i, (m, hs, ehs) in inputs.items():
        # the full joint softmax, recomputed from the layer's weights
        def heads(y, m=m):
            return y.view(2, y.shape[1], m.heads, -1).transpose(1, 2)

        q = m.norm_q(heads(m.to_q(hs)))
        k = m.norm_k(heads(m.to_k(hs)))
        cq = m.norm_added_q(heads(m.add_q_proj(ehs)))
        ck = m.norm_added_k(heads(m.add_k_proj(ehs)))
        qa, ka = torch.cat([q, cq], 2), torch.cat([k, ck], 2)
        per_head = (qa @ ka.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)  # (B, heads, N + T, N + T)
        n = hs.shape[1]
        heads = per_head[:, :, :n, n:] @ weights[:, None]  # image-to-text, normalised over all keys
        if directions == "both":
            heads = (heads + per_head[:, :, n:, :n].transpose(-1, -2) @ weights[:, None]) / 2
        expected = heads.mean(1)
        got = store.cross[f"transformer_blocks.{i}.attn"]
        assert got.shape == (2, 3, 4, 4)
        torch.testing.assert_close(got.flatten(2).transpose(1, 2), expected.detach(), rtol=1e-4, atol=1e-6)
        if i == 1:  # the block whose maps are also kept per head
            got_heads = store.cross_heads[sites[1]]
            assert got_heads.shape == (2, 4, 3, 4, 4)
            torch.testing.assert_close(got_heads.flatten(3).transpose(-1, -2), heads.detach(), rtol=1e-4, atol=1e-6)
        else:
            assert sites[i] not in store.cross_heads
        if i == 0:
            logits = ((q @ ck.transpose(-1, -2)) / q.shape[-1] ** 0.5).mean(1) @ weights
            torch.testing.assert_close(store.text_logits[sites[0]].flatten(2).transpose(1, 2), logits.detach())


def test_output_space_maps_are_conceptattention_and_outputs_unchanged(pipe):
    """``attention_maps=output_space``: each class token rides through the blocks' text weights, attending to
    [concepts; image] (recomputed by running each block with the concepts as its text); the image and text streams
    are the stock ones. Block 0 records nothing but carries the stream to blocks 1 and 2 (the last block has no text
    output: the stream ends there)."""
    b = backbone(pipe, attention_maps="output_space")
    tr = b.transformer
    x, text, pooled, t, weights = transformer_inputs()
    b.remove_capture()
    with torch.no_grad():
        stock = tr(x, text, pooled, t).sample
    expected, expected_heads = reference_concept_maps(list(tr.transformer_blocks), lambda: tr(x, text, pooled, t), weights)
    store = AttentionStore()
    sites = tuple(f"transformer_blocks.{i}.attn" for i in range(3))
    b.install_capture(CaptureRequest(class_maps=sites[1:], query_keys=sites[2:], head_maps=sites[1:2]), store)
    joint = [p for n, p in tr.attn_processors.items() if n.endswith(".attn.processor")]
    assert all(type(p).__name__ == "JointAttentionMapProcessor" for p in joint)  # block 0 too: it carries the stream
    store.reset(weights, (8, 8))
    with torch.no_grad():
        captured = tr(x, text, pooled, t).sample
    torch.testing.assert_close(captured, stock, rtol=1e-5, atol=1e-5)
    assert sorted(store.cross) == list(sites[1:])
    for i in (1, 2):
        got = store.cross[sites[i]].flatten(2).transpose(1, 2)
        torch.testing.assert_close(got, expected[i], rtol=1e-4, atol=1e-5)
        assert torch.all(got[1, :, 2] == 0)  # a class the prompt does not name scores 0
    torch.testing.assert_close(store.cross_heads[sites[1]].flatten(3).transpose(-1, -2), expected_heads[1], rtol=1e-4, atol=1e-5)
    # captions (no class weights) run no stream; EmerDiff's processors leave it resting; removal takes every hook
    store.reset(None, (8, 8))
    with torch.no_grad():
        torch.testing.assert_close(tr(x, text, pooled, t).sample, stock, rtol=1e-5, atol=1e-5)
    assert not store.cross
    b.install_modulation(ModulationState(), sites[1])
    store.reset(weights, (8, 8))
    with torch.no_grad():
        tr(x, text, pooled, t)
    assert not store.cross
    b.remove_capture()
    assert not any(blk._forward_hooks or blk._forward_pre_hooks for blk in tr.transformer_blocks)


@pytest.mark.parametrize("directions", ["image_to_text", "both"])
def test_joint_math_with_text_first_layout_is_the_full_softmax(pipe, directions):
    """A text-first family (FLUX: [text; image]) reuses the joint math: output and class maps equal the full softmax
    over the text-first sequence, computed explicitly; the maps do not depend on the order."""
    torch.manual_seed(3)
    b, heads, n, t, d, c = 2, 3, 6, 5, 8, 4
    image = tuple(torch.randn(b, heads, n, d) for _ in range(3))
    text = tuple(torch.randn(b, heads, t, d) for _ in range(3))
    weights, scale = torch.rand(b, t, c), d**-0.5
    out, maps, per_head = joint_attention_maps(image, text, weights, scale, TEXT_FIRST, directions, per_head=True)
    q, k, v = (torch.cat([tx, im], 2) for im, tx in zip(image, text, strict=True))
    probs = (q @ k.transpose(-1, -2) * scale).softmax(-1)  # (B, heads, T + N, T + N)
    torch.testing.assert_close(out, probs @ v)
    expected = probs[:, :, t:, :t] @ weights[:, None]  # image queries over text keys, normalised over all keys
    if directions == "both":
        expected = (expected + probs[:, :, :t, t:].transpose(-1, -2) @ weights[:, None]) / 2
    torch.testing.assert_close(per_head, expected)
    torch.testing.assert_close(maps, expected.mean(1))
    first_out, first_maps, _ = joint_attention_maps(image, text, weights, scale, IMAGE_FIRST, directions)
    torch.testing.assert_close(first_maps, maps)
    torch.testing.assert_close(first_out, torch.cat([out[:, :, t:], out[:, :, :t]], 2))

    # through the processor on a real joint block: the layout changes neither its outputs nor its maps
    attn = pipe.transformer.transformer_blocks[1].attn
    hs, ehs = torch.randn(2, 16, 32), torch.randn(2, 7, 32)
    stores = {layout: AttentionStore() for layout in (IMAGE_FIRST, TEXT_FIRST)}
    with torch.no_grad():
        stock = JointAttnProcessor2_0()(attn, hs, ehs)
        for layout, store in stores.items():
            store.reset(torch.rand(2, 7, 3, generator=torch.Generator().manual_seed(4)), (4, 4))
            got = JointAttentionMapProcessor(store, "s", directions=directions, layout=layout)(attn, hs, ehs)
            for part, ref in zip(got, stock, strict=True):
                torch.testing.assert_close(part, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stores[TEXT_FIRST].cross["s"], stores[IMAGE_FIRST].cross["s"])


def test_sar_on_joint_attention_equals_the_dense_image_attention(pipe):
    """MM-DiT SAR (image Q/K of the joint attention, class vectors = the mean key of each class region of the CA
    map) equals a dense computation: the explicit image x image logits of each head, averaged over each region's
    key columns, softmaxed over the classes. Captured without ever forming that matrix."""
    from stableseg_pp.methods.sar import sar_layer

    b = backbone(pipe)
    tr = b.transformer
    torch.manual_seed(2)
    x, text, pooled, t = torch.randn(2, 4, 8, 8), torch.randn(2, 10, 64), torch.randn(2, 48), torch.tensor([1.0, 300.0])
    inputs: dict[str, tuple] = {}
    hook = tr.get_submodule("transformer_blocks.1.attn").register_forward_pre_hook(
        lambda m, a, kw: inputs.__setitem__("x", (m, kw["hidden_states"])), with_kwargs=True
    )
    store = AttentionStore()
    b.install_capture(CaptureRequest(query_keys=("transformer_blocks.1.attn",)), store)
    store.reset(None, (8, 8))
    with torch.no_grad():
        tr(x, text, pooled, t)
    hook.remove()
    b.remove_capture()
    q, k = store.self_qk["transformer_blocks.1.attn"]
    assert q.shape == (2, 4, 16, 8)  # image tokens only: (B, heads, N, d)
    labels = torch.tensor([[0, 1, 1, 2] * 4, [2, 2, 0, 0] * 4]).view(2, 4, 4)  # a CA map on the 4x4 token grid
    valid = torch.tensor([[True, True, True], [True, False, True]])
    got = sar_layer(q, k, labels, valid)

    m, hs = inputs["x"]
    with torch.no_grad():
        qd = m.norm_q(m.to_q(hs).view(2, 16, 4, 8).transpose(1, 2))
        kd = m.norm_k(m.to_k(hs).view(2, 16, 4, 8).transpose(1, 2))
        dense = qd @ kd.transpose(-1, -2) / 8**0.5  # (B, heads, N, N): the image x image logits
    expected = torch.zeros(2, 3, 16)
    for img in range(2):
        flat = labels[img].flatten()
        present = [c for c in range(3) if valid[img, c] and (flat == c).any()]
        logits = torch.stack([dense[img][:, :, flat == c].mean(-1) for c in present], dim=-1)  # (heads, N, classes)
        expected[img, present] = logits.softmax(-1).mean(0).T
    torch.testing.assert_close(got.flatten(2), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_hopping_pass_equals_separate_passes(pipe, attention):
    tok = pipe.tokenizer
    names = ["circle", "half moon", "star", "square", "cross", "triangle"]
    lists = [tok(TEMPLATE.format(n)).input_ids for n in names]
    packed = pack_prompts(lists, tok.model_max_length, tok.pad_token_id, causal=True)
    assert len(packed.input_ids) < len(names)  # several prompts share a row
    enc, t5_enc = copy.deepcopy(pipe.text_encoder), copy.deepcopy(pipe.text_encoder_3)
    enc.set_attn_implementation(attention)
    t5_enc.set_attn_implementation(attention)

    def run(ids, positions, mask):
        out = enc(ids, attention_mask=additive_mask(mask, enc.dtype), position_ids=positions, output_hidden_states=True)
        return out.hidden_states[-2], out.last_hidden_state

    with torch.no_grad():
        together = encode_packed(run, lists, tok.model_max_length, tok.pad_token_id, True, "cpu")
        for ids, (penultimate, last) in zip(lists, together, strict=True):
            alone = enc(torch.tensor([ids]), output_hidden_states=True)
            torch.testing.assert_close(penultimate, alone.hidden_states[-2][0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(last, alone.last_hidden_state[0], rtol=1e-5, atol=1e-5)
        t5_lists = [pipe.tokenizer_3(TEMPLATE.format(n)).input_ids for n in names]
        t5 = encode_packed(
            lambda i, p, m: (t5_enc(i, attention_mask=additive_mask(m, torch.float32))[0],), t5_lists, 40, 0, False, "cpu"
        )
        for ids, (hidden,) in zip(t5_lists, t5, strict=True):
            torch.testing.assert_close(hidden, t5_enc(torch.tensor([ids]))[0][0], rtol=1e-5, atol=1e-5)


def test_per_class_embeddings_sit_at_their_positions(pipe):
    b = backbone(pipe, conditioning="per_class")
    classes = [["circle", "half moon"], ["star"]]
    with torch.no_grad():
        cond = b.encode_text(classes, TEMPLATE, " and ")
        emb, pooled = cond.embeddings
        length = pipe.tokenizer.model_max_length
        assert emb.shape == (2, length + 12, 64) and pooled.shape == (2, 48)
        empty = [b._clip_padded(i, [""])[0][0] for i in (0, 1)]
        empty_t5 = b._t5_padded([""])[0]
        for img, names in enumerate(classes):
            for c, name in enumerate(names):
                for i, (lo, hi) in enumerate([(0, 16), (16, 48)]):
                    m = map_class_tokens(b.tokenizers[i], [name], TEMPLATE)
                    alone = b._clip_padded(i, [m.prompt])[0][0]
                    torch.testing.assert_close(emb[img, 1 + c, lo:hi], alone[m.positions[0]].sum(0), rtol=1e-5, atol=1e-5)
                assert emb[img, 1 + c, 48:].abs().max() == 0  # CLIP zero-padded to T5's width
                m3 = map_class_tokens(b.tokenizer_3, [name], TEMPLATE, max_length=12)
                alone3 = pipe.text_encoder_3(torch.tensor([m3.input_ids]))[0][0]  # its own pass, unpadded
                torch.testing.assert_close(emb[img, length + c], alone3[m3.positions[0]].sum(0), rtol=1e-5, atol=1e-5)
            k = len(names)
            torch.testing.assert_close(emb[img, 0, :16], empty[0][0])  # BOS
            torch.testing.assert_close(emb[img, k + 1 :, :16][: length - k - 1], empty[0][k + 1 :])  # padding
            torch.testing.assert_close(emb[img, length + k :], empty_t5[k:])
    # each class map = half its CLIP position + half its T5 position
    w = cond.token_weights
    assert w[0, 2, 1] == 0.5 and w[0, length + 1, 1] == 0.5 and w[0].sum(0).tolist() == [1.0, 1.0]
    assert cond.valid.tolist() == [[True, True], [True, False]]
    assert len(pipe.tokenizer("half moon", add_special_tokens=False).input_ids) == 2  # a multi-token name


def test_joined_prompt_equals_the_pipeline_encoding(pipe):
    b = backbone(pipe, conditioning="joined")
    with torch.no_grad():
        cond = b.encode_text([["circle", "half moon"]], TEMPLATE, " and ")
        ref, _, ref_pooled, _ = pipe.encode_prompt(
            "a photo of a circle and half moon", None, None, device="cpu", do_classifier_free_guidance=False,
            max_sequence_length=12,
        )  # fmt: skip
    torch.testing.assert_close(cond.embeddings[0], ref)
    torch.testing.assert_close(cond.embeddings[1], ref_pooled)
    half_moon = map_class_tokens(pipe.tokenizer, ["circle", "half moon"], TEMPLATE).positions[1]
    assert len(half_moon) == 2 and torch.allclose(cond.token_weights[0, half_moon, 1], torch.tensor(0.25))


def test_flow_matching_noise_is_the_schedulers_scale_noise(pipe):
    b = backbone(pipe, add_noise=True, num_inference_steps=28, noise_step=8)
    x = torch.randn(2, 4, 8, 8)
    noisy, t = b.noise(x, torch.Generator().manual_seed(3))
    ref = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ref.set_timesteps(28)
    assert torch.equal(t, ref.timesteps[7].expand(2))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(noisy, ref.scale_noise(x, t, eps))
    sigma = ref.sigmas[7]
    torch.testing.assert_close(noisy, (1 - sigma) * x + sigma * eps)  # x_t = (1 - s) x0 + s eps
    again, _ = b.noise(x, torch.Generator().manual_seed(3))
    assert torch.equal(noisy, again)  # seedable and deterministic
    clean, t1 = backbone(pipe).noise(x)
    assert torch.equal(clean, x) and t1.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("conditioning", ["per_class", "joined"])
def test_stableseg_runs_on_the_mmdit(pipe, conditioning):
    b = backbone(pipe, conditioning=conditioning)
    seg = StableSeg(b, resolution=16, cross_scales="all", cross_depths=[1], mode="ca+sa")
    assert [s.id for s in seg.aggregated_sites] == ["transformer_blocks.1.attn"]
    out = seg(torch.rand(2, 3, 16, 16) * 2 - 1, [["circle", "half moon"], ["star"]])
    assert out.scores.shape == (2, 3, 16, 16) and out.valid.tolist() == [[True, True, True], [True, True, False]]
    assert set(out.cross_maps) == {f"transformer_blocks.{i}.attn" for i in range(3)}  # all stored for stage 2
    assert F.softmax(out.scores, 1).isfinite().all()


def test_shipped_miniature_mmdit_is_an_sd3_pipeline():
    from stableseg_pp.backbones.loading import ALIASES

    folder = ALIASES["miniature_mmdit"]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, f"{folder} is {size / 2**20:.1f} MB"
    assert (folder / "README.md").exists() and (folder / "training_log.json").exists()
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert pipe.transformer.config.dual_attention_layers == [0, 1] or tuple(pipe.transformer.config.dual_attention_layers) == (
        0,
        1,
    )
    assert pipe.vae.config.shift_factor is not None


def test_asking_for_t5_on_a_model_without_one_is_a_clear_error():
    from stableseg_pp.runtime.errors import ConfigError

    backbone = SD3Backbone(name="miniature_mmdit", pretrained="miniature_mmdit", use_t5=True, t5_tokens=77)
    with pytest.raises(ConfigError, match=r"diffusion.use_t5=true, but .* has no T5 .*set diffusion.use_t5=false"):
        backbone.sites(64)  # checked from the configs, before any weights are read
    with pytest.raises(ConfigError, match=r"has no T5"):
        backbone.load()
    assert SD3Backbone(name="m", pretrained="miniature_mmdit", use_t5=False, t5_tokens=0).sites(64)


def test_a_model_with_t5_whose_t5_is_not_cached_is_checked_at_load(tmp_path):
    """A model whose index lists T5 but whose T5 folders were never fetched (a cache filled with use_t5=false):
    not "has no T5", but the settings check is left to the load."""
    import json
    import shutil

    from stableseg_pp.backbones.loading import ALIASES

    folder = tmp_path / "sd3_like"
    shutil.copytree(ALIASES["miniature_mmdit"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(LookupError, match="configs not available without downloading"):
        SD3Backbone(name="m", pretrained=str(folder), use_t5=True, t5_tokens=77).sites(64)


@pytest.mark.slow
def test_stage_all_on_the_miniature_mmdit(compose_fit):
    """Stages 0, 1 and 2 (StableSeg++: weights learned over the MM-DiT's blocks) on a small part of the world."""
    import json

    from stableseg_pp.fit import run
    from tests.test_self_training import SMALL

    final = run(compose_fit("stage=all", "diffusion=miniature_mmdit", *SMALL))["2"]
    run_dir = final.parent
    weights = json.loads(next(run_dir.glob("weights-*")).joinpath("weights.json").read_text())
    assert weights["family"] == "sd3_mmdit"
    assert set(weights["sites"]) == {f"transformer_blocks.{i}.attn" for i in range(5)}
    table = json.loads((run_dir / "results.json").read_text())
    assert len(table) == 6 and all(0 <= r["val_miou"] <= 1 for r in table)


EMERDIFF_SITE = "transformer_blocks.1.attn"  # a joint block with one before it (block 0 has SD3.5's attn2 too)


def _emerdiff_forward(bb: SD3Backbone, state):
    """One denoiser forward of two identical runs (EmerDiff's processors installed when ``state``); every joint
    attention's inputs and (image, text) outputs."""
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1).clone()
    text = bb.encode_captions([""]).expand(2)
    seen, handles = {}, []
    for i, block in enumerate(bb.transformer.transformer_blocks):

        def hook(module, args, kwargs, output, name=f"transformer_blocks.{i}.attn"):
            seen[name] = {"hidden": kwargs["hidden_states"], "context": kwargs["encoder_hidden_states"], "out": output}

        handles.append(block.attn.register_forward_hook(hook, with_kwargs=True))
    if state is not None:
        bb.install_modulation(state, EMERDIFF_SITE)
    try:
        with torch.no_grad():
            bb.denoise(latents, bb.time_input(281.0, 2, latents.device), text)
    finally:
        for h in handles:
            h.remove()
        bb.remove_capture()
    return seen


def test_emerdiff_modulates_only_the_image_stream_of_its_block_and_injects_the_joint_attention(pipe):
    """EmerDiff on the MM-DiT: the modulated block's image output moves by exactly c * M_i (the text stream and the
    blocks before it unchanged); after it every run attends with the reference run's Q and K over the whole joint
    token set, applied to its own values (explicit softmax)."""
    from stableseg_pp.backbones.joint_capture import IMAGE_FIRST, joint_outputs, joint_projections
    from stableseg_pp.backbones.modulation import ModulationState
    from stableseg_pp.methods.emerdiff import segment_offsets

    bb = backbone(pipe)
    segments = torch.zeros(4, 4, dtype=torch.long)
    segments[1:3, 2:4] = 1
    offsets = torch.stack([torch.zeros(16), segment_offsets(segments, 1, 10.0)])
    seen = _emerdiff_forward(bb, ModulationState(reference=torch.tensor([0, 0]), offset=offsets))
    order = list(seen)
    site = order.index(EMERDIFF_SITE)
    for name in order[:site]:
        torch.testing.assert_close(seen[name]["out"][0][1], seen[name]["out"][0][0])
    image, text = seen[EMERDIFF_SITE]["out"]
    inside = segments.flatten().bool()
    diff = image[1] - image[0]
    torch.testing.assert_close(diff[inside], torch.full_like(diff[inside], 10.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(diff[~inside], torch.zeros_like(diff[~inside]), atol=1e-5, rtol=0)
    torch.testing.assert_close(text[1], text[0])  # the text stream is not modulated
    for name in order[site + 1 :]:
        attn, s = bb.transformer.get_submodule(name), seen[name]
        with torch.no_grad():
            (q, k, v), (cq, ck, cv) = joint_projections(attn, s["hidden"], s["context"])
            q_all, k_all, v_all = IMAGE_FIRST.join(q, cq), IMAGE_FIRST.join(k, ck), IMAGE_FIRST.join(v, cv)
            probs = (q_all[:1] @ k_all[:1].transpose(-1, -2) * attn.scale).softmax(-1)  # the reference's, explicit
            expected = joint_outputs(attn, probs @ v_all[1:], q.shape[2], q.dtype)
        torch.testing.assert_close(s["out"][0][1:], expected[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(s["out"][1][1:], expected[1], atol=2e-5, rtol=1e-4)
    assert (seen[order[-1]]["hidden"][1] - seen[order[-1]]["hidden"][0]).abs().max() > 1e-3  # the change propagates
    stock = _emerdiff_forward(bb, None)  # processors removed: the stock joint attention again
    torch.testing.assert_close(stock[order[0]]["out"][0], seen[order[0]]["out"][0], atol=1e-5, rtol=1e-5)


def test_flow_matching_sampler_runs_the_euler_steps_of_the_models_schedule(pipe):
    """EmerDiff's sampler on the MM-DiT: the times from t_m on of the scheduler's own schedule, stateless Euler steps
    equal to the scheduler's ``step``, the decoder undoing the VAE's shift and scale."""
    bb = backbone(pipe)
    times = bb.sampling_times(281, 50)
    schedule = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    schedule.set_timesteps(50)
    assert times == [float(t) for t in schedule.timesteps if t <= 281] and len(times) < 50
    gen = torch.Generator().manual_seed(0)
    z, v = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    first = int((schedule.timesteps - times[0]).abs().argmin())
    schedule._step_index = first
    torch.testing.assert_close(bb.sampler_step(v, times[0], z), schedule.step(v, schedule.timesteps[first], z).prev_sample)
    last = bb.sampler_step(v, times[-1], z)  # to sigma 0: the clean estimate x - sigma * v
    torch.testing.assert_close(last, z - times[-1] / 1000 * v, atol=1e-5, rtol=0)
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    decoded = bb.decode_latents(bb.encode_images(pixels))
    expected = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-5)
