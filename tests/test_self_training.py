"""Stages 1 and 2 end to end on a small part of the miniature world; resuming; no work twice."""

from __future__ import annotations

import json
import operator
import signal
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from stableseg_pp.data.miniature import CLASS_NAMES, write_miniature_voc
from stableseg_pp.data.palette import save_palette_png
from stableseg_pp.evaluation.fit_check import check_segmenter_fit
from stableseg_pp.figure import main as figure_main
from stableseg_pp.fit import run
from stableseg_pp.models.deeplab import DeepLabV3PlusModule
from stableseg_pp.runtime.atomic import atomic_save
from stableseg_pp.runtime.errors import ConfigError, report_errors
from stableseg_pp.stages import crf
from stableseg_pp.stages.deeplab import derived_side, training_plan
from tests.conftest import file_stamps as _files
from tests.conftest import killed_after_records

SMALL = [
    "data.generate.n_train=16",
    "data.generate.n_val=6",
    "stage0.n_overlays=1",
    "segmenter.train.max_epochs=2",
    "segmenter.train.batch_size=8",
    "map_weights.epochs=3",
    "crf.workers=1",
]


@pytest.mark.slow
def test_stage1_then_all_then_nothing_to_do(compose_fit, miniature_model):
    seg_dir = run(compose_fit("stage=1", *SMALL))["1"]
    run_dir = seg_dir.parent
    crf_dir = next(run_dir.glob("crf-*"))
    assert len(list((crf_dir / "train" / "masks").glob("*.png"))) == 16
    assert json.loads((crf_dir / "metrics.json").read_text())["val"]["miou"] > 0
    assert (seg_dir / "checkpoints" / "last.ckpt").exists()
    preds = sorted((seg_dir / "train" / "masks").glob("*.png"))
    assert len(preds) == 16 and np.array(Image.open(preds[0])).max() < 7
    assert 0 <= json.loads((seg_dir / "metrics.json").read_text())["val"]["miou"] <= 1

    final = run(compose_fit("stage=all", *SMALL))["2"]
    assert final != seg_dir  # the retrained model has its own folder
    weights = json.loads(next(run_dir.glob("weights-*")).joinpath("weights.json").read_text())
    assert weights["family"] == "sd_unet"
    assert len(weights["sites"]) >= 4 and abs(sum(weights["sites"].values()) - 1) < 1e-4
    assert len(list(run_dir.glob("stage0-*"))) == 2  # the regenerated masks have their own folder
    table = json.loads((run_dir / "results.json").read_text())
    assert [r["step"].split(" (")[0] for r in table][:3] == ["init", "init + CRF", "+"]
    assert len(table) == 6 and all(r["val_miou"] is not None for r in table)
    assert (run_dir / "results.md").read_text().startswith("| step | val mIoU | labels |")
    assert {r["labels"] for r in table} == {"oracle"}  # the label protocol of the run, a column of the table

    for step in (crf_dir, seg_dir, final):  # every mask-producing step draws a few val overlays
        assert len(list((step / "val" / "overlays").glob("*.png"))) == 1  # stage0.n_overlays=1
    picture = figure_main([f"paths.root_dir={run_dir.parent.parent}", "trainer.accelerator=cpu", *SMALL,
                           "--out", str(run_dir.parent.parent / "pipeline.png"), "--images", "2"])  # fmt: skip
    assert Image.open(picture).size[0] > 5 * 128  # image, pseudo-masks, CRF, ++, ground truth side by side

    before = _files(run_dir)
    run(compose_fit("stage=all", *SMALL))
    after = _files(run_dir)
    changed = {k for k in after if before.get(k) != after[k] and not k.startswith(("hydra", ".locks"))}
    assert changed <= {"results.md", "results.json"}  # only the table is rewritten


