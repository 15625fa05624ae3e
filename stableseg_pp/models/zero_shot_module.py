"""LightningModule that runs StableSeg in Lightning's predict loop.

Each rank loads the diffusion model itself (``configure_model``), so running
stage 0 on several GPUs is a matter of trainer configuration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.data.segmentation import Sample
from stableseg_pp.diffusion.backbone import load_unet_backbone
from stableseg_pp.models.stableseg import StableSeg, resize_scores

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ZeroShotPrediction:
    """Stage 0's result for one image."""

    id: str
    mask: np.ndarray  # (H, W) uint8 dataset class ids
    class_ids: list[int]  # dataset ids of the prompted classes (channel c+1 of the maps)
    cross_maps: dict[str, np.ndarray]  # layer -> (C, h, w) float16
    scores: np.ndarray | None  # (1 + C, h, w) float16 final class scores at the latent resolution (for the CRF)
    sample: Sample


class ZeroShotSegmenter(L.LightningModule):
    """StableSeg on a diffusers U-Net; ``predict_step`` returns one prediction per image."""

    def __init__(
        self,
        pretrained: str,
        class_names: Sequence[str],
        prompt_names: Mapping[str, str] | None = None,
        dtype: str = "float32",
        stableseg: Mapping[str, Any] | None = None,
        background_index: int | None = 0,
    ):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"diffusion.dtype={dtype!r}: use one of {sorted(DTYPES)}")
        self.pretrained = pretrained
        self.class_names = list(class_names)
        unknown = set(prompt_names or {}) - set(self.class_names)
        if unknown:
            raise ValueError(f"data.prompt_names names unknown classes {sorted(unknown)}; classes: {self.class_names}")
        self.prompt_names = dict(prompt_names or {})
        self.dtype_name = dtype
        self.stableseg_kwargs = dict(stableseg or {})
        self.segmenter: StableSeg | None = None
        # what channel 0 (and an image with nothing to look for) becomes: the background class, or ignore
        self.empty_label = IGNORE_INDEX if background_index is None else background_index

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Nothing here is trained: a checkpoint (e.g. on a SLURM signal) carries no weights."""
        checkpoint["state_dict"] = {}

    def configure_model(self) -> None:
        if self.segmenter is not None:
            return
        backbone = load_unet_backbone(self.pretrained, dtype=DTYPES[self.dtype_name])
        self.segmenter = StableSeg(backbone, **self.stableseg_kwargs)

    @property
    def resolution(self) -> int:
        return int(self.stableseg_kwargs.get("resolution", 512))

    def prompt_name(self, class_id: int) -> str:
        name = self.class_names[class_id]
        return self.prompt_names.get(name, name)

    def predict_step(self, batch: list[Sample], batch_idx: int, dataloader_idx: int = 0) -> list[ZeroShotPrediction]:
        if not batch:
            return []
        self.configure_model()
        seg = self.segmenter
        with_classes = [s for s in batch if s.class_ids]
        results = []
        if with_classes:
            pixels = torch.stack([s.pixels for s in with_classes]).to(self.device)
            names = [[self.prompt_name(c) for c in s.class_ids] for s in with_classes]
            out = seg(pixels, names)
            valid = out.valid
            for i, s in enumerate(with_classes):
                h, w = s.image.shape[:2]
                scores = resize_scores(out.scores[i : i + 1].float(), (h, w))[0]
                scores = scores.masked_fill(~valid[i, :, None, None], float("-inf"))
                channel = scores.argmax(0).cpu().numpy()
                lut = np.array([self.empty_label] + s.class_ids, dtype=np.uint8)
                n = len(s.class_ids)
                maps = {k: v[i, :n].to(torch.float16).cpu().numpy() for k, v in out.cross_maps.items()}
                # channels that cannot win (no background class) are stored as -1e4: softmax 0 in the CRF
                kept = out.scores[i : i + 1, : n + 1].float().masked_fill(~valid[i : i + 1, : n + 1, None, None], -1e4)
                low = F.adaptive_avg_pool2d(kept, seg.latent_side)[0]
                low = low.to(torch.float16).cpu().numpy()
                results.append(ZeroShotPrediction(s.id, lut[channel], list(s.class_ids), maps, low, s))
        for s in batch:
            if not s.class_ids:  # nothing to look for: all background
                mask = np.full(s.image.shape[:2], self.empty_label, dtype=np.uint8)
                results.append(ZeroShotPrediction(s.id, mask, [], {}, None, s))
        return results
