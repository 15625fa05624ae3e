"""Several processes on CPU (gloo), started the way a cluster starts them: every rank runs the whole ``fit``."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from stableseg_pp.data.description import describe_dataset
from stableseg_pp.fit import run
from stableseg_pp.runtime.run_dir import COMPLETE
from stableseg_pp.stages import crf, stage0
from tests.test_self_training import SMALL

REPO = Path(__file__).resolve().parent.parent


def fit_command(*overrides: str) -> list[str]:
    """``python -m stableseg_pp.fit trainer.devices=2``: fit restarts itself under torchrun with 2 ranks."""
    return [sys.executable, "-m", "stableseg_pp.fit", "trainer.accelerator=cpu", "trainer.devices=2", *overrides]


def env_for(root: Path) -> dict[str, str]:
    env = dict(os.environ, STABLESEG_HOME=str(root), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return env


@pytest.mark.slow
def test_stage0_on_two_ranks_writes_every_image_once(tmp_path, miniature_model):
    overrides = ["stage=0", "data.generate.n_train=14", "data.generate.n_val=7", "data.batch_size=3"]
    done = subprocess.run(fit_command(*overrides), cwd=REPO, env=env_for(tmp_path), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    stage0 = next((tmp_path / "outputs" / "miniature-miniature_sd").glob("stage0-*"))
    assert (stage0 / COMPLETE).exists()
    data_root = tmp_path / "data" / "miniature"
    for split, n in (("train", 14), ("val", 7)):
        per_rank = [(stage0 / split / "ranks" / f"rank{r}.txt").read_text().split() for r in (0, 1)]
        assert all(per_rank), "both ranks did some of the work"
        assert not set(per_rank[0]) & set(per_rank[1]), "no image on two ranks"
        done_ids = per_rank[0] + per_rank[1]
        assert len(done_ids) == n and sorted(done_ids) == sorted(split_ids_of(data_root, split))
        assert sorted(p.stem for p in (stage0 / split / "masks").glob("*.png")) == sorted(done_ids)


def split_ids_of(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _epochs_logged(seg_dir: Path, version: int) -> list[int]:
    with open(seg_dir / "logs" / f"version_{version}" / "metrics.csv") as f:
        return sorted({int(float(r["epoch"])) for r in csv.DictReader(f) if r.get("epoch")})


@pytest.mark.slow
def test_ddp_training_on_two_ranks_resumes_after_a_kill(tmp_path, compose_fit, miniature_model):
    small = [o for o in SMALL if not o.startswith("segmenter.train.max_epochs")]
    overrides = [
        "stage=1",
        *small,
        "segmenter.train.max_epochs=8",
        "segmenter.train.batch_size=4",
    ]  # sync BN is GPU-only in PyTorch
    # stage 0 and the CRF in this process; the DDP training (its folder depends only on the masks) in 2 ranks
    cfg = compose_fit(*overrides)
    dataset = describe_dataset(cfg.data)
    masks = crf.run(cfg, dataset, stage0.run(cfg, dataset))
    run_dir = Path(cfg.paths.run_dir)
    assert run_dir == tmp_path / "outputs" / "miniature-miniature_sd"

    proc = subprocess.Popen(
        fit_command(*overrides), cwd=REPO, env=env_for(tmp_path), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "first.log", "w"),
    )  # fmt: skip
    deadline = time.time() + 240
    last = None
    while time.time() < deadline and proc.poll() is None:
        last = next(run_dir.glob("deeplab-*/checkpoints/last.ckpt"), None)
        if last is not None and last.exists():
            break
        time.sleep(0.1)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    # the job dies (node failure, time limit) after its first checkpoint: every rank at once
    tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in tree:
        p.kill()
    psutil.wait_procs(tree, timeout=30)
    assert last is not None, "no checkpoint was written"
    seg_dir = last.parent.parent
    assert not (seg_dir / COMPLETE).exists()
    first_epoch = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    assert first_epoch < 7

    done = subprocess.run(fit_command(*overrides), cwd=REPO, env=env_for(tmp_path), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "deeplab: resuming from" in (run_dir / "hydra" / "rank0" / "fit.log").read_text()
    assert (seg_dir / COMPLETE).exists()
    assert torch.load(seg_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 7
    assert _epochs_logged(seg_dir, 1)[0] == first_epoch + 1  # the resumed run did not train the first epochs again
    assert len(list((seg_dir / "train" / "masks").glob("*.png"))) == len(describe_dataset(cfg.data, splits=[]).split_ids("train"))
    assert masks.name in (seg_dir / "key.json").read_text()


def test_several_devices_without_a_launcher_is_a_clear_error(compose_fit):
    from stableseg_pp.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="srun .*torchrun"):
        run(compose_fit("trainer.devices=2", "trainer.num_nodes=2"))
