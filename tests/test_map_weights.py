"""The weight learner finds the informative attention maps on a constructed case."""

from __future__ import annotations

import torch

from stableseg_pp.methods.background import BackgroundRule
from stableseg_pp.methods.map_weights import MapExample, fit_map_weights


def _examples(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        target = torch.zeros(16, 16, dtype=torch.long)
        x, y = torch.randint(0, 8, (2,), generator=g).tolist()
        target[y : y + 6, x : x + 6] = 1
        x2, y2 = torch.randint(8, 12, (2,), generator=g).tolist()
        target[y2 : y2 + 4, x2 : x2 + 4] = 2
        onehot = torch.stack([(target == c).float() for c in (1, 2)])  # (2, 16, 16)
        maps = []
        for quality in (0.9, 0.5, 0.0, 0.0):  # two informative maps, two pure noise
            noise = torch.rand(2, 16, 16, generator=g)
            maps.append(quality * onehot + (1 - quality) * noise)
        target[0, 0] = 255  # an ignored pixel
        out.append(MapExample(maps=torch.stack(maps), target=target))
    return out


def test_learned_weights_rank_informative_maps_first():
    names = ["good", "fair", "noise_a", "noise_b"]
    model, history = fit_map_weights(_examples(), names, BackgroundRule(), epochs=60, lr=0.1, batch_size=16)
    w = model.as_dict()
    assert abs(sum(w.values()) - 1) < 1e-5
    assert w["good"] > w["fair"] > max(w["noise_a"], w["noise_b"])
    assert history[-1] < history[0]


def test_channel_mapping_without_background_ignores_unprompted_class_zero():
    """On a dataset without background, class 0 is a real class: unprompted, it has no channel (255), never channel 0."""
    import numpy as np

    from stableseg_pp.artifacts import ChannelClasses

    no_bg = ChannelClasses((3, 5), background_index=None)
    pred = np.array([[0, 3], [5, 7]], dtype=np.uint8)
    assert no_bg.to_channels(pred).tolist() == [[255, 1], [2, 255]]
    assert no_bg.to_classes(np.array([0, 1, 2, 255])).tolist() == [255, 3, 5, 255]
    with_bg = ChannelClasses((3, 5), background_index=0)
    assert with_bg.to_channels(pred).tolist() == [[0, 1], [2, 255]]
    assert with_bg.to_classes(np.array([0, 1, 2, 255])).tolist() == [0, 3, 5, 255]


def test_site_weights_round_trip_and_refuse_another_family(tmp_path, random_backbone):
    import json

    import pytest

    from stableseg_pp.artifacts import SiteWeights
    from stableseg_pp.methods.stableseg import StableSeg

    sites = [s.id for s in random_backbone.sites(64) if s.kind == "cross" and s.side in (8, 16)]
    learned = SiteWeights("sd_unet", {sites[0]: 0.25, sites[1]: 0.75})
    learned.save(tmp_path)
    again = SiteWeights.load(tmp_path)
    assert again == learned and json.loads((tmp_path / "weights.json").read_text())["family"] == "sd_unet"
    seg = StableSeg(random_backbone, resolution=64, mode="ca", site_weights=again.weights)
    assert seg.site_weights == {sites[0]: 0.25, sites[1]: 0.75}

    with pytest.raises(ValueError, match=r"learned on a 'sd3_mmdit' backbone, but this backbone is 'sd_unet'"):
        SiteWeights("sd3_mmdit", {"transformer_blocks.9.attn": 1.0}).check_family(random_backbone.family)
    with pytest.raises(ValueError, match="not captured"):
        StableSeg(random_backbone, resolution=64, mode="ca", site_weights={"transformer_blocks.9.attn": 1.0})
    (tmp_path / "old.json").write_text(json.dumps({sites[0]: 1.0}))  # the flat format of earlier versions
    with pytest.raises(ValueError, match=r"old.json: not a weights file"):
        SiteWeights.load(tmp_path / "old.json")


def test_learning_without_a_background_class_stays_finite():
    """No background (threshold None): channel 0 can never win, and the fit must not turn NaN through it."""
    examples = _examples(n=16)
    for e in examples:  # targets name only the two classes (channels 1, 2) or are ignored
        e.target[e.target == 0] = 255
    model, history = fit_map_weights(examples, ["good", "fair", "noise_a", "noise_b"], BackgroundRule("none"), epochs=20, lr=0.1)
    w = model.as_dict()
    assert all(torch.isfinite(torch.tensor(list(w.values())))) and all(torch.isfinite(torch.tensor(history)))
    assert w["good"] > max(w["noise_a"], w["noise_b"])
    logits = model(torch.stack([examples[0].maps]))
    assert torch.isinf(logits[:, 0]).all() and torch.isfinite(logits[:, 1:]).all()
