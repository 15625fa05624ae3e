"""Stages 1 and 2 end to end on a small part of the miniature world; resuming; no work twice."""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stableseg_pp.fit import run
from stableseg_pp.models.deeplab import DeepLabV3PlusModule
from stableseg_pp.runtime.atomic import atomic_save
from stableseg_pp.runtime.errors import report_errors
from stableseg_pp.stages import crf_refine
from tests.conftest import file_stamps as _files
from tests.conftest import killed_after_records

SMALL = [
    "data.generate.n_train=16",
    "data.generate.n_val=6",
    "zero_shot.n_overlays=1",
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
    assert (run_dir / "results.md").read_text().startswith("| step | val mIoU |")

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

    monkeypatch.setattr(crf_refine, "atomic_save", dying)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            yield written
    finally:
        monkeypatch.setattr(crf_refine, "atomic_save", atomic_save)


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
