"""Train DeepLabV3+ on a pseudo-mask set, evaluate it, and predict the training images.

Checkpoints go to ``<out>/checkpoints``; a killed training resumes from
``last.ckpt``. The predictions on the training images (masks and the
confidence of the predicted class) are the next stage's pseudo ground truth.
A training can start from the weights of an earlier one (``init``: StableSeg++
retrains StableSeg+'s DeepLabV3+ on the regenerated masks).
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from stableseg_pp import tracking
from stableseg_pp.artifacts import MaskSetLayout, SegmenterMaskWriter
from stableseg_pp.config import build
from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.data.files import image_size
from stableseg_pp.data.pairs import ImageMaskPairs, eval_transform, evaluation_batch_size, train_transform
from stableseg_pp.evaluation.fit_check import check_segmenter_fit
from stableseg_pp.evaluation.mask_sets import NO_GROUND_TRUTH, report_split
from stableseg_pp.pictures import write_overlays
from stableseg_pp.runtime import distributed
from stableseg_pp.runtime.cpus import loader_workers
from stableseg_pp.runtime.errors import ConfigError
from stableseg_pp.runtime.progress import training_loop_settings
from stableseg_pp.runtime.resume import run_lightning
from stableseg_pp.runtime.run_dir import IncompleteStageError, evaluate_and_finish, final_checkpoint
from stableseg_pp.stages.step import Step, on_gpu
from stableseg_pp.tracking.base import StepRecord

log = logging.getLogger(__name__)
STEP = Step("deeplab")


def training_precision(cfg: DictConfig, wanted: str | None) -> str:
    """A training's Lightning precision: ``wanted`` on GPU (null: bf16 mixed precision where the GPU supports it, else
    fp16 mixed); 32-bit on CPU."""
    if not on_gpu(cfg):
        return "32-true"
    if wanted:
        return str(wanted)
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"


def _precision(cfg: DictConfig) -> str:
    return training_precision(cfg, cfg.segmenter.train.get("precision"))


def trainer_key(cfg: DictConfig, precision: str) -> dict:
    """The trainer settings that change a trained model: the hardware kind, the training's own ``precision``, and
    the number of ranks (the effective batch is ``batch_size`` x ranks; sync batch norm pools their statistics)."""
    return {
        "accelerator": "gpu" if on_gpu(cfg) else "cpu",
        "precision": precision,
        "world_size": distributed.configured_world_size(cfg.trainer),
        "sync_batchnorm": bool(cfg.trainer.get("sync_batchnorm", False)),
    }


SIDE_MULTIPLE = 32  # derived training sides: a multiple of DeepLabV3+'s largest stride
MAX_DERIVED_SIDE = 512  # the DeepLab papers' crop; larger pictures are scaled down to it by the augmentation


def derived_side(median_side: int) -> int:
    """A training side for pictures whose median shorter side is ``median_side``: the nearest multiple of
    :data:`SIDE_MULTIPLE`, at most :data:`MAX_DERIVED_SIDE`."""
    return min(MAX_DERIVED_SIDE, max(SIDE_MULTIPLE, round(median_side / SIDE_MULTIPLE) * SIDE_MULTIPLE))


def training_plan(cfg: DictConfig, dataset: DatasetDescription, n_train: int) -> dict:
    """``segmenter.train`` as the training runs it: ``crop_size`` / ``base_size`` null -> from the training pictures
    (:func:`derived_side` of their median shorter side), ``max_epochs`` null -> as many epochs as ``iterations``
    optimizer steps take on ``n_train`` pictures (the schedule scales with the dataset, not a fixed epoch count)."""
    t = OmegaConf.to_container(cfg.segmenter.train, resolve=True)
    if t.get("crop_size") is None or t.get("base_size") is None:
        side = dataset.image_side("train")
        if side is None:
            raise ConfigError("segmenter.train.crop_size=null: no training picture could be read to derive it; set it")
        t["crop_size"] = t.get("crop_size") or derived_side(side)
        t["base_size"] = t.get("base_size") or t["crop_size"]
    iterations = t.pop("iterations", None)
    if t.get("max_epochs") is None:
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
            raise ConfigError(
                f"segmenter.train.iterations={iterations}: with max_epochs=null, give the optimizer steps to train for"
            )
        per_rank = math.ceil(n_train / distributed.configured_world_size(cfg.trainer))
        steps_per_epoch = per_rank // t["batch_size"] if per_rank > t["batch_size"] else 1  # drop_last past one batch
        t["max_epochs"] = math.ceil(iterations / max(1, steps_per_epoch))
    return t


def run(cfg: DictConfig, dataset: DatasetDescription, masks_dir: Path, init: Path | None = None) -> Path:
    """Train on ``masks_dir/train``; returns the content-addressed output folder.

    ``init``: a finished DeepLabV3+ step folder whose weights the training starts from (None: from scratch).
    The content key holds the training as it runs (:func:`training_plan`: sizes and epochs resolved).
    """
    seg = cfg.segmenter
    pseudo = MaskSetLayout(masks_dir / "train")
    n_train = sum(pseudo.is_done(sid) for sid in dataset.split_ids("train"))
    key = {
        "masks": masks_dir.name,
        "segmenter": OmegaConf.to_container(seg, resolve=True),
        "trainer": trainer_key(cfg, _precision(cfg)),
        "seed": cfg.seed,
        "writes": ["masks", "confidence", "class_peaks"],  # what each image gets (a step writing more is another)
    }
    key["segmenter"]["train"] = training_plan(cfg, dataset, max(1, n_train))
    if init is not None:
        key["init"] = init.name
    for k in ("num_workers", "log_every"):
        key["segmenter"]["train"].pop(k, None)
    key["segmenter"].pop("eval_batch_size", None)

    def compute(out: Path, key: dict, record: StepRecord) -> None:
        _compute(cfg, dataset, masks_dir, out, key, record, init)
        masks = {"prediction": out / "val" / "masks", "pseudo_mask": masks_dir / "val" / "masks"}
        tracking.track_results(record, dataset, out, masks)

    return STEP.run(cfg, key, [masks_dir], compute)


def _compute(
    cfg: DictConfig,
    dataset: DatasetDescription,
    masks_dir: Path,
    out: Path,
    key: dict,
    record: StepRecord,
    init: Path | None = None,
) -> None:
    seg = cfg.segmenter
    if cfg.trainer.get("sync_batchnorm") and not on_gpu(cfg):
        raise ConfigError("trainer.sync_batchnorm=true needs GPUs (PyTorch's SyncBatchNorm has no CPU version); set it to false")
    names = dataset.class_names
    layout = dataset.layout
    pseudo = MaskSetLayout(masks_dir / "train")
    train_ids = [sid for sid in dataset.split_ids("train") if pseudo.is_done(sid)]
    val_ids = readable(dataset, "val", dataset.split_ids("val"))
    if not train_ids:
        raise FileNotFoundError(f"no pseudo-masks in {pseudo.masks}: run the earlier stages first")

    def images(split: str, ids: list[str]) -> list[Path]:
        return [layout.image_path(split, i) for i in ids]

    t = seg.train
    plan = key["segmenter"]["train"]  # sizes and epochs as resolved (training_plan)
    train_ds = ImageMaskPairs(
        images("train", train_ids),
        [pseudo.mask_path(i) for i in train_ids],
        len(names),
        train_transform(plan["crop_size"], tuple(plan["scale"]), plan["base_size"]),
        dataset.convert_to_rgb,
        exif_transpose=layout.exif_transpose,
    )
    scored = bool(val_ids) and all(layout.has_mask("val", i) for i in val_ids)
    val_ds = None
    if scored:
        val_ds = ImageMaskPairs(
            images("val", val_ids),
            [layout.mask_path("val", i) for i in val_ids],
            len(names),
            eval_transform(),
            dataset.convert_to_rgb,
            read_mask=partial(layout.read_mask_file, n_classes=len(names)),
            exif_transpose=layout.exif_transpose,
        )
    else:
        log.info("deeplab: the val pictures have no masks, so the training is not validated (%s)", NO_GROUND_TRUTH)
    # Pinned pages on a GPU: Lightning's copy to the device is then asynchronous, not a wait for the previous step.
    # Workers are started anew each epoch (not persistent): their random state then comes from the main process's,
    # which checkpoints hold, so a resumed training draws what the uninterrupted one drew (runtime/resume.py).
    workers = loader_workers(t.num_workers, "segmenter.train.num_workers")
    loading = {"num_workers": workers, "pin_memory": on_gpu(cfg), "persistent_workers": False}
    train_loader = DataLoader(train_ds, batch_size=t.batch_size, shuffle=True, drop_last=len(train_ds) > t.batch_size,
                              **loading)  # fmt: skip
    # the pictures predicted after training, and their batch size (1 where sizes differ), read once: val's also
    # validates the training
    splits = (("train", train_ids), ("val", val_ids))
    to_predict = {split: ImageMaskPairs(images(split, ids), None, len(names), eval_transform(), dataset.convert_to_rgb,
                                        exif_transpose=layout.exif_transpose) for split, ids in splits}  # fmt: skip
    eval_batch = {split: evaluation_batch_size(items, seg.eval_batch_size) for split, items in to_predict.items()}
    val_loader = DataLoader(val_ds, batch_size=eval_batch["val"], **loading) if val_ds is not None else None
    # Seed here, not only at start-up: the result must not depend on which stages ran before in this process.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    eval_max_side = int(plan["base_size"] * max(plan["scale"]))  # larger pictures are predicted scaled down to it
    module = build(seg.model, class_names=names, eval_max_side=eval_max_side, _convert_="all")
    ckpt_dir = out / "checkpoints"
    # monitor=None: keep the newest epoch (choosing by val mIoU would use labels); last.ckpt links to it
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last="link", save_top_k=1, every_n_epochs=1)
    loop = training_loop_settings(t.log_every, "segmenter.train.log_every", callbacks=[checkpoint])
    trainer = instantiate(
        cfg.trainer,
        max_epochs=plan["max_epochs"],
        precision=_precision(cfg),
        logger=[CSVLogger(out, name="logs"), *record.lightning_loggers()],
        default_root_dir=out,
        **loop,
    )
    resume = resume_checkpoint(out)
    if resume:
        log.info("deeplab: resuming from %s", resume)
    elif init is not None:
        load_trained_weights(module, init)
    run_lightning(trainer.fit, module, train_loader, val_loader, ckpt_path=str(resume) if resume else None)
    if trainer.interrupted or trainer.current_epoch < plan["max_epochs"]:
        raise IncompleteStageError(
            f"deeplab: training stopped at epoch {trainer.current_epoch} of {plan['max_epochs']}; "
            f"run the same command again to resume from {ckpt_dir / 'last.ckpt'}"
        )

    # Predict the training images (next stage's targets) and the val images (the reported mIoU), sharded across ranks.
    layouts = {}
    for split, ids in splits:
        layouts[split] = MaskSetLayout(out / split)
        loader = DataLoader(to_predict[split], batch_size=eval_batch[split], num_workers=workers)
        predictor = instantiate(
            cfg.trainer,
            callbacks=[SegmenterMaskWriter(layouts[split], ids, dataset.palette)],
            logger=False,
            precision=_precision(cfg),
            sync_batchnorm=False,
        )
        run_lightning(predictor.predict, module, loader, return_predictions=False)
    distributed.barrier()  # every rank's predictions are written
    n = cfg.stage0.n_overlays
    distributed.on_main(lambda: [write_overlays(dataset, s, ids[:n], layouts[s], "DeepLabV3+") for s, ids in splits])

    def report() -> dict[str, dict]:
        entries = {split: report_split("deeplab", dataset, split, ids, layouts[split]) for split, ids in splits}
        val_miou = (entries["val"]["metrics"] or {}).get("miou")
        entries["train"]["fit_to_masks"] = check_segmenter_fit(dataset, out, masks_dir, val_miou)
        return entries

    evaluate_and_finish(out, key, report)


def readable(dataset: DatasetDescription, split: str, ids: list[str]) -> list[str]:
    """``ids`` less the pictures whose file cannot be read, where the dataset skips bad input (``data.on_bad_input=skip``:
    stage 0 skipped them too, so they have no pseudo-mask); with ``error`` all of them, and the reader names a bad one."""
    if dataset.on_bad_input != "skip":
        return ids
    kept = [sid for sid in ids if image_size(dataset.layout.image_path(split, sid)) is not None]
    if len(kept) < len(ids):
        left = sorted(set(ids) - set(kept))
        log.warning("deeplab [%s]: %d pictures cannot be read and are not predicted: %s", split, len(left), left[:10])
    return kept


def load_trained_weights(module: L.LightningModule, folder: Path) -> None:
    """Start ``module`` from the weights a finished DeepLabV3+ step saved (same classes, same architecture)."""
    ckpt = final_checkpoint(folder)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    trained = state.get("hyper_parameters", {}).get("class_names")
    if trained is not None and list(trained) != list(module.class_names):
        raise ConfigError(f"{ckpt}: trained on classes {list(trained)}, not this dataset's {list(module.class_names)}")
    module.load_state_dict(state["state_dict"])
    log.info("deeplab: starting from the weights of %s", folder.name)


def resume_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint of an interrupted training: ``last.ckpt`` or one saved on a SLURM requeue signal."""
    candidates = [p for p in (out / "checkpoints" / "last.ckpt", *out.glob("hpc_ckpt_*.ckpt")) if p.exists()]
    return max(candidates, key=lambda p: p.resolve().stat().st_mtime, default=None)
