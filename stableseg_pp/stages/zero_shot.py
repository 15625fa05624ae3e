"""Stage 0: StableSeg zero-shot pseudo-masks (METHOD.md section 1).

Per image: a palette PNG pseudo-mask, the per-layer low-resolution class maps
(float16, for stage 2), overlays for a few images, and ``metrics.json`` when
ground truth exists. Finished images are skipped on resume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from stableseg_pp import tracking
from stableseg_pp.data.datasets import background_index, build_dataset, prepare_dataset, split_ids
from stableseg_pp.data.palette import palette_for
from stableseg_pp.data.segmentation import collate_samples
from stableseg_pp.diffusion.backbone import resolve_model_path
from stableseg_pp.models.zero_shot_module import ZeroShotSegmenter
from stableseg_pp.pipeline import distributed
from stableseg_pp.pipeline.progress import ImagesPerSecondBar
from stableseg_pp.pipeline.run_dir import folder_fingerprint, open_stage
from stableseg_pp.pipeline.writers import PseudoMaskLayout, PseudoMaskWriter, write_json
from stableseg_pp.stages.evaluate import evaluate_and_finish, report_split, track_results

log = logging.getLogger(__name__)
NAME = "stage0"


def model_identity(pretrained: str) -> dict:
    path = Path(resolve_model_path(pretrained)).expanduser()
    if path.is_dir():
        return {"folder": path.name, "fingerprint": folder_fingerprint(path)}
    return {"hub_id": pretrained}


def stage_key(cfg: DictConfig) -> dict:
    """Everything stage 0's outputs depend on."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for k in ("batch_size", "num_workers"):  # execution details, not results
        data.pop(k, None)
    data["root"] = str(Path(data["root"]).resolve())
    return {
        "stage": NAME,
        "data": data,
        "diffusion": {"dtype": cfg.diffusion.dtype, **model_identity(cfg.diffusion.pretrained)},
        "zero_shot": OmegaConf.to_container(cfg.zero_shot, resolve=True),
        "seed": cfg.seed if cfg.zero_shot.add_noise else None,  # only noise makes stage 0 random
    }


def background_mode(cfg: DictConfig) -> str:
    """``zero_shot.background``, or ``none`` for a dataset without a background class (every pixel gets a class)."""
    return "none" if background_index(cfg.data) is None else str(cfg.zero_shot.background)


def build_module(cfg: DictConfig) -> ZeroShotSegmenter:
    zs = OmegaConf.to_container(cfg.zero_shot, resolve=True)
    zs.pop("splits", None)
    zs.pop("n_overlays", None)
    zs["background"] = background_mode(cfg)
    return ZeroShotSegmenter(
        pretrained=cfg.diffusion.pretrained,
        class_names=list(cfg.data.class_names),
        prompt_names=OmegaConf.to_container(cfg.data.prompt_names, resolve=True),
        dtype=cfg.diffusion.dtype,
        stableseg=zs,
        background_index=background_index(cfg.data),
    )


def run(cfg: DictConfig, inputs: Sequence[Path] = ()) -> Path:
    """Stage 0 on every configured split; ``inputs``: folders the configuration came from (for lineage)."""
    with distributed.main_first():
        prepare_dataset(cfg.data, list(cfg.zero_shot.splits))
    key = stage_key(cfg)
    out, finished = open_stage(cfg.paths.run_dir, NAME, key, cfg.force)
    if finished:
        return out
    with tracking.active().step(out, inputs, key) as record:
        _compute(cfg, out, key)
        masks = {"pseudo_mask": out / "val" / "masks"} if "val" in cfg.zero_shot.splits else {}
        track_results(record, cfg.data, out, masks)
    return out


def _compute(cfg: DictConfig, out: Path, key: dict) -> None:
    module = build_module(cfg)
    splits = list(cfg.zero_shot.splits)
    layouts = {split: PseudoMaskLayout(out / split) for split in splits}
    all_ids = {split: split_ids(cfg.data, split) for split in splits}
    loaders, loader_layouts, overlay_ids = [], [], set()
    for split in splits:
        ids, layout = all_ids[split], layouts[split]
        todo = [sid for sid in ids if not layout.is_done(sid)]
        log.info("stage 0 [%s]: %d images, %d already done, %d to do", split, len(ids), len(ids) - len(todo), len(todo))
        overlay_ids.update(ids[: cfg.zero_shot.n_overlays])
        if todo:
            dataset = build_dataset(cfg.data, split, module.resolution, todo)
            loaders.append(
                DataLoader(
                    dataset,
                    batch_size=cfg.data.batch_size,
                    num_workers=cfg.data.num_workers,
                    collate_fn=collate_samples,
                    shuffle=False,
                )
            )
            loader_layouts.append(layout)
    distributed.barrier()  # every rank has listed the same images to do before any is written
    seconds = 0.0
    if loaders:
        writer = PseudoMaskWriter(loader_layouts, overlay_ids, palette_for(cfg.data.get("palette")), background_index(cfg.data))
        trainer = instantiate(cfg.trainer, callbacks=[writer, ImagesPerSecondBar()], logger=False)
        # Lightning shards the images across ranks (an unrepeated distributed sampler in predict)
        start = time.perf_counter()
        trainer.predict(module, dataloaders=loaders, return_predictions=False)
        distributed.barrier()
        seconds = time.perf_counter() - start  # model loading included: every rank loads it itself
        log.info("stage 0: rank %d wrote %d images", distributed.rank(), writer.written)

    def report() -> dict[str, dict]:
        results: dict[str, dict] = {}
        for split in splits:
            ids, layout = all_ids[split], layouts[split]
            missing = [sid for sid in ids if not layout.is_done(sid)]
            if missing:
                log.warning("stage 0 [%s]: %d images skipped for bad input: %s", split, len(missing), missing[:10])
            write_json(layout.root / "skipped.json", missing)
            results[split] = report_split("stage 0", cfg.data, split, ids, layout, skipped=len(missing))
        return results

    evaluate_and_finish(
        out, key, report, predict_seconds=round(seconds, 2), images_predicted=sum(len(dl.dataset) for dl in loaders)
    )
