"""EmerDiff refinement of a stage-0 pseudo-mask set (``refine=emerdiff``; docs/emerdiff.md).

Per image: the classes StableSeg gives at the modulated layer's grid are the
low-resolution segments; EmerDiff's modulated denoising assigns every pixel to
one of them. Writes, like stage 0, a palette PNG mask per image and the
per-channel scores (each segment's smoothed pixel change, for a DenseCRF after
it: ``refine=emerdiff+crf``), atomically, the mask last; finished images are
skipped on resume; ``metrics.json`` against the ground truth.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from stableseg_pp import tracking
from stableseg_pp.artifacts import MaskSetLayout, MaskSetWriter, load_stored_maps
from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.evaluation.mask_sets import report_split
from stableseg_pp.methods.emerdiff import SPEED_ONLY, check_settings
from stableseg_pp.models.emerdiff_module import EmerDiffItem, EmerDiffSegmenter, collate_items, require_generative, site_grid
from stableseg_pp.runtime import distributed
from stableseg_pp.runtime.cpus import loader_workers
from stableseg_pp.runtime.errors import ConfigError
from stableseg_pp.runtime.progress import ImagesPerSecondBar
from stableseg_pp.runtime.resume import run_lightning
from stableseg_pp.runtime.run_dir import evaluate_and_finish
from stableseg_pp.stages.step import Step, build_backbone, diffusion_key, method_settings, on_gpu
from stableseg_pp.tracking.base import StepRecord

log = logging.getLogger(__name__)
STEP = Step("emerdiff")


def emerdiff_settings(cfg: DictConfig) -> dict:
    """EmerDiff's settings (its ``emerdiff`` node), checked by its own checker; a missing site names the backbone
    preset that should set it."""
    settings = method_settings(cfg.emerdiff)
    if not settings.get("site"):
        raise ConfigError(
            f"emerdiff.site is not set for diffusion={cfg.diffusion.name}: give the id of the image-to-text attention "
            "site to modulate (the U-Net presets set the first cross-attention of the 16x16 up block)"
        )
    check_settings(**settings)
    return settings


def build_emerdiff(cfg: DictConfig) -> partial:
    """EmerDiff from its config node, waiting for the loaded backbone and its site's grid."""
    emerdiff_settings(cfg)
    return instantiate(cfg.emerdiff)


def score_side(cfg: DictConfig) -> int:
    """Side of the per-channel scores stored with each refined mask (for a CRF after it): ``emerdiff_steps.score_side``,
    at most the decoded image's."""
    side = cfg.emerdiff_steps.get("score_side")
    if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 1):
        raise ConfigError(f"emerdiff_steps.score_side={side}: give a side in pixels (null: zero_shot.resolution)")
    return min(side or cfg.zero_shot.resolution, cfg.zero_shot.resolution)


def check_emerdiff_settings(cfg: DictConfig, refines: bool) -> None:
    """When the run uses EmerDiff (``refines``: it runs the refinement step, with ``refine`` naming EmerDiff; or
    ``stage0.segmenter=emerdiff``): its settings, and its site against the backbone's structure, before any
    weights load or rank starts (a clear one-line error, not a failure hours later)."""
    uses = (refines and "emerdiff" in str(cfg.get("refine", "crf"))) or cfg.stage0.get("segmenter") == "emerdiff"
    if not uses:
        return
    settings = emerdiff_settings(cfg)
    score_side(cfg)
    backbone = build_backbone(cfg)
    require_generative(backbone)
    try:
        site_grid(backbone, settings["site"], cfg.zero_shot.resolution)
    except LookupError:
        return  # a hub id not in the local cache: checked when it is loaded


def method_key(cfg: DictConfig, backbone) -> dict:
    """What EmerDiff's outputs depend on: its settings, the backbone and the seed of its noise."""
    settings = {k: v for k, v in emerdiff_settings(cfg).items() if k not in SPEED_ONLY}
    return {
        "emerdiff": {**settings, "score_side": score_side(cfg)},
        "diffusion": diffusion_key(cfg, backbone),
        "resolution": cfg.zero_shot.resolution,
        "seed": cfg.seed,
    }


