"""Experiment tracking: W&B offline run files read back (not mocked), the CSV tracker, runs ended on error."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stableseg_pp.fit import run
from stableseg_pp.tracking import WandbTracker
from tests.test_self_training import SMALL
from tests.wandb_files import read_offline_runs


@pytest.mark.slow
def test_wandb_offline_run_holds_metrics_masks_and_lineage(compose_fit, miniature_model, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    seg_dir = run(compose_fit("stage=1", *SMALL, "logger=wandb", "logger.n_samples=4"))["1"]
    run_dir = seg_dir.parent
    runs = read_offline_runs(run_dir / "wandb")
    assert [r.job_type for r in runs] == ["stage0", "crf", "deeplab"]  # kind = folder prefix = module
    assert all(r.exit_code == 0 and r.group == "miniature-miniature_sd" for r in runs)
    stage0, crf, seg = runs
    # each step's folder is its artifact; the consumer names its input folders
    assert seg.artifacts == [(seg_dir.name, "deeplab")]
    assert seg.config["step"]["inputs"] == [str(run_dir / crf.artifacts[0][0])]
    assert crf.config["step"]["inputs"] == [str(run_dir / stage0.artifacts[0][0])]
    assert seg.config["segmenter"]["train"]["max_epochs"] == 2  # the resolved config

    # training curves against the trainer step, and the step's results
    assert {"train/loss_epoch", "val/miou", "trainer/global_step"} <= seg.logged_keys
    final = [h for h in seg.history if "val/per_class_iou/circle" in h][-1]
    metrics = json.loads((seg_dir / "metrics.json").read_text())
    assert final["val/miou"] == pytest.approx(metrics["val"]["miou"])

    # val images with class-labelled masks: prediction, the pseudo-masks it learned from, ground truth
    logged = [h for h in seg.history if "val/masks/count" in h][-1]
    assert logged["val/masks/count"] == 4 and logged["val/masks/captions"][0] == "val_00000"
    first = logged["val/masks/all_masks"][0]
    assert set(first) == {"prediction", "pseudo_mask", "ground_truth"}
    pred_png = seg.folder / "files" / first["prediction"]["path"]
    ours = np.array(Image.open(seg_dir / "val" / "masks" / "val_00000.png"))
    assert np.array_equal(np.array(Image.open(pred_png)), ours)
    referenced = [m["path"] for entry in logged["val/masks/all_masks"] for m in entry.values()]
    referenced += logged["val/masks/filenames"]
    assert len(referenced) == 4 * 4 and all((seg.folder / "files" / p).exists() for p in referenced)


def test_wandb_run_is_finished_with_an_error_code_when_the_step_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = WandbTracker(save_dir=tmp_path, group="g")
    tracker.start({"seed": 0})
    folder = tmp_path / "stage0-abc"
    folder.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.step(folder) as record:
            record.log_metrics({"val/miou": 0.5})
            raise RuntimeError("boom")
    (failed,) = read_offline_runs(tmp_path / "wandb")
    assert failed.exit_code == 1 and failed.artifacts == []  # no artifact for an unfinished folder
    assert any(h.get("val/miou") == 0.5 for h in failed.history)


def test_csv_tracker_collects_every_step(compose_fit, miniature_model):
    cfg = compose_fit("stage=0", *SMALL, "logger=csv")
    out = run(cfg)["0"]
    with open(Path(cfg.paths.run_dir) / "tracking.csv") as f:
        rows = list(csv.DictReader(f))
    val = {r["metric"]: float(r["value"]) for r in rows if r["step"] == out.name}
    assert val["val/miou"] == pytest.approx(json.loads((out / "metrics.json").read_text())["val"]["miou"])
    assert {r["kind"] for r in rows} == {"stage0"}
