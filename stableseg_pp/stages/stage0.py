"""Stage 0: StableSeg zero-shot pseudo-masks (docs/method.md, "Stage 0").

Per image: a palette PNG pseudo-mask, the per-site low-resolution class maps
(float16, for stage 2), overlays for a few images, and ``metrics.json`` when
ground truth exists. Finished images are skipped on resume.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from stableseg_pp import tracking
from stableseg_pp.artifacts import MaskSetLayout, MaskSetWriter, SiteWeights
from stableseg_pp.backbones.base import DiffusionBackbone, select_sites
from stableseg_pp.backbones.loading import offline_hint
from stableseg_pp.config import build
from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.data.prompted_images import LABELS, collate_samples
from stableseg_pp.evaluation.mask_sets import report_split
from stableseg_pp.methods.background import background_rule
from stableseg_pp.methods.stableseg import StableSeg, check_settings, split_into_prompts
from stableseg_pp.models.zero_shot_module import ZeroShotSegmenter
from stableseg_pp.runtime import distributed
from stableseg_pp.runtime.atomic import write_json
from stableseg_pp.runtime.cpus import loader_workers
from stableseg_pp.runtime.errors import ConfigError
from stableseg_pp.runtime.progress import ImagesPerSecondBar
from stableseg_pp.runtime.resume import run_lightning
from stableseg_pp.runtime.run_dir import evaluate_and_finish
from stableseg_pp.stages import labels
from stableseg_pp.stages.labels import read_label_files
from stableseg_pp.stages.step import Step, build_backbone, diffusion_key, method_settings, on_gpu
from stableseg_pp.tracking.base import StepRecord

log = logging.getLogger(__name__)
STEP = Step("stage0")


def check_zero_shot_settings(cfg: DictConfig) -> None:
    """The stage-0 settings that can be checked without a model (before any rank starts or weights load): StableSeg's
    own (its checker, :func:`~stableseg_pp.methods.stableseg.check_settings`), the run's and the data's."""
    check_settings(**method_settings(cfg.zero_shot))
    if cfg.data.get("labels") not in LABELS:
        raise ConfigError(
            f"data.labels={cfg.data.get('labels')}: use oracle (classes from the ground truth), all (every class) or "
            "predicted (the labeler's, no ground truth)"
        )
    if cfg.data.get("on_bad_input") not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_input={cfg.data.get('on_bad_input')}: use error or skip")
    if bad := [s for s in cfg.stage0.splits if s not in ("train", "val")]:
        raise ConfigError(f"stage0.splits={list(cfg.stage0.splits)}: {bad} are not splits; use train and/or val")


def check_backbone_available(cfg: DictConfig) -> None:
    """A hub id that is not in the local cache while downloads are off (``HF_HUB_OFFLINE=1``) is an error now, not
    after the dataset has been written and the loaders started."""
    try:
        build_backbone(cfg).sites(cfg.zero_shot.resolution)
    except LookupError as err:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            reason = "its configs are not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 allows no download"
            raise ConfigError(offline_hint(str(cfg.diffusion.pretrained), reason)) from err


def check_backbone_settings(cfg: DictConfig, dataset: DatasetDescription) -> None:
    """The settings that need the backbone's structure (scales against its sites, the resolution, every class name
    of a ``data.labels=all`` prompt), checked from its configs before any weights are read."""
    zs = cfg.zero_shot
    backbone = build_backbone(cfg)
    try:
        sites = backbone.sites(zs.resolution)
    except LookupError:
        return  # a hub id not in the local cache: checked when it is loaded
    depths = {k: zs.get(k) for k in ("cross_depths", "self_depths", "stored_cross_depths")}
    select_sites(sites, "text", zs.cross_scales, depths["cross_depths"], "zero_shot.cross_scales", "zero_shot.cross_depths")
    select_sites(
        sites, "text", zs.stored_cross_scales, depths["stored_cross_depths"], "zero_shot.stored_cross_scales",
        "zero_shot.stored_cross_depths",
    )  # fmt: skip
    if zs.mode != "ca":
        select_sites(sites, "image", zs.self_scales, depths["self_depths"], "zero_shot.self_scales", "zero_shot.self_depths")
    if dataset.labels in ("all", "predicted"):  # predicted: the labeler's evidence prompts for every class
        names = [dataset.prompt_name(c) for c in range(len(dataset.class_names)) if c != dataset.background_index]
        check_prompt_names(backbone, names, zs, dataset.has_background)
        labeler = build(labels.round_labeler(cfg)) if dataset.labels == "predicted" else None
        if hasattr(labeler, "check_prompts"):  # a labeler that prompts the backbone itself: its prompts must fit
            labeler.check_prompts(backbone, names)


def check_prompt_names(backbone: DiffusionBackbone, names: list[str], zs: DictConfig, has_background: bool) -> None:
    """Every class name (and the background word, where stage 0 adds it) fits a prompt of the backbone's text
    encoder, read from its tokenizer before any weights: the list is split over as many prompts as it takes, but
    each name must fit one on its own."""
    names = background_rule(zs, has_background).prompt_names(names)
    split_into_prompts(backbone, names, zs.prompt_template, zs.joiner, zs.get("max_classes_per_prompt"))


def stableseg_settings(cfg: DictConfig, dataset: DatasetDescription) -> dict:
    """StableSeg's settings for this dataset: ``zero_shot`` with the background rule a dataset without background
    class gets (none)."""
    settings = method_settings(cfg.zero_shot)
    settings["background"] = background_rule(settings, dataset.has_background).kind
    return settings


def build_stableseg(cfg: DictConfig, dataset: DatasetDescription) -> Callable[..., StableSeg]:
    """StableSeg from its config node (``zero_shot``), waiting for the loaded backbone."""
    return instantiate(cfg.zero_shot, background=background_rule(cfg.zero_shot, dataset.has_background).kind)


def configured_site_weights(cfg: DictConfig) -> SiteWeights | None:
    """``stage0.site_weights``: a ``weights.json`` (or its folder) given by the user, else None."""
    path = cfg.stage0.get("site_weights")
    return SiteWeights.load(path) if path else None


def stage_key(cfg: DictConfig, dataset: DatasetDescription, backbone: DiffusionBackbone, weights: SiteWeights | None) -> dict:
    """Everything stage 0's outputs depend on."""
    return {
        "data": dataset.key(),
        "diffusion": diffusion_key(cfg, backbone),
        "zero_shot": {**stableseg_settings(cfg, dataset), "splits": list(cfg.stage0.splits)},  # the run's splits
        "site_weights": None if weights is None else {"family": weights.family, "sites": dict(weights.weights)},
        "seed": cfg.seed if backbone.stochastic else None,  # only noise makes stage 0 random
        **({"noise": "per image"} if backbone.stochastic else {}),  # drawn from (seed, image id) since 2026-12
    }


