"""LightningModule that runs StableSeg in Lightning's predict loop.

Each rank loads the diffusion backbone itself (``configure_model``), so running
stage 0 on several GPUs is a matter of trainer configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from stableseg_pp.artifacts import ChannelClasses, Stage0Record
from stableseg_pp.backbones.base import DiffusionBackbone
from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.data.prompted_images import Sample
from stableseg_pp.methods.stableseg import StableSeg, resize_scores


class ZeroShotSegmenter(L.LightningModule):
    """StableSeg on any diffusion backbone; ``predict_step`` returns one :class:`Stage0Record` per image.

    Args:
        backbone: the backbone, built from its config (loaded here, on each rank).
        dataset: the run's dataset (class names, prompt words, background class).
        stableseg: keyword arguments of :class:`StableSeg` (resolution, scales, mode, background, ...).
        site_weights: learned site weights (CAPM), or None for uniform.
    """

    def __init__(
        self,
        backbone: DiffusionBackbone,
        dataset: DatasetDescription,
        stableseg: Mapping[str, Any] | None = None,
        site_weights: Mapping[str, float] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.dataset = dataset
        self.stableseg_kwargs = dict(stableseg or {})
        self.site_weights = dict(site_weights) if site_weights else None
        self.segmenter: StableSeg | None = None
        self.background_index = dataset.background_index

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Nothing here is trained: a checkpoint (e.g. on a SLURM signal) carries no weights."""
        checkpoint["state_dict"] = {}

    def configure_model(self) -> None:
        if self.segmenter is not None:
            return
        self.segmenter = StableSeg(self.backbone.load(), site_weights=self.site_weights, **self.stableseg_kwargs)

    @property
    def resolution(self) -> int:
        return int(self.stableseg_kwargs.get("resolution", 512))

    def predict_step(self, batch: list[Sample], batch_idx: int, dataloader_idx: int = 0) -> list[Stage0Record]:
        if not batch:
            return []
        self.configure_model()
        seg = self.segmenter
        family = self.backbone.family
        with_classes = [s for s in batch if s.class_ids]
        results = []
        if with_classes:
            pixels = torch.stack([s.pixels for s in with_classes]).to(self.device)
            names = [[self.dataset.prompt_name(c) for c in s.class_ids] for s in with_classes]
            out = seg(pixels, names)
            valid = out.valid
            for i, s in enumerate(with_classes):
                h, w = s.image.shape[:2]
                channels = ChannelClasses(tuple(s.class_ids), self.background_index)
                scores = resize_scores(out.scores[i : i + 1].float(), (h, w))[0]
                scores = scores.masked_fill(~valid[i, :, None, None], float("-inf"))
                mask = channels.to_classes(scores.argmax(0).cpu().numpy())
                n = len(s.class_ids)
                maps = {k: v[i, :n].to(torch.float16).cpu().numpy() for k, v in out.cross_maps.items()}
                # channels that cannot win (no background class) are stored as -1e4: softmax 0 in the CRF
                kept = out.scores[i : i + 1, : n + 1].float().masked_fill(~valid[i : i + 1, : n + 1, None, None], -1e4)
                low = F.adaptive_avg_pool2d(kept, seg.latent_grid)[0]
                low = low.to(torch.float16).cpu().numpy()
                results.append(Stage0Record(s.id, mask, channels, family, maps, low, s.image, s.mask))
        for s in batch:
            if not s.class_ids:  # nothing to look for: all background
                channels = ChannelClasses((), self.background_index)
                mask = np.full(s.image.shape[:2], channels.empty_label, dtype=np.uint8)
                results.append(Stage0Record(s.id, mask, channels, family, {}, None, s.image, s.mask))
        return results
