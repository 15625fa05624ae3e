"""StableSeg's modes and background options on the miniature model."""

from __future__ import annotations

import pytest
import torch

from stableseg_pp.backbones.sd_unet import SDUNetBackbone
from stableseg_pp.data.miniature import CLASS_NAMES, draw_sample
from stableseg_pp.methods.stableseg import StableSeg


@pytest.fixture(scope="module")
def batch():
    samples = [draw_sample(s) for s in (11, 12)]
    pixels = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 127.5 - 1 for s in samples])
    names = [[CLASS_NAMES[c] for c in s.classes] for s in samples]
    return pixels, names, samples


@pytest.fixture(scope="module")
def backbone(miniature_model):
    return SDUNetBackbone(pretrained=str(miniature_model)).load()


@pytest.mark.parametrize("mode", ["ca", "sa", "ca+sa"])
def test_modes_give_scores_for_the_named_classes(backbone, batch, mode):
    pixels, names, _ = batch
    seg = StableSeg(backbone, resolution=64, mode=mode)
    out = seg(pixels, names)
    k = 1 + max(len(n) for n in names)
    assert out.scores.shape == (2, k, 64, 64) and out.valid.shape == (2, k)
    for i, n in enumerate(names):
        assert out.valid[i].sum() == 1 + len(n)
        assert out.labels[i].max() <= len(n)
    assert set(out.cross_maps) == {s.id for s in seg.cross_sites}
    if mode != "ca":
        sa = out.scores - (out.capm if mode == "ca+sa" else 0)
        torch.testing.assert_close(sa.sum(1), torch.ones(2, 64, 64), rtol=1e-4, atol=1e-4)


def test_background_word_takes_channel_zero(backbone, batch):
    pixels, names, _ = batch
    seg = StableSeg(backbone, resolution=64, mode="ca", background="word", background_word="background")
    out = seg(pixels, names)
    ref = StableSeg(backbone, resolution=64, mode="ca")(pixels, names)
    assert out.scores.shape == ref.scores.shape
    assert torch.equal(out.valid, ref.valid)
    assert not torch.allclose(out.capm[:, 0], ref.capm[:, 0])  # a map, not a constant threshold


def test_learned_site_weights_change_the_aggregate(backbone, batch):
    pixels, names, _ = batch
    uniform = StableSeg(backbone, resolution=64, mode="ca")
    first = uniform.aggregated_sites[0].id
    only_first = StableSeg(backbone, resolution=64, mode="ca", site_weights={first: 1.0})
    a, b = uniform(pixels, names), only_first(pixels, names)
    assert not torch.allclose(a.capm, b.capm)
    with pytest.raises(ValueError, match="not captured"):
        StableSeg(backbone, resolution=64, site_weights={"nope": 1.0})


