"""The shipped miniature model segments for real: stage 0 beats both trivial baselines on val."""

from __future__ import annotations

import json

import pytest

from stableseg_pp.bench.baselines import baselines
from stableseg_pp.fit import run


@pytest.mark.slow
def test_stage0_beats_trivial_baselines_on_val(compose_fit, miniature_model):
    cfg = compose_fit("stage=0", "zero_shot.splits=[val]")
    out = run(cfg)["0"]
    miou = json.loads((out / "metrics.json").read_text())["val"]["miou"]
    base = baselines(cfg.data.root, "val")
    assert miou >= 0.45
    assert miou > base["all_background"] and miou > base["gt_foreground_random_present_class"]