@contextmanager
def _dying_crf_writes(monkeypatch, n: int):
    """Within the block, the CRF step dies (``RuntimeError("killed")``) when writing its mask after the first ``n``."""
    written: list[Path] = []

    def dying(path, write):
        if len(written) == n:
            raise RuntimeError("killed")
        written.append(Path(path))
        return atomic_save(path, write)

    monkeypatch.setattr(crf, "atomic_save", dying)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            yield written
    finally:
        monkeypatch.setattr(crf, "atomic_save", atomic_save)


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_table_exactly(compose_fit, miniature_model, monkeypatch):
    """Kills in stage 0, the CRF and both DeepLabV3+ trainings (after an epoch's checkpoint), each followed by the
    same command again: every row of the table equals the uninterrupted run's, figure for figure."""
    settings = ["stage=all", *SMALL, "segmenter.train.max_epochs=3"]
    uninterrupted = run(compose_fit(*settings, "run_name=uninterrupted"))["2"].parent
    expected = json.loads((uninterrupted / "results.json").read_text())

    starts: list[int] = []
    original_start = DeepLabV3PlusModule.on_train_epoch_start
    killed: set[str] = set()  # the trainings (by folder) killed once already

    def on_train_epoch_start(self):
        starts.append(self.current_epoch)
        folder = str(self.trainer.default_root_dir)
        if self.current_epoch == 1 and folder not in killed:
            killed.add(folder)
            raise RuntimeError("killed")
        original_start(self)

    monkeypatch.setattr(DeepLabV3PlusModule, "on_train_epoch_start", on_train_epoch_start)
    cfg = compose_fit(*settings, "run_name=resumed")
    run_dir = Path(cfg.paths.run_dir)
    with killed_after_records(monkeypatch, 5):  # stage 0, in the middle of the train split
        run(cfg)
    with _dying_crf_writes(monkeypatch, 5):
        run(cfg)
    for _round in (1, 2):  # each training dies as its second epoch starts, after the first epoch's checkpoint
        with pytest.raises(RuntimeError, match="killed"):
            run(cfg)
        starts.clear()
    run(cfg)
    assert len(killed) == 2
    assert starts[0] == 1  # the last resumed training did not train its first epoch again
    assert json.loads((run_dir / "results.json").read_text()) == expected
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]  # no temporary file left behind


@pytest.mark.slow
def test_changed_setting_recomputes_only_what_depends_on_it(compose_fit, miniature_model):
    first = run(compose_fit("stage=1", *SMALL))["1"]
    run_dir = first.parent
    stage0 = next(run_dir.glob("stage0-*"))
    stamps = _files(stage0)
    run(compose_fit("stage=1", *SMALL, "crf.iterations=3"))
    assert [p.name for p in run_dir.glob("stage0-*")] == [stage0.name] and _files(stage0) == stamps
    assert len(list(run_dir.glob("crf-*"))) == 2 and len(list(run_dir.glob("deeplab-*"))) == 2
    run(compose_fit("stage=1", *SMALL, "crf.iterations=3", "segmenter.model.lr=0.05"))
    assert len(list(run_dir.glob("crf-*"))) == 2 and len(list(run_dir.glob("deeplab-*"))) == 3


@pytest.mark.slow
def test_ctrl_c_during_training_exits_130_and_the_same_command_resumes(compose_fit, miniature_model, monkeypatch, capsys):
    starts: list[int] = []

    def on_train_epoch_start(self):  # Ctrl+C: Python raises KeyboardInterrupt wherever the main thread is
        starts.append(self.current_epoch)
        if self.current_epoch == 1 and not getattr(self, "_resumed", False):
            raise KeyboardInterrupt

    monkeypatch.setattr(DeepLabV3PlusModule, "on_train_epoch_start", on_train_epoch_start)
    cfg = compose_fit("stage=1", *SMALL)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as stop:
            report_errors(lambda: run(cfg), False, "HYDRA_FULL_ERROR=1", "stableseg_pp.fit")
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl+C while it shuts down
    assert stop.value.code == 130
    assert "stableseg_pp.fit: interrupted; run the same command again to resume" in capsys.readouterr().err
    seg_dir = next(Path(cfg.paths.run_dir).glob("deeplab-*"))
    assert (seg_dir / "checkpoints" / "last.ckpt").exists() and not (seg_dir / "_COMPLETE.json").exists()
    starts.clear()
    monkeypatch.setattr(DeepLabV3PlusModule, "_resumed", True, raising=False)
    run(compose_fit("stage=1", *SMALL))
    assert starts == [1] and (seg_dir / "_COMPLETE.json").exists()