def test_noise_and_timestep_are_used(backbone, miniature_model, batch):
    pixels, names, _ = batch
    clean = StableSeg(backbone, resolution=64, mode="ca")(pixels, names)
    noisy_backbone = SDUNetBackbone(pretrained=str(miniature_model), timestep=400, add_noise=True).load()
    assert noisy_backbone.stochastic and not backbone.stochastic
    noisy = StableSeg(noisy_backbone, resolution=64, mode="ca")(pixels, names, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(clean.capm, noisy.capm)


def test_per_image_noise_is_the_same_whatever_the_batch(miniature_model, batch):
    """Stage 0 seeds each image's noise from (seed, image id): an image gets the same noise, so the same maps, alone
    or in a batch, before or after other draws of torch's global generator (a resumed run, another rank)."""
    from stableseg_pp.backbones.base import draw_noise, image_generators

    pixels, names, _ = batch
    latents = torch.zeros(2, 4, 8, 8)
    pair = draw_noise(latents, image_generators(0, ["a", "b"]))
    torch.testing.assert_close(draw_noise(latents[:1], image_generators(0, ["b"]))[0], pair[1])
    assert not torch.equal(pair[0], pair[1]) and not torch.equal(draw_noise(latents[:1], image_generators(1, ["b"]))[0], pair[1])
    with pytest.raises(ValueError, match="1 generators for 2 latents"):
        draw_noise(latents, image_generators(0, ["a"]))
    noisy = SDUNetBackbone(pretrained=str(miniature_model), timestep=400, add_noise=True).load()
    seg = StableSeg(noisy, resolution=64, mode="ca")
    ids = [f"img{i}" for i in range(len(names))]
    assert len(ids) > 1
    together = seg(pixels, names, generator=image_generators(0, ids))
    torch.rand(7)  # the global generator moves; per-image noise does not follow it
    alone = seg(pixels[-1:], names[-1:], generator=image_generators(0, ids[-1:]))
    torch.testing.assert_close(alone.capm[0], together.capm[-1], atol=1e-5, rtol=1e-4)


def test_two_segmenters_on_one_backbone_keep_their_own_capture(backbone, batch):
    """Each StableSeg reinstalls its own processors, so the last one built does not steal the other's maps."""
    pixels, names, _ = batch
    a = StableSeg(backbone, resolution=64, mode="ca", cross_scales=[16], stored_cross_scales=[16])
    b = StableSeg(backbone, resolution=64, mode="ca", cross_scales=[8], stored_cross_scales=[8])
    out_a, out_b = a(pixels, names), b(pixels, names)
    assert set(out_a.cross_maps) == {s.id for s in a.cross_sites} != set(out_b.cross_maps)


def test_sites_and_prompt_checks_before_loading_weights(backbone, miniature_model):
    """The structure comes from the configs (a U-Net on the meta device): settings are checked before weights load."""
    from stableseg_pp.backbones.prompts import PromptTooLongError

    fresh = SDUNetBackbone(pretrained=str(miniature_model))
    assert [(s.id, s.kind, s.grid, s.depth) for s in fresh.sites(64)] == [
        (s.id, s.kind, s.grid, s.depth) for s in backbone.sites(64)
    ]
    assert not fresh.loaded
    fresh.check_prompt(["circle", "half moon"], "a photo of a {}", " and ")
    with pytest.raises(PromptTooLongError, match="tokens but the text encoder takes 77"):
        fresh.check_prompt([f"c{i}" for i in range(60)], "a photo of a {}", " and ")
    with pytest.raises(LookupError):
        SDUNetBackbone(pretrained="someorg/not-cached").sites(64)


def test_long_class_lists_are_split_over_prompts(backbone):
    from stableseg_pp.backbones.prompts import PromptTooLongError
    from stableseg_pp.methods.stableseg import split_into_prompts

    names = list(CLASS_NAMES[1:])
    assert split_into_prompts(backbone, names, "a photo of a {}", " and ", 2) == [[0, 1], [2, 3], [4, 5]]
    many = [f"{n} {i}" for i in range(30) for n in names]  # 180 names: far more than one prompt holds
    groups = split_into_prompts(backbone, many, "a photo of a {}", " and ")
    assert len(groups) > 1 and [i for g in groups for i in g] == list(range(len(many)))
    for g in groups:  # each group is one prompt that fits
        backbone.check_prompt([many[i] for i in g], "a photo of a {}", " and ")
    with pytest.raises(PromptTooLongError):
        split_into_prompts(backbone, ["circle", " ".join(["star"] * 80)], "a photo of a {}", " and ")


def test_split_prompts_give_the_maps_of_separate_prompts(backbone, batch):
    """Each group of a split class list is one forward: its classes' maps equal a run with that group's prompt alone."""
    pixels, _, _ = batch
    names = [list(CLASS_NAMES[1:6]), list(CLASS_NAMES[2:5])]
    split = StableSeg(backbone, resolution=64, mode="ca+sa", max_classes_per_prompt=2)
    out = split(pixels, names)
    assert out.scores.shape == (2, 6, 64, 64) and out.valid.sum(1).tolist() == [6, 4]
    whole = StableSeg(backbone, resolution=64, mode="ca+sa")
    for i, image_names in enumerate(names):
        for start in range(0, len(image_names), 2):
            group = image_names[start : start + 2]
            alone = whole(pixels[i : i + 1], [group])
            for site, maps in out.cross_maps.items():
                torch.testing.assert_close(maps[i, start : start + len(group)], alone.cross_maps[site][0], rtol=1e-4, atol=1e-5)


def test_single_file_checkpoints_are_accepted_with_clear_errors(tmp_path, miniature_model, monkeypatch):
    """diffusion.pretrained may name a .safetensors/.ckpt file (from_single_file); its identity is its content,
    its configs come from diffusion.single_file_config; without them offline the error says what to set."""
    from safetensors.torch import save_file

    from stableseg_pp.runtime.errors import ConfigError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    alone = SDUNetBackbone(pretrained=str(path))
    assert alone.identity()["file"] == "model.safetensors" and "fingerprint" in alone.identity()
    with pytest.raises(LookupError):  # no configs without the hub: the pre-flight check is skipped, not wrong
        alone.sites(64)
    with pytest.raises(ConfigError, match="single-file checkpoint could not be loaded.*diffusion.single_file_config"):
        alone.load()
    configured = SDUNetBackbone(pretrained=str(path), single_file_config=str(miniature_model))
    assert len(configured.sites(64)) == len(SDUNetBackbone(pretrained=str(miniature_model)).sites(64))
    with pytest.raises(ConfigError, match="single-file checkpoint could not be loaded"):
        configured.load()  # this file holds no model weights
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a single-file checkpoint"):
        SDUNetBackbone(pretrained=str(tmp_path / "notes.txt")).sites(64)


def test_class_weights_decide_between_classes_and_never_against_the_background():
    """weigh_classes: where two classes claim a pixel the surer one wins; the strongest class keeps its unweighted
    value, so which pixels are background is unchanged; equal (or proportional) weights change nothing."""
    from stableseg_pp.methods.stableseg import weigh_classes

    capm = torch.zeros(1, 3, 2, 2)
    capm[0, 0] = 0.5  # background threshold
    capm[0, 1] = torch.tensor([[1.0, 0.9], [0.2, 0.0]])  # class a
    capm[0, 2] = torch.tensor([[0.8, 1.0], [0.1, 0.3]])  # class b: claims the second pixel more than a does
    before = capm.argmax(1)
    assert torch.equal(weigh_classes(capm, torch.ones(1, 2)), capm)
    assert torch.allclose(weigh_classes(capm, torch.tensor([[0.3, 0.3]])), capm)
    out = weigh_classes(capm, torch.tensor([[0.9, 0.5]]))  # the labeler is surer of a
    assert torch.allclose(out[:, 1:].amax(1), capm[:, 1:].amax(1))  # each pixel's strongest class value kept
    assert torch.equal(out[:, 0], capm[:, 0])
    after = out.argmax(1)
    assert before[0, 0, 1] == 2 and after[0, 0, 1] == 1  # a takes the pixel both claim
    assert torch.equal((after == 0), (before == 0))  # background where it was, nowhere else
    assert after[0, 1, 0] == before[0, 1, 0] == 0 and after[0, 1, 1] == before[0, 1, 1] == 0
