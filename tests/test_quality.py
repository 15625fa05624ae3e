"""The shipped miniature models segment for real: stage 0 beats both trivial baselines on val."""

from __future__ import annotations

import json

import pytest

from stableseg_pp.bench.baselines import baselines
from stableseg_pp.fit import run

# val mIoU floors below what each shipped preset measures (miniature_sd 0.559, miniature_mmdit 0.810; docs/mmdit.md)
FLOOR_SD = 0.45
FLOOR_MMDIT = 0.70


@pytest.mark.slow
@pytest.mark.parametrize(("diffusion", "floor"), [("miniature_sd", FLOOR_SD), ("miniature_mmdit", FLOOR_MMDIT)])
def test_stage0_beats_trivial_baselines_on_val(compose_fit, miniature_model, diffusion, floor):
    cfg = compose_fit("stage=0", "stage0.splits=[val]", f"diffusion={diffusion}")
    out = run(cfg)["0"]
    miou = json.loads((out / "metrics.json").read_text())["val"]["miou"]
    base = baselines(cfg.data.root, "val")
    assert miou >= floor
    assert miou > base["all_background"] and miou > base["gt_foreground_random_present_class"]
