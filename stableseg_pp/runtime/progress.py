"""A progress bar that counts images (not batches) and shows images per second."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import TQDMProgressBar


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
