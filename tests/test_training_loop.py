"""The trainings' loop settings: logged values are read from the device only every ``log_every`` steps."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from stableseg_pp.bench.segmenter import HostSyncCounter, _StepWindow
from stableseg_pp.models.deeplab import DeepLabV3PlusModule
from stableseg_pp.runtime.errors import ConfigError
from stableseg_pp.runtime.progress import TrainingBar, training_loop_settings


def _fit(tmp_path, log_every: int, steps: int) -> tuple[L.Trainer, HostSyncCounter]:
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    loader = DataLoader(TensorDataset(x.repeat(steps, 1, 1, 1), y.repeat(steps, 1, 1)), batch_size=2)
    module = DeepLabV3PlusModule(["a", "b", "c"], encoder_name="resnet18", decoder_channels=32)
    counter = HostSyncCounter()
    loop = training_loop_settings(log_every, "segmenter.train.log_every", callbacks=[_StepWindow(0, steps - 1, counter)])
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=CSVLogger(tmp_path, name="logs"),
                        enable_checkpointing=False, enable_model_summary=False, **loop)  # fmt: skip
    with counter:
        trainer.fit(module, loader)
    return trainer, counter


def test_training_reads_logged_values_only_every_log_every_steps(tmp_path):
    steps, every = 12, 4
    trainer, counter = _fit(tmp_path, every, steps)
    # one read for the loggers and one for the bar per logged step; the loop itself reads nothing
    assert 0 < counter.counts["scalar reads"] <= 2 * math.ceil(steps / every)
    assert counter.counts["data-sized outputs"] == 0
    bar = next(c for c in trainer.callbacks if isinstance(c, TrainingBar))
    shown = bar.get_metrics(trainer, trainer.lightning_module)
    assert math.isfinite(float(shown["train/loss_step"])) and "train/loss_epoch" in shown
    rows = list(csv.DictReader(open(next(tmp_path.glob("logs/*/metrics.csv")))))
    logged = [r for r in rows if r.get("train/loss_step")]
    assert [int(r["step"]) for r in logged] == list(range(every - 1, steps, every))


@pytest.mark.parametrize("bad", [0, -3, 2.5, "5", True])
def test_log_every_must_be_a_positive_whole_number(bad):
    with pytest.raises(ConfigError, match=r"segmenter\.train\.log_every="):
        training_loop_settings(bad, "segmenter.train.log_every")
