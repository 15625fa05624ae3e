"""DenseCRF refinement of a stage-0 pseudo-mask set (part of StableSeg+, docs/method.md).

Reads stage 0's stored class scores (soft, not only the hard labels), turns
them into probabilities, refines them with the image as the bilateral guide in
a pool of worker processes, and writes palette PNG masks (atomically; finished
images are skipped on resume) plus ``metrics.json`` against the ground truth.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from stableseg_pp import tracking
from stableseg_pp.artifacts import ChannelClasses, MaskSetLayout, load_stored_maps
from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.data.palette import save_palette_png
from stableseg_pp.evaluation.mask_sets import report_split
from stableseg_pp.methods.dense_crf import CRFParams, CRFPool
from stableseg_pp.pictures import write_overlays
from stableseg_pp.runtime import distributed
from stableseg_pp.runtime.atomic import atomic_save
from stableseg_pp.runtime.cpus import cpus_per_rank
from stableseg_pp.runtime.run_dir import evaluate_and_finish
from stableseg_pp.stages.step import Step
from stableseg_pp.tracking.base import StepRecord

log = logging.getLogger(__name__)
STEP = Step("crf")


def crf_params(crf: DictConfig) -> CRFParams:
    keep = {k: v for k, v in OmegaConf.to_container(crf, resolve=True).items() if k in CRFParams.__dataclass_fields__}
    return CRFParams(**keep)


def scores_to_probs(scores: np.ndarray, size: tuple[int, int], temperature: float) -> np.ndarray:
    """(K, h, w) stage-0 scores -> (K, H, W) probabilities: bilinear upsampling, softmax(scores / T)."""
    t = torch.from_numpy(scores.astype(np.float32))[None]
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0]
    return torch.softmax(t / temperature, dim=0).numpy()


def _jobs(dataset: DatasetDescription, split: str, ids: list[str], source: MaskSetLayout, temperature: float):
    """(id, image, probabilities, channel -> class mapping) of each image to refine."""
    for sid in ids:
        stored = load_stored_maps(source.maps_path(sid))
        image = dataset.read_image(split, sid)
        channels = ChannelClasses(tuple(stored.class_ids), dataset.background_index)
        if stored.scores is None:  # an image with no class to look for
            yield sid, image, np.ones((1, *image.shape[:2]), np.float32), channels
            continue
        yield sid, image, scores_to_probs(stored.scores, image.shape[:2], temperature), channels


def run(cfg: DictConfig, dataset: DatasetDescription, stage0_dir: Path) -> Path:
    """Refine every split of ``stage0_dir``; returns the content-addressed output folder."""
    key = {"input": stage0_dir.name, "crf": OmegaConf.to_container(cfg.crf, resolve=True)}
    key["crf"].pop("workers", None)

    def compute(out: Path, key: dict, record: StepRecord) -> None:
        _compute(cfg, dataset, stage0_dir, out, key)
        masks = {"pseudo_mask": out / "val" / "masks"} if "val" in cfg.stage0.splits else {}
        tracking.track_results(record, dataset, out, masks)

    return STEP.run(cfg, key, [stage0_dir], compute)


def crf_workers(cfg: DictConfig) -> int:
    """``crf.workers``, or (null) the CPUs this process may use, shared by the ranks on this machine."""
    workers = cfg.crf.get("workers")
    return int(workers) if workers else cpus_per_rank()


def _compute(cfg: DictConfig, dataset: DatasetDescription, stage0_dir: Path, out: Path, key: dict) -> None:
    params = crf_params(cfg.crf)
    splits, todo = {}, {}
    for split in cfg.stage0.splits:
        source = MaskSetLayout(stage0_dir / split)
        target = MaskSetLayout(out / split)
        ids = [sid for sid in dataset.split_ids(split) if source.is_done(sid)]
        splits[split] = (ids, target)
        # each rank refines its share with the CPU workers given to it (SLURM: --cpus-per-task)
        todo[split] = distributed.shard([sid for sid in ids if not target.is_done(sid)])
    workers = min(crf_workers(cfg), max(1, sum(len(t) for t in todo.values())))
    start = time.perf_counter()
    with CRFPool(workers) as pool:  # one pool for every split of the step
        if pool.start_seconds:
            log.info("crf: %d worker processes started in %.2f s", workers, pool.start_seconds)
        for split, (ids, target) in splits.items():
            log.info("crf [%s]: %d masks, %d to refine here with %d workers", split, len(ids), len(todo[split]), workers)
            stream = _jobs(dataset, split, todo[split], MaskSetLayout(stage0_dir / split), cfg.crf.score_temperature)
            jobs = (((sid, channels), image, probs) for sid, image, probs, channels in stream)
            bar = tqdm(pool.refine(jobs, params), total=len(todo[split]), desc=f"CRF {split}", unit="img",
                       disable=not distributed.is_main())  # fmt: skip
            for (sid, channels), labels in bar:
                mask = channels.to_classes(labels)
                atomic_save(target.mask_path(sid), lambda t, m=mask: save_palette_png(m, t, dataset.palette))
    seconds = time.perf_counter() - start  # this rank's refinement, the pool's start included
    distributed.barrier()  # every rank's masks are written
    n = cfg.stage0.n_overlays
    distributed.on_main(lambda: [write_overlays(dataset, s, ids[:n], t, "CRF masks") for s, (ids, t) in splits.items()])
    evaluate_and_finish(
        out,
        key,
        lambda: {split: report_split("crf", dataset, split, ids, target) for split, (ids, target) in splits.items()},
        predict_seconds=round(seconds, 2),
        images_predicted=sum(len(t) for t in todo.values()),
    )
