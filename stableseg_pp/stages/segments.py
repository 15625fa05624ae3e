"""Unsupervised segmentation with EmerDiff (``stage=0 stage0.segmenter=emerdiff``; docs/emerdiff.md).

No class names: the Query features of the modulated site at t = 1 are
clustered with k-means over the split (K = ``emerdiff_steps.clusters``, the
centroids fitted once on the first ``emerdiff_steps.kmeans_images`` images and kept
in ``centroids.npy``, so a segment id means the same in every image), each
image's low-resolution cluster map is refined by EmerDiff's modulated
denoising, and the segment maps (ids 0..K-1) are written per split, with the
same clusters upsampled (nearest) beside them (``upsampled/<split>``) as the
naive baseline. Both are scored with Hungarian matching over the split (the
unsupervised protocol), whatever ``data.protocol`` says.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from stableseg_pp import tracking
from stableseg_pp.artifacts import MaskSetLayout, MaskSetWriter
from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.data.prompted_images import collate_samples
from stableseg_pp.evaluation.mask_sets import report_split
from stableseg_pp.methods.emerdiff import fit_centroids, query_features
from stableseg_pp.models.emerdiff_module import EmerDiffSegmenter
from stableseg_pp.runtime import distributed
from stableseg_pp.runtime.atomic import atomic_save
from stableseg_pp.runtime.cpus import loader_workers
from stableseg_pp.runtime.errors import ConfigError
from stableseg_pp.runtime.run_dir import evaluate_and_finish
from stableseg_pp.stages.emerdiff import build_emerdiff, emerdiff_settings, loader, method_key, predict
from stableseg_pp.stages.step import Step, build_backbone, load_on_device
from stableseg_pp.tracking.base import StepRecord

log = logging.getLogger(__name__)
STEP = Step("segments")
CENTROIDS = "centroids.npy"
BASELINE = "upsampled"


class SegmentsWriter(MaskSetWriter):
    """Writes the upsampled baseline of each image, then its EmerDiff segment map (the map last: it means done)."""

    def __init__(self, layouts, baseline_layouts, overlay_ids, palette, threads: int = 4):
        super().__init__(layouts, overlay_ids, palette, background_index=None, threads=threads)
        self.baseline_layouts = list(baseline_layouts)

    def _write_batch(self, prediction, dataloader_idx: int) -> None:
        refined, upsampled = prediction
        for record in upsampled:
            self.write_record(record, self.baseline_layouts[dataloader_idx])
        super()._write_batch(refined, dataloader_idx)


def clusters(cfg: DictConfig, dataset: DatasetDescription) -> int:
    k = cfg.emerdiff_steps.get("clusters")
    k = len(dataset.class_names) if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 255:
        raise ConfigError(f"emerdiff_steps.clusters={k}: give a number of segments from 2 to 255 (null: the class count)")
    return k


def run(cfg: DictConfig, dataset: DatasetDescription) -> Path:
    """Segment every configured split without class names; returns the content-addressed output folder."""
    backbone = build_backbone(cfg)
    em = cfg.emerdiff_steps
    key = {
        "data": dataset.key(),
        **method_key(cfg, backbone),
        "clusters": clusters(cfg, dataset),
        "kmeans": {"images": em.get("kmeans_images"), "iterations": em.get("kmeans_iterations", 50)},
        "splits": list(cfg.stage0.splits),
    }

    def compute(out: Path, key: dict, record: StepRecord) -> None:
        _compute(cfg, dataset, backbone, out, key)
        masks = {"segments": out / "val" / "masks"} if "val" in cfg.stage0.splits else {}
        tracking.track_results(record, dataset, out, masks)

    return STEP.run(cfg, key, [], compute)


def fit_split(cfg: DictConfig) -> str:
    """The split whose features fit the k-means: train when it is configured (the val split stays unseen)."""
    splits = list(cfg.stage0.splits)
    return "train" if "train" in splits else splits[0]


def _fit(cfg: DictConfig, dataset: DatasetDescription, backbone, out: Path, k: int) -> None:
    """Fit the k-means on this rank (the main one) and write ``centroids.npy`` atomically."""
    settings = emerdiff_settings(cfg)
    split = fit_split(cfg)
    limit = cfg.emerdiff_steps.get("kmeans_images")
    ids = dataset.split_ids(split)[: int(limit)] if limit else dataset.split_ids(split)
    device = load_on_device(cfg, backbone)
    text = backbone.encode_captions([settings.get("prompt", "")])
    workers = loader_workers(cfg.data.num_workers, "data.num_workers")
    pictures = dataset.prompted_images(split, ids, cfg.zero_shot.resolution, predicted={})  # no class names
    images = DataLoader(pictures, batch_size=cfg.data.batch_size,
                        num_workers=workers, collate_fn=collate_samples)  # fmt: skip
    features = []
    for batch in images:
        if batch:
            pixels = torch.stack([s.pixels for s in batch]).to(device)
            features.append(query_features(backbone, settings["site"], pixels, text).flatten(0, 1).cpu().numpy())
    data = np.concatenate(features)
    log.info("emerdiff segments: k-means (K=%d) of %d feature vectors from %d %s images", k, len(data), len(ids), split)
    centroids = fit_centroids(data, k, seed=cfg.seed, iterations=cfg.emerdiff_steps.get("kmeans_iterations", 50))
    atomic_save(out / CENTROIDS, lambda t: _save_npy(t, centroids))


def _compute(cfg: DictConfig, dataset: DatasetDescription, backbone, out: Path, key: dict) -> None:
    k = key["clusters"]
    # rank 0 alone decides and fits (every rank passes the same one barrier), then all read the file
    distributed.on_main(lambda: (out / CENTROIDS).exists() or _fit(cfg, dataset, backbone, out, k))
    centroids = np.load(out / CENTROIDS)
    module = EmerDiffSegmenter(backbone, build_emerdiff(cfg), cfg.zero_shot.resolution, cfg.seed, centroids)
    splits: dict[str, tuple[list[str], MaskSetLayout, MaskSetLayout]] = {}
    loaders, layouts, baselines, overlay_ids = [], [], [], set()
    for split in cfg.stage0.splits:
        target, baseline = MaskSetLayout(out / split), MaskSetLayout(out / BASELINE / split)
        ids = dataset.split_ids(split)
        splits[split] = (ids, target, baseline)
        todo = [sid for sid in ids if not target.is_done(sid)]
        log.info("emerdiff segments [%s]: %d images, %d to do", split, len(ids), len(todo))
        overlay_ids.update(ids[: cfg.stage0.n_overlays])
        if todo:
            loaders.append(loader(cfg, dataset.prompted_images(split, todo, cfg.zero_shot.resolution, predicted={})))  # no names
            layouts.append(target)
            baselines.append(baseline)
    distributed.barrier()
    seconds, images = 0.0, sum(len(dl.dataset) for dl in loaders)
    if loaders:
        writer = SegmentsWriter(layouts, baselines, overlay_ids, dataset.palette, cfg.stage0.writer_threads)
        seconds = predict(cfg, module, loaders, writer)
    scored = dataclasses.replace(dataset, evaluation_protocol="unsupervised")  # segment ids: Hungarian matching

    def report() -> dict[str, dict]:
        results = {}
        for split, (ids, target, baseline) in splits.items():
            results[split] = report_split("emerdiff segments", scored, split, ids, target, clusters=k)
            upsampled = report_split("upsampled k-means segments", scored, split, ids, baseline)["metrics"]
            if results[split]["metrics"] is not None:  # metrics.json: EmerDiff's, with the naive baseline beside it
                results[split]["metrics"][BASELINE] = upsampled
        return results

    evaluate_and_finish(out, key, report, predict_seconds=round(seconds, 2), images_predicted=images)


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to a temporary name
        np.save(f, array)