def test_training_plan_follows_the_data(compose_fit):
    cfg = compose_fit()  # deeplabv3plus_small: iterations 300, sizes from the pictures
    pictures = SimpleNamespace(image_side=lambda split: 64)
    assert KEYS(training_plan(cfg, pictures, 400)) == (64, 64, 12)  # the miniature world: its 12 epochs of 64 px
    photos = SimpleNamespace(image_side=lambda split: 128)
    assert KEYS(training_plan(cfg, photos, 40)) == (128, 128, 150)  # 2 steps per epoch: 150 epochs for 300 steps
    assert derived_side(375) == 384 and derived_side(700) == 512 and derived_side(10) == 32
    fixed = compose_fit("segmenter=deeplabv3plus")  # the paper's preset keeps its own sizes and epochs
    assert KEYS(training_plan(fixed, photos, 40)) == (512, 512, 30)
    with pytest.raises(ConfigError, match="segmenter.train.iterations=None"):
        training_plan(compose_fit("segmenter.train.iterations=null"), photos, 40)


KEYS = operator.itemgetter("crop_size", "base_size", "max_epochs")


@pytest.mark.slow
def test_a_segmenter_below_its_pseudo_masks_is_a_loud_warning(compose_fit, miniature_model, caplog):
    short = [s for s in SMALL if not s.startswith("segmenter.train.max_epochs")]
    final = run(compose_fit("stage=all", *short, "segmenter.train.max_epochs=null", "segmenter.train.iterations=1"))["2"]
    fit = json.loads((final / "_COMPLETE.json").read_text())["splits"]["train"]["fit_to_masks"]
    assert fit["basis"] == "val mIoU" and fit["segmenter"] < fit["training_masks"] and "below the" in fit["warning"]
    results = (final.parent / "results.md").read_text()
    assert "| ++ (DeepLabV3+, round 2) (**see warning**) |" in results and "**Warning (++ (DeepLabV3+, round 2)):**" in results
    assert any(r.levelname == "WARNING" and "pseudo-masks it trained on" in r.getMessage() for r in caplog.records)


def test_without_ground_truth_the_segmenter_is_compared_with_the_masks_own_agreement(tmp_path):
    root = write_miniature_voc(tmp_path / "mini", n_train=6, n_val=2)
    dataset = SimpleNamespace(split_ids=lambda split: [f"train_{i:05d}" for i in range(6)],
                              class_names=list(CLASS_NAMES), background_index=0)  # fmt: skip
    truth = {sid: np.array(Image.open(root / "SegmentationClass" / f"{sid}.png")) for sid in dataset.split_ids("train")}

    def mask_set(name: str, masks: dict) -> Path:
        for sid, mask in masks.items():
            save_palette_png(mask, _mkdir(tmp_path / name / "train" / "masks") / f"{sid}.png")
        return tmp_path / name

    mask_set("stage0-a", truth)
    refined = mask_set("crf-b", truth)
    (refined / "key.json").write_text(json.dumps({"stage": "crf", "input": "stage0-a"}))
    learned = mask_set("deeplab-c", truth)
    assert check_segmenter_fit(dataset, learned, refined, None)["warning"] is None
    blank = mask_set("deeplab-d", {sid: np.zeros_like(m) for sid, m in truth.items()})  # learned nothing
    result = check_segmenter_fit(dataset, blank, refined, None)
    assert result["basis"] == "train agreement (no ground truth)" and result["training_masks"] == 1.0
    assert result["segmenter"] < 0.9 and "agrees with its training pseudo-masks" in result["warning"]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
