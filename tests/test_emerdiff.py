"""EmerDiff: modulation and attention injection against explicit computations, the pixel assignment, the batching
plan, and the refinement / unsupervised steps on the real composed config (kill and resume included)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from PIL import Image

from stableseg_pp import artifacts
from stableseg_pp.backbones.modulation import ModulationState
from stableseg_pp.data.description import describe_dataset
from stableseg_pp.fit import run
from stableseg_pp.methods.emerdiff import assign_pixels, plan_runs, segment_offsets
from stableseg_pp.runtime.run_dir import COMPLETE
from stableseg_pp.stages import emerdiff, stage0
from tests.conftest import killed_after_records

SITE = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"  # 8x8 in the miniature architecture at 64 px
FAST = ["emerdiff.sampler_steps=10", "emerdiff.timestep=201", "emerdiff.runs_per_forward=5"]  # t_m 201: 3 steps
SMALL = ["data.limit=3", "data.batch_size=2", "data.generate.n_train=6", "data.generate.n_val=3", "stage0.n_overlays=1"]


def _layers(backbone) -> dict[str, Attention]:
    """Every attention layer, in the order the forward runs them."""
    return {site.id: backbone.unet.get_submodule(site.id) for site in backbone.sites(64)}


def _record(backbone):
    """Forward hooks keeping each attention layer's inputs and output of the last forward."""
    seen: dict[str, dict] = {}
    handles = []
    for name, layer in _layers(backbone).items():

        def hook(module, args, kwargs, output, name=name):
            seen[name] = {"hidden": args[0] if args else kwargs["hidden_states"],
                          "context": kwargs.get("encoder_hidden_states"), "out": output}  # fmt: skip

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    return seen, handles


def _explicit_attention(attn: Attention, q_input, k_input, v_input) -> torch.Tensor:
    """softmax(Q K^T * scale) V through the layer's own projections, with the explicit probability matrix."""
    b, n, _ = q_input.shape
    q = attn.to_q(q_input).view(b, n, attn.heads, -1).transpose(1, 2)
    k = attn.to_k(k_input).view(b, k_input.shape[1], attn.heads, -1).transpose(1, 2)
    v = attn.to_v(v_input).view(b, v_input.shape[1], attn.heads, -1).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.to_out[0](out), probs


def _forward(backbone, state: ModulationState | None, seed: int = 0):
    torch.manual_seed(seed)
    latents = torch.randn(1, 4, 16, 16).expand(2, -1, -1, -1).clone()  # two identical runs
    text = backbone.encode_captions([""]).expand(2)
    if state is not None:
        backbone.install_modulation(state, SITE)
    seen, handles = _record(backbone)
    try:
        with torch.no_grad():
            backbone.denoise(latents, backbone.time_input(281, 2, latents.device), text)
    finally:
        for h in handles:
            h.remove()
        backbone.remove_capture()
    return seen


def _segment() -> torch.Tensor:
    segments = torch.zeros(8, 8, dtype=torch.long)
    segments[2:5, 3:7] = 1
    return segments