def run(
    cfg: DictConfig,
    dataset: DatasetDescription,
    weights: SiteWeights | None = None,
    inputs: Sequence[Path] = (),
    adapter: Path | None = None,
    segmenter: Path | None = None,
) -> Path:
    """Stage 0 on every configured split.

    ``weights``: learned site weights (stage 2 passes its own; default ``stage0.site_weights`` or uniform);
    ``inputs``: the folders they came from (for lineage); ``adapter``: a LoRA of the denoiser (a MAGNET step
    folder; default ``diffusion.lora``); ``segmenter``: the previous round's DeepLabV3+ (for a labeler that reads it).
    """
    weights = weights or configured_site_weights(cfg)
    backbone = build_backbone(cfg, adapter)
    key = stage_key(cfg, dataset, backbone, weights)
    predicted = confidence = None
    if dataset.labels == "predicted":
        labels_dir = predict_labels(cfg, dataset, segmenter)
        key["labels"], inputs = labels_dir.name, [*inputs, labels_dir]
        predicted, confidence = read_label_files(labels_dir)

    def compute(out: Path, key: dict, record: StepRecord) -> None:
        _compute(cfg, dataset, backbone, weights, out, key, predicted, confidence)
        masks = {"pseudo_mask": out / "val" / "masks"} if "val" in cfg.stage0.splits else {}
        tracking.track_results(record, dataset, out, masks)

    return STEP.run(cfg, key, inputs, compute)


