"""Progress bars: one that counts images (not batches) and shows images per second, and the training bar.

Lightning converts every per-step value logged with ``prog_bar=True`` to a Python number after every step, and its
default bar (Rich, when it is installed) reads them after every step too; each read is a device -> host copy that
makes the host wait for the GPU, so the next step's kernels are launched only after the previous ones finished.
Trainings therefore log their per-step values for the loggers only, and :class:`TrainingBar` shows the newest of
them every ``log_every`` steps, the cadence the loggers read at.
"""

from __future__ import annotations

import logging
import time

from lightning.pytorch.callbacks import TQDMProgressBar

from stableseg_pp.runtime.errors import ConfigError
from stableseg_pp.runtime.resume import RandomStateInCheckpoints


class ImagesPerSecondBar(TQDMProgressBar):
    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        super().on_predict_epoch_start(trainer, pl_module)
        self._images = 0
        self._start = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._images += len(batch)
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self.predict_progress_bar.set_postfix(images=self._images, img_per_s=f"{self._images / elapsed:.2f}")


class TrainingBar(TQDMProgressBar):
    """A TQDM training bar that also shows the newest values of per-step metrics logged without ``prog_bar``.

    Args:
        refresh_rate: steps between refreshes; only then are the shown values read from the device.
        shown: names of logged metrics (as the loggers see them, e.g. ``train/loss_step``) to show.
    """

    def __init__(self, refresh_rate: int, shown: tuple[str, ...] = ("train/loss_step",)):
        super().__init__(refresh_rate=refresh_rate)
        self.shown = tuple(shown)

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        for name in self.shown:
            value = trainer.logged_metrics.get(name)
            if value is not None:
                items[name] = f"{float(value):.3g}"
        return items


class _NoProductTips(logging.Filter):
    """Drops Lightning's advertisements ("Tip: ... try installing litlogger / litmodels"), one per Trainer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_lightning_tips() -> None:
    """Keep Lightning's product tips out of the run's log (its other messages stay)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoProductTips) for f in logger.filters):
            logger.addFilter(_NoProductTips())


def check_log_every(log_every: int, setting: str) -> None:
    """``setting`` (its config key, for the error) must be a whole number of steps, at least 1."""
    if not isinstance(log_every, int) or isinstance(log_every, bool) or log_every < 1:
        raise ConfigError(f"{setting}={log_every}: the steps between logged values must be a whole number, at least 1")


def training_loop_settings(log_every: int, setting: str, callbacks: list | tuple = ()) -> dict:
    """Trainer arguments for a training loop that reads its logged values (a host sync each) every ``log_every`` steps:
    the loggers' ``log_every_n_steps`` and a :class:`TrainingBar` refreshed at the same rate, after ``callbacks``;
    the random state travels with every checkpoint (a resumed training continues exactly). ``setting``: the config
    key of ``log_every``, for the error."""
    check_log_every(log_every, setting)
    callbacks = [*callbacks, RandomStateInCheckpoints(), TrainingBar(refresh_rate=log_every)]
    return {"log_every_n_steps": log_every, "callbacks": callbacks, "enable_progress_bar": True}