class StoredScoreImages(Dataset):
    """The images of ``ids`` with the stage-0 scores and channel classes stored for them (read in the workers)."""

    def __init__(self, dataset: DatasetDescription, split: str, ids: list[str], source: MaskSetLayout, resolution: int):
        self.images = dataset.prompted_images(split, ids, resolution, predicted={})  # classes: the stored maps'
        self.source = source
        self.background_index = dataset.background_index

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> EmerDiffItem | None:
        sample = self.images[index]
        if sample is None:
            return None
        stored = load_stored_maps(self.source.maps_path(sample.id))
        scores = None if stored.scores is None else np.asarray(stored.scores)
        return EmerDiffItem(sample, tuple(stored.class_ids), self.background_index, scores)


def predict(cfg: DictConfig, module, loaders: list[DataLoader], writer) -> float:
    """Lightning's predict loop over ``loaders`` with ``writer``; returns the seconds it took (model load included)."""
    trainer = instantiate(cfg.trainer, callbacks=[writer, ImagesPerSecondBar()], logger=False)
    start = time.perf_counter()
    run_lightning(trainer.predict, module, dataloaders=loaders, return_predictions=False)
    distributed.barrier()
    return time.perf_counter() - start


def loader(cfg: DictConfig, images: Dataset) -> DataLoader:
    workers = loader_workers(cfg.data.num_workers, "data.num_workers")
    return DataLoader(images, batch_size=cfg.data.batch_size, num_workers=workers, collate_fn=collate_items,
                      shuffle=False, pin_memory=on_gpu(cfg))  # fmt: skip


def run(cfg: DictConfig, dataset: DatasetDescription, stage0_dir: Path) -> Path:
    """Refine every split of ``stage0_dir`` with EmerDiff; returns the content-addressed output folder."""
    backbone = build_backbone(cfg)
    key = {"input": stage0_dir.name, **method_key(cfg, backbone)}

    def compute(out: Path, key: dict, record: StepRecord) -> None:
        _compute(cfg, dataset, backbone, stage0_dir, out, key)
        masks = {"pseudo_mask": out / "val" / "masks"} if "val" in cfg.stage0.splits else {}
        tracking.track_results(record, dataset, out, masks)

    return STEP.run(cfg, key, [stage0_dir], compute)


def _compute(cfg: DictConfig, dataset: DatasetDescription, backbone, stage0_dir: Path, out: Path, key: dict) -> None:
    module = EmerDiffSegmenter(backbone, build_emerdiff(cfg), cfg.zero_shot.resolution, seed=cfg.seed,
                               score_side=score_side(cfg))  # fmt: skip
    splits: dict[str, tuple[list[str], MaskSetLayout]] = {}
    loaders, layouts, overlay_ids = [], [], set()
    for split in cfg.stage0.splits:
        source, target = MaskSetLayout(stage0_dir / split), MaskSetLayout(out / split)
        ids = [sid for sid in dataset.split_ids(split) if source.is_done(sid)]
        splits[split] = (ids, target)
        todo = [sid for sid in ids if not target.is_done(sid)]
        log.info("emerdiff [%s]: %d masks, %d to refine", split, len(ids), len(todo))
        overlay_ids.update(ids[: cfg.stage0.n_overlays])
        if todo:
            loaders.append(loader(cfg, StoredScoreImages(dataset, split, todo, source, cfg.zero_shot.resolution)))
            layouts.append(target)
    distributed.barrier()
    seconds, images = 0.0, sum(len(dl.dataset) for dl in loaders)
    forwards_per_image = None
    if loaders:
        writer = MaskSetWriter(layouts, overlay_ids, dataset.palette, dataset.background_index, cfg.stage0.writer_threads,
                              class_names=dataset.class_names)  # fmt: skip
        seconds = predict(cfg, module, loaders, writer)
        if module.emerdiff is not None and images:
            forwards_per_image = round(module.emerdiff.forwards / max(1, writer.written), 1)
        log.info("emerdiff: %d images in %.1f s (%s denoiser rows per image)", writer.written, seconds, forwards_per_image)
    evaluate_and_finish(
        out,
        key,
        lambda: {split: report_split("emerdiff", dataset, split, ids, target) for split, (ids, target) in splits.items()},
        predict_seconds=round(seconds, 2),
        images_predicted=images,
        denoiser_rows_per_image=forwards_per_image,
    )
