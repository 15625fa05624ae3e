"""LightningModule that runs EmerDiff in Lightning's predict loop (docs/emerdiff.md).

Two uses: refining stage-0 pseudo-masks (the low-resolution segments are
StableSeg's classes at the modulated layer's grid) and, without class names,
unsupervised segmentation (the segments are k-means clusters of that layer's
Query features, the centroids fitted over the split beforehand). Each rank
loads the backbone itself (``configure_model``), as stage 0 does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from stableseg_pp.artifacts import ChannelClasses, MaskRecord
from stableseg_pp.backbones.base import GenerativeBackbone, image_generators
from stableseg_pp.data.prompted_images import Sample
from stableseg_pp.methods.emerdiff import (
    EmerDiff,
    assign_pixels,
    majority_segments,
    nearest_centroid,
    query_features,
    smooth_change,
)
from stableseg_pp.runtime.errors import ConfigError

NO_CLASS = -1e4  # stored score of a channel that cannot win (softmax 0 in the CRF), as stage 0 stores it


@dataclass
class EmerDiffItem:
    """One image to refine: its sample, the dataset ids of its channels 1.. and stage 0's (1 + C, h, w) scores
    (None: no class to look for). Plain fields: Lightning moves a batch's tensors through them."""

    sample: Sample
    class_ids: tuple[int, ...]
    background_index: int | None
    scores: np.ndarray | None

    @property
    def channels(self) -> ChannelClasses:
        return ChannelClasses(tuple(self.class_ids), self.background_index)


def collate_items(items: list) -> list:
    return [i for i in items if i is not None]


def site_grid(backbone: GenerativeBackbone, site: str, resolution: int) -> tuple[int, int]:
    """The map grid of ``site`` at ``resolution``; a clear error naming the text sites when there is no such site."""
    sites = {s.id: s for s in backbone.sites(resolution)}
    if site not in sites or not sites[site].attends_to_text:
        text_sites = [s.id for s in sites.values() if s.attends_to_text]
        raise ConfigError(f"emerdiff.site={site}: not an image-to-text attention site of this backbone; one of {text_sites}")
    return sites[site].grid


def require_generative(backbone) -> None:
    """EmerDiff runs the backbone's sampler: a clear error for a family that does not offer it."""
    if not isinstance(backbone, GenerativeBackbone):
        raise ConfigError(
            f"EmerDiff needs a backbone that can sample: diffusion={backbone.name} (family {backbone.family}) does not "
            "implement GenerativeBackbone yet (docs/emerdiff.md); use a U-Net, SD3 / SD3.5 or FLUX preset"
        )