def test_modulation_changes_only_the_chosen_layer_output_inside_the_segment(random_backbone):
    offset = segment_offsets(_segment(), 1, 10.0)
    state = ModulationState(reference=torch.tensor([0, 0]), offset=torch.stack([torch.zeros(64), offset]))
    seen = _forward(random_backbone, state)
    order = list(_layers(random_backbone))
    site = order.index(SITE)
    for name in order[:site]:  # before the modulated layer both runs are the same
        torch.testing.assert_close(seen[name]["out"][1], seen[name]["out"][0])
    diff = seen[SITE]["out"][1] - seen[SITE]["out"][0]  # (N, C): exactly c * M_i on every channel
    inside = _segment().flatten().bool()
    torch.testing.assert_close(diff[inside], torch.full_like(diff[inside], 10.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(diff[~inside], torch.zeros_like(diff[~inside]), atol=1e-5, rtol=0)
    # the layers after it do see the change
    assert any((seen[n]["out"][1] - seen[n]["out"][0]).abs().max() > 1e-3 for n in order[site + 1 :])


def test_attention_injection_keeps_every_layers_probabilities_of_the_unmodulated_run(random_backbone):
    offset = segment_offsets(_segment(), 1, 10.0)
    rows = torch.stack([torch.zeros(64), offset])
    injected = _forward(random_backbone, ModulationState(reference=torch.tensor([0, 0]), offset=rows))
    own = _forward(random_backbone, ModulationState(reference=None, offset=rows))  # modulated, no injection
    layers = _layers(random_backbone)
    after = list(layers)[list(layers).index(SITE) + 1 :]
    differs = False
    for name in after:
        attn, s = layers[name], injected[name]
        context = s["context"] if s["context"] is not None else s["hidden"]
        with torch.no_grad():
            # the modulated run's output = the unmodulated run's probabilities applied to its own values
            expected, ref_probs = _explicit_attention(attn, s["hidden"][:1], context[:1], context[1:])
            torch.testing.assert_close(s["out"][1:], expected, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(s["out"][:1], _explicit_attention(attn, s["hidden"][:1], context[:1], context[:1])[0],
                                       atol=2e-5, rtol=1e-4)  # fmt: skip
            o = own[name]
            o_context = o["context"] if o["context"] is not None else o["hidden"]
            _, own_probs = _explicit_attention(attn, o["hidden"][1:], o_context[1:], o_context[1:])
            _, own_ref = _explicit_attention(attn, o["hidden"][:1], o_context[:1], o_context[:1])
        differs |= bool((own_probs - own_ref).abs().max() > 1e-4)
    assert differs, "without injection the modulated run's attention should differ somewhere (else the test is void)"


def test_pixel_assignment_on_a_synthetic_difference_map():
    truth = np.zeros((32, 32), dtype=np.int64)
    truth[:, 16:] = 1
    truth[8:20, 4:12] = 2
    rng = np.random.default_rng(0)
    change = np.stack([(truth == k) * 1.0 + 0.3 * rng.random(truth.shape) for k in range(3)])
    change[0, 3, 24] = 5.0  # one salt pixel in segment 1: wins without smoothing, not with it
    change = torch.from_numpy(change).float()
    assert assign_pixels(change, sigma=0)[3, 24] == 0
    smoothed = assign_pixels(change, sigma=1.0).numpy()
    assert smoothed[3, 24] == 1 and (smoothed == truth).mean() > 0.97
    exact = assign_pixels(torch.from_numpy(np.stack([(truth == k) * 1.0 for k in range(3)])).float()).numpy()
    np.testing.assert_array_equal(exact, truth)
    # resized to the image's size (nearest class regions scale with it)
    big = assign_pixels(torch.from_numpy(np.stack([(truth == k) * 1.0 for k in range(3)])).float(), size=(64, 64))
    np.testing.assert_array_equal(big.numpy()[::2, ::2], truth)


def test_runs_are_batched_with_their_references_within_the_limit():
    groups = plan_runs([[0, 1, 2], [4], [0, 3]], runs_per_forward=5)
    runs = [(r.image, r.segment, r.sign) for g in groups for r in g]
    expected = [(i, s, sign) for i, segs in enumerate([[0, 1, 2], [4], [0, 3]]) for s in segs for sign in (-1.0, 1.0)]
    assert runs == expected  # every run exactly once, in order
    assert all(len(g) + len({r.image for r in g}) <= 5 for g in groups)
    with pytest.raises(ValueError, match="runs_per_forward=1"):
        plan_runs([[0]], 1)


def test_batched_runs_equal_one_run_at_a_time(random_backbone):
    from stableseg_pp.methods.emerdiff import EmerDiff

    torch.manual_seed(1)
    latents, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    segments = [_segment(), (torch.arange(64).view(8, 8) % 3)]
    common = {"site": SITE, "grid": (8, 8), "timestep": 201, "sampler_steps": 10}
    batched = EmerDiff(random_backbone, runs_per_forward=16, **common).change_maps(latents, segments, noise)
    single = EmerDiff(random_backbone, runs_per_forward=2, **common).change_maps(latents, segments, noise)
    assert [sorted(m) for m in batched] == [[0, 1], [0, 1, 2]]
    for a, b in zip(batched, single, strict=True):
        for s in a:
            torch.testing.assert_close(a[s], b[s], atol=1e-4, rtol=1e-4)


def test_refine_emerdiff_writes_masks_and_scores_and_resumes_after_a_kill(compose_fit, miniature_model, monkeypatch):
    cfg = compose_fit("stage=1", "refine=emerdiff", *SMALL, *FAST)
    dataset = describe_dataset(cfg.data, list(cfg.stage0.splits))
    s0 = stage0.run(cfg, dataset)
    with killed_after_records(monkeypatch, 2) as calls:
        emerdiff.run(cfg, dataset, s0)
    out = next(Path(cfg.paths.run_dir).glob("emerdiff-*"))
    assert not (out / COMPLETE).exists() and not list(out.rglob("*.tmp*"))
    done = {p.stem: p.stat().st_mtime_ns for p in out.rglob("masks/*.png")}
    assert sorted(done) == sorted(calls)
    assert emerdiff.run(cfg, dataset, s0) == out
    assert all(p.stat().st_mtime_ns == done[p.stem] for p in out.rglob("masks/*.png") if p.stem in done)
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("train", "val"):
        entry = metrics[split]
        assert 0 <= entry["miou"] <= 1 and 0 <= entry["boundary_f"] <= 1
        stored = artifacts.load_stored_maps(out / split / "maps" / f"{split}_00000.npz")
        assert stored.scores.shape[-2:] == (64, 64)  # per-channel pixel change for a CRF after it
    assert json.loads((out / COMPLETE).read_text())["denoiser_rows_per_image"] > 0
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert emerdiff.run(cfg, dataset, s0) == out  # finished: no work
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_unsupervised_segments_on_the_composed_config(compose_fit, miniature_model):
    cfg = compose_fit("stage=0", "stage0.segmenter=emerdiff", "emerdiff_steps.clusters=3", *SMALL, *FAST)
    out = run(cfg)["0"]
    assert out.name.startswith("segments-") and (out / "centroids.npy").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("train", "val"):
        for layout in (artifacts.MaskSetLayout(out / split), artifacts.MaskSetLayout(out / "upsampled" / split)):
            masks = sorted(layout.masks.glob("*.png"))
            assert len(masks) == 3
            assert set(np.unique(np.array(Image.open(masks[0])))) <= {0, 1, 2}
        entry = metrics[split]
        assert entry["protocol"]["segments"] == "hungarian" and entry["upsampled"]["protocol"]["segments"]
        assert set(entry["assignment"]) <= {"0", "1", "2"} and 0 <= entry["upsampled"]["miou"] <= 1


def test_emerdiff_settings_errors(compose_fit):
    from stableseg_pp.runtime.errors import ConfigError
    from stableseg_pp.stages import check_segmenter, refinement

    with pytest.raises(ConfigError, match="refine=dense: use one of crf, emerdiff, emerdiff\\+crf, none"):
        refinement.check_refine("dense")
    with pytest.raises(ConfigError, match="stage0.segmenter=emerdiff writes class-agnostic segments"):
        check_segmenter("all", "emerdiff")
    with pytest.raises(ConfigError, match="emerdiff.site is not set for diffusion=sd35_medium"):
        emerdiff.emerdiff_settings(compose_fit("diffusion=sd35_medium"))
    with pytest.raises(ConfigError, match="emerdiff.timestep=0"):
        emerdiff.emerdiff_settings(compose_fit("emerdiff.timestep=0"))
    with pytest.raises(ConfigError, match="emerdiff.strength=0"):
        emerdiff.emerdiff_settings(compose_fit("emerdiff.strength=0"))
    # before any weights load: the site against the backbone's structure, a family that cannot sample
    with pytest.raises(ConfigError, match="emerdiff.site=down_blocks.0.attentions.0.transformer_blocks.0.attn1: not an"):
        emerdiff.check_emerdiff_settings(
            compose_fit("refine=emerdiff", "emerdiff.site=down_blocks.0.attentions.0.transformer_blocks.0.attn1"), True
        )
    emerdiff.check_emerdiff_settings(compose_fit("stage0.segmenter=emerdiff", "diffusion=miniature_mmdit"), False)
    emerdiff.check_emerdiff_settings(compose_fit("stage0.segmenter=emerdiff", "diffusion=miniature_flux"), False)
    from types import SimpleNamespace

    from stableseg_pp.models.emerdiff_module import require_generative

    with pytest.raises(ConfigError, match="does not implement GenerativeBackbone"):  # a family that cannot sample
        require_generative(SimpleNamespace(name="other", family="other"))
    emerdiff.check_emerdiff_settings(compose_fit("refine=emerdiff", "emerdiff.site=nowhere"), False)  # not used
