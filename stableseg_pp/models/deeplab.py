"""DeepLabV3+ (segmentation-models-pytorch) trained on pseudo-masks, as a LightningModule.

Cross-entropy with ignore 255, SGD with the poly learning-rate schedule of the
DeepLab papers, validation mIoU against the real ground truth (torchmetrics).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassJaccardIndex

from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.runtime.errors import ConfigError


class DeepLabV3PlusModule(L.LightningModule):
    """DeepLabV3+ trained on pseudo-masks.

    Args:
        class_names: the classes, in the order of the masks' ids.
        encoder_name / encoder_weights / encoder_depth / decoder_channels / output_stride: smp's DeepLabV3+.
        lr / momentum / weight_decay / poly_power: SGD with the poly schedule.
        eval_max_side: the largest shorter side the training's random scaling showed; a larger picture (a
            12-megapixel photo against 512-pixel training crops) is predicted scaled down to it, its logits scaled
            back to its size (None: every picture at its own size).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        encoder_name: str = "resnet101",
        encoder_weights: str | None = None,
        encoder_depth: int = 5,
        decoder_channels: int = 256,
        output_stride: int = 16,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        poly_power: float = 0.9,
        eval_max_side: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.class_names = list(class_names)
        try:
            self.model = smp.DeepLabV3Plus(
                encoder_name=encoder_name,
                encoder_weights=encoder_weights,
                encoder_depth=encoder_depth,
                decoder_channels=decoder_channels,
                encoder_output_stride=output_stride,
                classes=len(self.class_names),
            )
        except OSError as err:  # the pretrained encoder is neither cached nor downloadable (no network)
            if encoder_weights is None:
                raise
            raise ConfigError(
                f"segmenter.model.encoder_weights={encoder_weights}: the {encoder_name} encoder weights are not in the "
                "local cache and cannot be downloaded here. Pre-cache them on a machine with network access (same "
                f"HF_HOME): python -c \"import segmentation_models_pytorch as smp; smp.DeepLabV3Plus('{encoder_name}', "
                f"encoder_weights='{encoder_weights}')\", or set segmenter.model.encoder_weights=null (random weights)"
            ) from err
        # validate_args=False: its check (two torch.unique per batch, each a host sync on a GPU) repeats what the
        # loaders already did: ground-truth masks are checked for ids outside 0..N-1 / 255 when read (BadInputError).
        self.val_miou = MulticlassJaccardIndex(num_classes=len(self.class_names), ignore_index=IGNORE_INDEX,
                                               validate_args=False)  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at the input size; inputs of any size are padded to the encoder's stride and cropped back."""
        h, w = images.shape[-2:]
        stride = 2**self.hparams.encoder_depth
        ph, pw = (-h) % stride, (-w) % stride
        if ph or pw:
            images = F.pad(images, (0, pw, 0, ph))
        return self.model(images)[..., :h, :w]

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at the input size, computed at a scale the training showed (``eval_max_side``): a picture far
        larger than the training's would show its objects at sizes the model never learned, and fill the memory."""
        h, w = images.shape[-2:]
        limit = self.hparams.get("eval_max_side")
        if not limit or min(h, w) <= limit:
            return self(images)
        f = limit / min(h, w)
        small = F.interpolate(images, size=(max(1, round(h * f)), max(1, round(w * f))), mode="bilinear",
                              align_corners=False, antialias=True)  # fmt: skip
        return F.interpolate(self(small), size=(h, w), mode="bilinear", align_corners=False)

    def training_step(self, batch, batch_idx):
        images, masks = batch
        logits = self(images)
        loss = F.cross_entropy(logits, masks.long(), ignore_index=IGNORE_INDEX)
        # Per step for the loggers only: a progress-bar value would be read from the device after every step.
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=images.shape[0])
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        images, masks = batch
        logits = self.predict_logits(images)
        self.val_miou.update(logits.argmax(1), masks.long())

    def on_validation_epoch_end(self) -> None:
        self.log("val/miou", self.val_miou.compute(), prog_bar=True, sync_dist=True)
        self.val_miou.reset()

    def predict_step(self, batch, batch_idx):
        images, index = batch
        return self.predict_logits(images).softmax(1), index

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        poly = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / total) ** hp.poly_power)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": poly, "interval": "step"}}
