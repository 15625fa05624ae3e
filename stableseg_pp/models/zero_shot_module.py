"""LightningModule that runs StableSeg in Lightning's predict loop.

Each rank loads the diffusion backbone itself (``configure_model``), so running
stage 0 on several GPUs is a matter of trainer configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import lightning as L
import torch
import torch.nn.functional as F

from stableseg_pp.artifacts import ChannelClasses, MaskBatch, MaskImage
from stableseg_pp.backbones.base import DiffusionBackbone, image_generators
from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.data.prompted_images import Sample
from stableseg_pp.methods.stableseg import StableSeg, resize_scores
from stableseg_pp.runtime.transfer import HostBatch


class ZeroShotSegmenter(L.LightningModule):
    """StableSeg on any diffusion backbone; ``predict_step`` returns a batch's results packed (:class:`MaskBatch`).

    Args:
        backbone: the backbone, built from its config (loaded here, on each rank).
        dataset: the run's dataset (class names, prompt words, background class).
        stableseg: makes :class:`StableSeg` from the loaded backbone (its config node instantiated with
            ``_partial_``, or the class itself with its defaults).
        site_weights: learned site weights (CAPM), or None for uniform.
        seed: with each image's id, seeds the noise of a backbone that noises its latents (the same masks whatever
            the batch, the rank, or which steps of the run were done before).
    """

    def __init__(
        self,
        backbone: DiffusionBackbone,
        dataset: DatasetDescription,
        stableseg: Callable[..., StableSeg] = StableSeg,
        site_weights: Mapping[str, float] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.backbone = backbone
        self.dataset = dataset
        self.make_stableseg = stableseg
        self.site_weights = dict(site_weights) if site_weights else None
        self.seed = int(seed)
        self.segmenter: StableSeg | None = None
        self.background_index = dataset.background_index

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Nothing here is trained: a checkpoint (e.g. on a SLURM signal) carries no weights."""
        checkpoint["state_dict"] = {}

    def configure_model(self) -> None:
        if self.segmenter is not None:
            return
        self.segmenter = self.make_stableseg(self.backbone.load(), site_weights=self.site_weights)

    @property
    def resolution(self) -> int:
        return int(getattr(self.make_stableseg, "keywords", {}).get("resolution", 512))

    def predict_step(self, batch: list[Sample], batch_idx: int, dataloader_idx: int = 0) -> MaskBatch:
        """StableSeg on the batch, then its post-processing batched on the device: the scores resized to each image's
        size (one resize per distinct size), argmax and channel -> class ids (a lookup table per image), the pooled
        scores and the stored maps; everything reaches the host in one transfer (:class:`HostBatch`). The writer
        turns the result into files on its own threads."""
        images = [MaskImage(s.id, ChannelClasses(tuple(s.class_ids), self.background_index), s.image, s.mask) for s in batch]
        with_classes = [i for i, s in enumerate(batch) if s.class_ids]
        rows: list[int | None] = [None] * len(batch)
        if not with_classes:
            return MaskBatch(images, rows, self.backbone.family, None)
        self.configure_model()
        seg = self.segmenter
        pixels = torch.stack([batch[i].pixels for i in with_classes]).to(self.device, non_blocking=True)
        names = [[self.dataset.prompt_name(c) for c in batch[i].class_ids] for i in with_classes]
        noise = image_generators(self.seed, [batch[i].id for i in with_classes]) if self.backbone.stochastic else None
        out = seg(pixels, names, generator=noise, class_weights=class_weights([batch[i] for i in with_classes]))
        valid = out.valid
        tensors: dict[str, torch.Tensor] = {}
        by_size: dict[tuple[int, int], list[int]] = {}
        for row, i in enumerate(with_classes):
            rows[i] = row
            by_size.setdefault(tuple(batch[i].image.shape[:2]), []).append(row)
        for size, group in by_size.items():
            index = torch.tensor(group, device=out.scores.device)
            scores = resize_scores(out.scores[index].float(), size)
            labels = scores.masked_fill(~valid[index][:, :, None, None], float("-inf")).argmax(dim=1)
            table = torch.full((len(group), valid.shape[1]), 255, dtype=torch.uint8)
            for j, row in enumerate(group):
                lut = images[with_classes[row]].channels.channel_to_class()
                table[j, : len(lut)] = torch.from_numpy(lut)
            masks = table.to(labels.device).gather(1, labels.flatten(1)).view_as(labels)
            for j, row in enumerate(group):
                tensors[f"mask/{with_classes[row]}"] = masks[j]
        for site, maps in out.cross_maps.items():
            tensors[f"map/{site}"] = maps.to(torch.float16)
        # channels that cannot win (no background class) are stored as -1e4: softmax 0 in the CRF
        kept = out.scores.float().masked_fill(~valid[:, :, None, None], -1e4)
        tensors["scores"] = F.adaptive_avg_pool2d(kept, seg.latent_grid).to(torch.float16)
        return MaskBatch(images, rows, self.backbone.family, HostBatch(tensors))


def class_weights(samples: list[Sample]) -> torch.Tensor | None:
    """(B, K) the labeler's confidence in each prompted class (1 where an image has none); None when no image has
    any (every class alike: stage 0 as the paper has it)."""
    if all(s.class_weights is None for s in samples):
        return None
    out = torch.ones(len(samples), max(len(s.class_ids) for s in samples))
    for row, s in enumerate(samples):
        if s.class_weights is not None:
            out[row, : len(s.class_weights)] = torch.tensor(s.class_weights)
    return out
