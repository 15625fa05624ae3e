"""The grounding-expert analysis and per-head map weights: a constructed case, per-head capture, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stableseg_pp.backbones.base import AttentionSite, AttentionStore, head_map_id, parse_map_id
from stableseg_pp.backbones.capture import CrossAttentionMapProcessor
from stableseg_pp.methods.background import BackgroundRule
from stableseg_pp.methods.map_weights import MapExample, fit_map_weights
from stableseg_pp.stages.layers import ALL_SITES, MapScorer, analysis_table

SITES = [AttentionSite(f"block{i}", "cross", (16, 16), i, heads=4) for i in range(3)]
EXPERT, EXPERT_HEAD = "block1", 2


def constructed_images(n: int = 24, seed: int = 0):
    """Images of two classes; the maps of every (site, head) are noise except one head of one site, which carries
    the target. Each site's head-mean map is the mean of its heads (so the expert site is the best site too)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        gt = torch.zeros(16, 16, dtype=torch.long)
        x, y = torch.randint(0, 7, (2,), generator=g).tolist()
        gt[y : y + 7, x : x + 7] = 1
        x2, y2 = torch.randint(9, 12, (2,), generator=g).tolist()
        gt[y2 : y2 + 4, x2 : x2 + 4] = 2
        onehot = torch.stack([(gt == c).float() for c in (1, 2)])
        maps = {}
        for site in SITES:
            heads = []
            for h in range(site.heads):
                noise = torch.rand(2, 16, 16, generator=g)
                heads.append(0.9 * onehot + 0.1 * noise if (site.id, h) == (EXPERT, EXPERT_HEAD) else noise)
                maps[head_map_id(site.id, h)] = heads[-1].numpy()
            maps[site.id] = torch.stack(heads).mean(0).numpy()
        yield maps, gt


def test_analysis_ranks_the_informative_site_and_head_first():
    scorer = MapScorer(n_classes=3, resolution=16, background=BackgroundRule(), background_index=0)
    for maps, gt in constructed_images():
        means = {ALL_SITES: dict.fromkeys((s.id for s in SITES), 1.0)}
        scorer.add_image(maps, means, [1, 2], gt.numpy().astype(np.uint8))
    miou = {name: r["miou"] for name, r in scorer.results(["background", "a", "b"]).items()}
    rows, summary = analysis_table(SITES, miou, {ALL_SITES: miou[ALL_SITES]})
    assert summary["best_site"] == EXPERT
    assert summary["best_head"] == head_map_id(EXPERT, EXPERT_HEAD)
    assert summary["best_head_miou"] > 0.9 > max(v for r in rows for v in r["heads"] if v != summary["best_head_miou"])
    assert [r["site"] for r in rows] == [s.id for s in SITES] and all(len(r["heads"]) == 4 for r in rows)


def test_per_head_learner_gives_the_informative_head_the_largest_weight():
    examples, names = [], None
    for maps, gt in constructed_images(seed=1):
        heads = sorted(n for n in maps if parse_map_id(n)[1] is not None)
        names = names or heads
        stack = torch.stack([torch.from_numpy(maps[n]) for n in heads])
        examples.append(MapExample(maps=stack, target=gt))
    model, history = fit_map_weights(examples, names, BackgroundRule(), epochs=60, lr=0.1, batch_size=8)
    weights = model.as_dict()
    assert max(weights, key=weights.get) == head_map_id(EXPERT, EXPERT_HEAD)
    assert len(weights) == 12 and history[-1] < history[0]


def test_map_ids_name_a_site_or_one_of_its_heads():
    assert head_map_id("up_blocks.1.attn2", 3) == "up_blocks.1.attn2/head3"
    assert parse_map_id("up_blocks.1.attn2/head3") == ("up_blocks.1.attn2", 3)
    assert parse_map_id("transformer_blocks.9.attn") == ("transformer_blocks.9.attn", None)