def predict_labels(cfg: DictConfig, dataset: DatasetDescription, segmenter: Path | None = None) -> Path:
    """``data.labels=predicted``: the labels step of a round (``segmenter``: the previous round's DeepLabV3+ folder,
    None in round 1), on the labeler's evidence: none (it runs the backbone), stage 0 with every class in the prompt
    (the same backbone and settings), or that segmenter's predictions. Content-addressed: a labeler that does not read
    a segmenter gives every round the same folder. A labeler with a second opinion also reads round 1's labels step."""
    node = labels.round_labeler(cfg, segmenter)
    labeler = build(node)
    if labeler.evidence is None:
        return labels.run(cfg, dataset, node=node)
    if labeler.evidence == "segmenter":  # round 1's labels (content-addressed: found, not redone) settle its doubts
        first = predict_labels(cfg, dataset) if labeler.second_opinion else None
        return labels.run(cfg, dataset, segmenter, node=node, second_opinion=first)
    every_class = replace(dataset, labels="all", settings={**dataset.settings, "labels": "all"})
    return labels.run(cfg, dataset, run(cfg, every_class), node=node)


def _compute(
    cfg: DictConfig,
    dataset: DatasetDescription,
    backbone: DiffusionBackbone,
    weights: SiteWeights | None,
    out: Path,
    key: dict,
    predicted: dict[str, dict[str, list[int]]] | None = None,
    confidence: dict[str, dict[str, dict[int, float]]] | None = None,
) -> None:
    if weights is not None:
        weights.check_family(backbone.family)  # before any model is loaded; StableSeg checks the site ids
    module = ZeroShotSegmenter(
        backbone,
        dataset,
        stableseg=build_stableseg(cfg, dataset),
        site_weights=None if weights is None else weights.weights,
        seed=cfg.seed,
    )
    splits = list(cfg.stage0.splits)
    layouts = {split: MaskSetLayout(out / split) for split in splits}
    all_ids = {split: dataset.split_ids(split) for split in splits}
    loaders, loader_layouts, overlay_ids = [], [], set()
    for split in splits:
        ids, layout = all_ids[split], layouts[split]
        todo = [sid for sid in ids if not layout.is_done(sid)]
        log.info("stage 0 [%s]: %d images, %d already done, %d to do", split, len(ids), len(ids) - len(todo), len(todo))
        overlay_ids.update(ids[: cfg.stage0.n_overlays])
        if todo:
            loaders.append(
                DataLoader(
                    dataset.prompted_images(
                        split,
                        todo,
                        module.resolution,
                        None if predicted is None else predicted[split],
                        None if confidence is None else confidence.get(split),
                    ),
                    batch_size=cfg.data.batch_size,
                    num_workers=loader_workers(cfg.data.num_workers, "data.num_workers"),
                    collate_fn=collate_samples,
                    shuffle=False,
                    pin_memory=on_gpu(cfg),  # pinned pixels: their copy to the GPU does not block
                    persistent_workers=False,
                )
            )
            loader_layouts.append(layout)
    distributed.barrier()  # every rank has listed the same images to do before any is written
    seconds = 0.0
    if loaders:
        writer = MaskSetWriter(
            loader_layouts, overlay_ids, dataset.palette, dataset.background_index, cfg.stage0.get("writer_threads", 4),
            class_names=dataset.class_names,
        )  # fmt: skip
        trainer = instantiate(cfg.trainer, callbacks=[writer, ImagesPerSecondBar()], logger=False)
        # Lightning shards the images across ranks (an unrepeated distributed sampler in predict)
        start = time.perf_counter()
        run_lightning(trainer.predict, module, dataloaders=loaders, return_predictions=False)
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
            converted = dataset.converted_images(split, ids)
            if converted:
                log.info("stage 0 [%s]: images converted to RGB, by stored mode: %s", split, converted)
            results[split] = report_split(
                "stage 0", dataset, split, ids, layout, skipped=len(missing), converted_to_rgb=converted
            )
        return results

    evaluate_and_finish(
        out, key, report, predict_seconds=round(seconds, 2), images_predicted=sum(len(dl.dataset) for dl in loaders)
    )