class EmerDiffSegmenter(L.LightningModule):
    """EmerDiff on a backbone that can sample; ``predict_step`` returns :class:`MaskRecord` objects for the writer.

    Args:
        backbone: the backbone, built from its config (loaded here, on each rank).
        emerdiff: makes :class:`EmerDiff` from the loaded backbone and its site's grid: its config node
            instantiated with ``_partial_`` (a ``functools.partial`` that names the ``site``).
        resolution: the image side fed to the VAE.
        seed: with each image's id, seeds the noise that takes its latent to t_m (results do not depend on batching
            or ranks).
        centroids: (K, D) k-means centroids: unsupervised mode (the batch holds plain samples); None: refinement.
        score_side: side of the per-channel scores returned with a refined mask (None: ``resolution``).
    """

    def __init__(
        self,
        backbone: GenerativeBackbone,
        emerdiff: partial,
        resolution: int,
        seed: int = 0,
        centroids: np.ndarray | None = None,
        score_side: int | None = None,
    ):
        super().__init__()
        require_generative(backbone)
        self.score_side = int(score_side or resolution)
        self.backbone = backbone
        self.make_emerdiff = emerdiff
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.centroids = None if centroids is None else torch.from_numpy(np.asarray(centroids, np.float32))
        self.emerdiff: EmerDiff | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {}  # nothing is trained

    def configure_model(self) -> None:
        if self.emerdiff is not None:
            return
        backbone = self.backbone.load()
        self.parts = torch.nn.ModuleDict(backbone.modules())  # registered: .to(device) and Lightning move them
        site = self.make_emerdiff.keywords["site"]
        self.emerdiff = self.make_emerdiff(backbone, grid=site_grid(backbone, site, self.resolution))

    def noise(self, ids: list[str], shape: tuple[int, ...]) -> torch.Tensor:
        """One draw per image from (seed, id): the same noise whatever the batch or rank."""
        draws = [torch.randn(shape, generator=g) for g in image_generators(self.seed, ids)]
        return torch.stack(draws).to(self.device)

    def _changes(self, samples: list[Sample], segments: list[torch.Tensor]) -> list[dict[int, torch.Tensor]]:
        """Pixel change per present segment; an image with one segment needs no run (every pixel is that segment)."""
        seg = self.emerdiff
        todo = [i for i, s in enumerate(segments) if torch.unique(s).numel() > 1]
        changes: list[dict[int, torch.Tensor]] = [{} for _ in samples]
        if todo:
            pixels = torch.stack([samples[i].pixels for i in todo]).to(self.device, non_blocking=True)
            latents = self.backbone.encode_images(pixels)
            noise = self.noise([samples[i].id for i in todo], tuple(latents.shape[1:]))
            for i, change in zip(todo, seg.change_maps(latents, [segments[i] for i in todo], noise), strict=True):
                changes[i] = change
        return changes

    def _labels(self, change: dict[int, torch.Tensor], segments: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        present = sorted(change) or [int(segments.flatten()[0])]
        if len(present) == 1:
            return np.full(size, present[0], dtype=np.int64)
        index = assign_pixels(torch.stack([change[s] for s in present]), size, self.emerdiff.sigma)
        return np.asarray(present)[index.cpu().numpy()]

    @torch.no_grad()
    def predict_step(self, batch: list, batch_idx: int, dataloader_idx: int = 0):
        self.configure_model()
        if self.centroids is not None:
            return self._segment_unsupervised(batch)
        return self._refine(batch)

    def _refine(self, batch: list[EmerDiffItem]) -> list[MaskRecord]:
        """Refine each image's stage-0 classes: segments = the classes winning at the modulated layer's grid."""
        grid = self.emerdiff.grid
        records: list[MaskRecord] = []
        with_scores = [item for item in batch if item.scores is not None]
        segments = []
        for item in with_scores:
            scores = torch.from_numpy(item.scores.astype(np.float32))
            segments.append(majority_segments(scores, scores.flatten(1).amax(1) > NO_CLASS / 2, grid).to(self.device))
        changes = dict(zip([id(i) for i in with_scores], self._changes([i.sample for i in with_scores], segments), strict=True))
        seg_of = dict(zip([id(i) for i in with_scores], segments, strict=True))
        for item in batch:
            s = item.sample
            if item.scores is None:
                mask = np.full(s.image.shape[:2], item.channels.empty_label, dtype=np.uint8)
                records.append(MaskRecord(s.id, mask, item.channels, self.backbone.family, {}, None, s.image, s.mask))
                continue
            change, segs = changes[id(item)], seg_of[id(item)]
            labels = self._labels(change, segs, s.image.shape[:2])
            mask = item.channels.to_classes(labels.astype(np.uint8))
            scores = self._channel_scores(change, segs, item.scores)
            records.append(MaskRecord(s.id, mask, item.channels, self.backbone.family, {}, scores, s.image, s.mask))
        return records

    def _channel_scores(self, change: dict[int, torch.Tensor], segments: torch.Tensor, stage0: np.ndarray) -> np.ndarray:
        """(1 + C, R, R) float16 scores for a later CRF: each segment's smoothed change divided by the image's
        largest; channels that could win in stage 0 but hold no segment get 0, the others stay unable to win."""
        r = self.score_side
        out = np.where(stage0.reshape(len(stage0), -1).max(1) > NO_CLASS / 2, 0.0, NO_CLASS)[:, None, None]
        out = np.broadcast_to(out, (len(stage0), r, r)).astype(np.float32).copy()
        if not change:
            out[int(segments.flatten()[0])] = 1.0
            return out.astype(np.float16)
        present = sorted(change)
        smoothed = smooth_change(torch.stack([change[s] for s in present]), self.emerdiff.sigma)
        smoothed = F.interpolate(smoothed[None], size=(r, r), mode="bilinear", align_corners=False)[0]
        smoothed = (smoothed / smoothed.max().clamp(min=1e-8)).cpu().numpy()
        for j, s in enumerate(present):
            out[s] = smoothed[j]
        return out.astype(np.float16)

    def _segment_unsupervised(self, batch: list[Sample]) -> tuple[list[MaskRecord], list[MaskRecord]]:
        """k-means segments of each image -> (EmerDiff's pixel-level segment maps, the same segments upsampled)."""
        seg = self.emerdiff
        if not batch:  # every image of the batch skipped for bad input
            return [], []
        pixels = torch.stack([s.pixels for s in batch]).to(self.device, non_blocking=True)
        features = query_features(self.backbone, seg.site, pixels, seg.text(1))
        ids = nearest_centroid(features, self.centroids).view(len(batch), *seg.grid)
        k = len(self.centroids)
        channels = ChannelClasses(tuple(range(k)), None)
        changes = self._changes(batch, list(ids))
        refined, upsampled = [], []
        for s, change, segments in zip(batch, changes, ids, strict=True):
            size = s.image.shape[:2]
            labels = self._labels(change, segments, size).astype(np.uint8)
            near = F.interpolate(segments[None, None].float(), size=size, mode="nearest")[0, 0].to(torch.uint8)
            family = self.backbone.family
            refined.append(MaskRecord(s.id, labels, channels, family, {}, None, s.image, s.mask))
            upsampled.append(MaskRecord(s.id, near.cpu().numpy(), channels, family, {}, None, s.image, s.mask))
        return refined, upsampled