def test_cross_processor_keeps_each_heads_class_maps():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8).eval()
    x, ctx = torch.randn(2, 20, 32), torch.randn(2, 7, 16)
    weights = torch.rand(2, 7, 3)
    store = AttentionStore()
    store.reset(weights, (5, 4))
    CrossAttentionMapProcessor(store, "l", per_head=True)(attn, x, encoder_hidden_states=ctx)
    q = attn.to_q(x).view(2, -1, 4, 8).transpose(1, 2)
    k = attn.to_k(ctx).view(2, -1, 4, 8).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)  # (2, 4, 20, 7): per head
    expected = (probs @ weights[:, None]).transpose(-1, -2).reshape(2, 4, 3, 5, 4)
    torch.testing.assert_close(store.cross_heads["l"], expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(store.cross_heads["l"].mean(1), store.cross["l"], rtol=1e-5, atol=1e-6)
    maps = store.class_maps()
    assert set(maps) == {"l", *(head_map_id("l", h) for h in range(4))}


def test_stableseg_stores_head_maps_and_uses_per_head_weights(random_backbone):
    from stableseg_pp.methods.stableseg import StableSeg

    sites = [s for s in random_backbone.sites(64) if s.kind == "cross" and s.side == 8]
    seg = StableSeg(random_backbone, resolution=64, cross_scales=[8], stored_cross_scales=[8], mode="ca", store_head_maps=True)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    out = seg(pixels, [["circle", "square"]])
    assert set(out.cross_maps) == {s.id for s in sites} | {head_map_id(s.id, h) for s in sites for h in range(s.heads)}
    # all the weight on one head: CAPM is that head's map alone
    one = head_map_id(sites[0].id, 1)
    weighted = StableSeg(random_backbone, resolution=64, cross_scales=[8], stored_cross_scales=[8], mode="ca",
                         site_weights={one: 1.0})  # fmt: skip
    assert weighted.capture.head_maps == (sites[0].id,)
    got = weighted(pixels, [["circle", "square"]])
    from stableseg_pp.methods.capm import aggregate_maps, minmax_normalize

    expected = minmax_normalize(aggregate_maps({one: out.cross_maps[one]}, {one: 1.0}, (64, 64)))
    torch.testing.assert_close(got.capm[:, 1:], expected, rtol=1e-5, atol=1e-6)
    import pytest

    from stableseg_pp.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="not captured"):
        StableSeg(random_backbone, resolution=64, cross_scales=[8], mode="ca", site_weights={f"{sites[0].id}/head99": 1.0})


def test_analyze_layers_command(tmp_path):
    """``python -m stableseg_pp.analyze layers`` on a few images: table, JSON and heat map; a second run does no work."""
    from stableseg_pp.analyze import main

    args = ["layers", f"paths.root_dir={tmp_path}", "diffusion=miniature_mmdit", "data.generate.n_train=4",
            "data.generate.n_val=6", "trainer.accelerator=cpu", "analyze.images=5"]  # fmt: skip
    out = main(args)
    result = json.loads((out / "layers.json").read_text())
    assert result["images"] == 5 and len(result["sites"]) == 5
    assert all(len(r["heads"]) == 4 and all(0 <= v <= 1 for v in r["heads"]) for r in result["sites"])
    assert result["best_site"] == max(result["sites"], key=lambda r: r["miou"])["site"]
    assert (out / "heatmap.png").stat().st_size > 0
    assert "Grounding expert" in (out / "layers.md").read_text()
    stage0 = next(out.parent.glob("stage0-*"))
    assert not (stage0 / "train").exists() and len(list((stage0 / "val" / "masks").glob("*.png"))) == 5
    stamp = (out / "layers.json").stat().st_mtime_ns
    assert main(args) == out and (out / "layers.json").stat().st_mtime_ns == stamp


def test_stored_maps_are_scored_under_one_stated_background_rule(tmp_path, caplog):
    """Stage 2 refuses background=word (tested in test_errors); the analysis, which only ranks maps, scores them
    against the constant threshold and says so; a rule without a constant channel is refused by the scorer."""
    from stableseg_pp.analyze import analysis_config
    from stableseg_pp.data.description import describe_dataset
    from stableseg_pp.runtime.errors import ConfigError
    from stableseg_pp.stages.layers import scoring_rule

    cfg = analysis_config([f"paths.root_dir={tmp_path}", "zero_shot.background=word", "zero_shot.background_threshold=0.4"])
    dataset = describe_dataset(cfg.data, ["val"])
    rule = scoring_rule(cfg, dataset)
    assert (rule.kind, rule.constant) == ("threshold", 0.4) and "word's map is not stored" in caplog.text
    with pytest.raises(ConfigError, match="zero_shot.background=word: the layer analysis"):
        MapScorer(n_classes=3, resolution=16, background=BackgroundRule("word"), background_index=0)
    rule = BackgroundRule.for_dataset("word", 0.5, "background", has_background=False)
    assert rule.kind == "none" and rule.constant is None
    scores = rule.prepend(torch.rand(2, 3, 4, 4))
    assert torch.isneginf(scores[:, 0]).all() and scores.shape == (2, 4, 4, 4)
