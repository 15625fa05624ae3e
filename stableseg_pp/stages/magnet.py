"""MAGNET (``stage=magnet``, and optionally inside ``stage=all``): LoRA fine-tuning of an MM-DiT so that its
grounding-expert block segments better, on the run's own pseudo-masks by default (docs/magnet.md).

Targets (``magnet.targets``): ``refined`` (the latest refined pseudo-masks: the
CRF step before it), ``stage0`` (raw stage-0 masks), ``segmenter`` (the latest
DeepLabV3+ predictions), ``ground_truth`` (the upper reference), or a folder of
masks in the run layout (``<folder>/train/masks/<id>.png``, class ids). Writes
the adapter in the diffusers LoRA format (``adapter/pytorch_lora_weights.safetensors``,
loadable with the pipeline's ``load_lora_weights``; ``diffusion.lora=<this
folder>`` uses it), checkpoints (a killed training resumes), CSV logs, and the
held-out flow-matching loss of the base model and of the adapted one.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from stableseg_pp.artifacts import ChannelClasses, MaskSetLayout
from stableseg_pp.backbones.base import select_sites
from stableseg_pp.backbones.loading import LORA_FILE
from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.data.prompted_images import PromptedImages
from stableseg_pp.models.magnet import MagnetModule
from stableseg_pp.runtime import distributed
from stableseg_pp.runtime.atomic import temporary_name
from stableseg_pp.runtime.cpus import loader_workers
from stableseg_pp.runtime.errors import ConfigError
from stableseg_pp.runtime.progress import training_loop_settings
from stableseg_pp.runtime.resume import run_lightning
from stableseg_pp.runtime.run_dir import IncompleteStageError, evaluate_and_finish
from stableseg_pp.stages import deeplab, refinement, stage0
from stableseg_pp.stages.deeplab import resume_checkpoint, trainer_key, training_precision
from stableseg_pp.stages.step import Step, build_backbone, diffusion_key

log = logging.getLogger(__name__)
STEP = Step("magnet")
STEP_TARGETS = ("refined", "stage0", "segmenter")
ADAPTER = "adapter"


@dataclass
class MaskTarget:
    pixels: torch.Tensor  # (3, R, R) in [-1, 1]
    names: list[str]  # the prompted class names
    target: torch.Tensor  # (S, S) uint8: c + 1 = the c-th prompted class, 0 = none of them, 255 = ignored


class MaskTargetImages(Dataset):
    """A split's images as the backbone takes them, the classes to prompt for, and a target mask in channel ids.

    Args:
        images: the split as stage 0 reads it (pixels, classes to prompt for, ground truth).
        dataset: the run's dataset (prompt words, background class).
        mask_size: side of the target masks (nearest-neighbour resize).
        targets: where the target masks are (a mask set of class ids), or None for the ground truth.
    """

    def __init__(self, images: PromptedImages, dataset: DatasetDescription, mask_size: int, targets: MaskSetLayout | None):
        self.images, self.dataset, self.mask_size, self.targets = images, dataset, mask_size, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> MaskTarget | None:
        sample = self.images[index]
        if sample is None or not sample.class_ids:
            return None  # a skipped bad input, or nothing to look for
        classes = sample.mask if self.targets is None else np.array(Image.open(self.targets.mask_path(sample.id)))
        channels = ChannelClasses(tuple(sample.class_ids), self.dataset.background_index).to_channels(classes)
        resized = Image.fromarray(channels).resize((self.mask_size, self.mask_size), Image.NEAREST)
        names = [self.dataset.prompt_name(c) for c in sample.class_ids]
        return MaskTarget(sample.pixels, names, torch.from_numpy(np.array(resized, dtype=np.uint8)))


def collate_targets(items: list[MaskTarget | None]) -> dict:
    items = [i for i in items if i is not None]
    if not items:
        return {"pixels": torch.zeros(0, 3, 1, 1), "names": [], "targets": torch.zeros(0, 1, 1, dtype=torch.uint8)}
    return {
        "pixels": torch.stack([i.pixels for i in items]),
        "names": [i.names for i in items],
        "targets": torch.stack([i.target for i in items]),
    }


def expert_site(cfg: DictConfig, backbone) -> str:
    """The grounding-expert site: the image-to-text site at depth ``magnet.expert_depth``."""
    depth = cfg.magnet.expert_depth
    if depth is None:
        raise ConfigError(
            "magnet.expert_depth is not set: give the grounding-expert block (Seg4Diff: 9 for SD3 Medium); "
            "python -m stableseg_pp.analyze layers names the best one of a backbone"
        )
    sites = select_sites(backbone.sites(cfg.zero_shot.resolution), "text", depths=[depth], depth_setting="magnet.expert_depth")
    return sites[0].id


def lora_sites(cfg: DictConfig, backbone) -> list[str]:
    """The attention sites whose projections get adapters: every site at the depths ``magnet.lora.blocks`` (null:
    every block, as in Seg4Diff)."""
    sites = backbone.sites(cfg.zero_shot.resolution)
    blocks = cfg.magnet.lora.blocks
    if blocks is not None:
        available = sorted({s.depth for s in sites})
        if missing := sorted(set(blocks) - set(available)):
            raise ConfigError(f"magnet.lora.blocks={list(blocks)}: blocks {missing} do not exist; available: {available}")
        sites = [s for s in sites if s.depth in set(blocks)]
    return [s.id for s in sites]


def build_module(cfg: DictConfig, backbone) -> MagnetModule:
    mg, zs = cfg.magnet, cfg.zero_shot
    loss = mg.loss
    return MagnetModule(
        backbone,
        expert_site(cfg, backbone),
        lora_sites(cfg, backbone),
        rank=mg.lora.rank,
        alpha=mg.lora.alpha,
        projections=list(mg.lora.projections),
        prompt_template=zs.prompt_template,
        joiner=zs.joiner,
        flow_matching=loss.flow_matching,
        focal=loss.focal,
        dice=loss.dice,
        mask_weight=loss.mask_weight,
        focal_alpha=loss.focal_alpha,
        focal_gamma=loss.focal_gamma,
        pairing=mg.pairing,
        objective=OmegaConf.to_container(mg.objective, resolve=True),
        lr=mg.train.lr,
        weight_decay=mg.train.weight_decay,
        gradient_checkpointing=mg.train.gradient_checkpointing,
        eval_seed=cfg.seed,
        text_cache=mg.train.text_cache,
    )


def target_key(dataset: DatasetDescription, targets: Path | None) -> dict:
    return {"ground_truth": dataset.key()} if targets is None else {"folder": targets.name}


def magnet_key(cfg: DictConfig, dataset: DatasetDescription, backbone, targets: Path | None) -> dict:
    """What a MAGNET adapter depends on: its targets, the data, the base model, the prompts, MAGNET's own settings
    and its training's precision (not the segmenter's), ranks and seed; how fast it reads or logs left out."""
    zs = cfg.zero_shot
    key = {
        "targets": target_key(dataset, targets),
        "data": dataset.key(),
        "diffusion": diffusion_key(cfg, backbone),
        "prompts": {"template": zs.prompt_template, "joiner": zs.joiner, "resolution": zs.resolution},
        "magnet": OmegaConf.to_container(cfg.magnet, resolve=True),
        "trainer": trainer_key(cfg, _precision(cfg)),
        "seed": cfg.seed,
    }
    for k in ("num_workers", "text_cache", "log_every"):
        key["magnet"]["train"].pop(k, None)
    return key


def run(cfg: DictConfig, dataset: DatasetDescription, targets: Path | None) -> Path:
    """Train MAGNET on the masks of ``targets`` (a step folder with ``train/masks``; None = the ground truth)."""
    if targets is not None and not (targets / "train" / "masks").is_dir():
        raise ConfigError(f"magnet targets {targets}: no train/masks folder; give a step folder or a mask set in its layout")
    backbone = build_backbone(cfg)
    if getattr(backbone, "lora", None):
        raise ConfigError(f"diffusion.lora={backbone.lora}: MAGNET trains adapters on the base model; set diffusion.lora=null")
    module = build_module(cfg, backbone)  # a clear error for a backbone without a training objective, before any work
    key = magnet_key(cfg, dataset, backbone, targets)
    inputs = [targets] if targets else []
    return STEP.run(cfg, key, inputs, lambda out, key, record: _train(cfg, dataset, module, targets, out, key, record))


def _loader(cfg, dataset: DatasetDescription, split: str, ids: list[str], targets: MaskSetLayout | None, shuffle: bool):
    mg = cfg.magnet
    size = mg.mask_size or cfg.zero_shot.resolution
    images = MaskTargetImages(dataset.prompted_images(split, ids, cfg.zero_shot.resolution), dataset, size, targets)
    batch = mg.train.batch_size
    workers = loader_workers(mg.train.num_workers, "magnet.train.num_workers")
    return DataLoader(images, batch_size=batch, shuffle=shuffle, num_workers=workers, collate_fn=collate_targets,
                      drop_last=shuffle and len(images) > batch, pin_memory=torch.cuda.is_available())  # fmt: skip


def _train(cfg, dataset: DatasetDescription, module: MagnetModule, targets: Path | None, out: Path, key: dict, record) -> None:
    mg = cfg.magnet
    layout = MaskSetLayout(targets / "train") if targets is not None else None
    train_ids = [sid for sid in dataset.split_ids("train") if layout is None or layout.is_done(sid)]
    if not train_ids:
        raise ConfigError(f"magnet: no training image has a target mask in {layout.masks if layout else 'the ground truth'}")
    train_loader = _loader(cfg, dataset, "train", train_ids, layout, shuffle=True)
    val_loader = None
    if "val" in cfg.stage0.splits and mg.train.val_images:
        val_ids = dataset.split_ids("val")[: mg.train.val_images]
        val_loader = _loader(cfg, dataset, "val", val_ids, None, shuffle=False)  # held out: its ground truth
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", save_last="link", save_top_k=1,
                                 every_n_train_steps=mg.train.checkpoint_every)  # fmt: skip
    loop = training_loop_settings(mg.train.log_every, "magnet.train.log_every", callbacks=[checkpoint])
    trainer = instantiate(
        cfg.trainer,
        max_steps=mg.train.max_steps,
        precision=_precision(cfg),
        accumulate_grad_batches=mg.train.accumulate_grad_batches,
        gradient_clip_val=mg.train.gradient_clip,
        logger=[CSVLogger(out, name="logs"), *record.lightning_loggers()],
        check_val_every_n_epoch=None,
        val_check_interval=mg.train.val_every if val_loader is not None else None,
        limit_val_batches=1.0 if val_loader is not None else 0,
        num_sanity_val_steps=0,
        default_root_dir=out,
        **loop,
    )
    resume = resume_checkpoint(out)
    if resume:
        log.info("magnet: resuming from %s", resume)
    run_lightning(trainer.fit, module, train_loader, val_loader, ckpt_path=str(resume) if resume else None)
    if trainer.interrupted or trainer.global_step < mg.train.max_steps:
        raise IncompleteStageError(
            f"magnet: training stopped at step {trainer.global_step} of {mg.train.max_steps}; run the same command "
            f"again to resume from {out / 'checkpoints' / 'last.ckpt'}"
        )
    held_out = {}
    if val_loader is not None:  # the same draw of noise and times for the base model and the adapted one
        for name, enabled in (("before", False), ("after", True)):
            with module.adapters(enabled):
                (metrics,) = run_lightning(trainer.validate, module, val_loader, verbose=False)
            held_out[name] = {k.removeprefix("val/"): float(v) for k, v in metrics.items()}
    distributed.on_main(lambda: save_adapter(module, out))

    def report() -> dict:
        if not held_out:
            return {}
        fm = {f"flow_matching_{k}": v["flow_matching"] for k, v in held_out.items()}
        fm["flow_matching_change"] = fm["flow_matching_after"] / fm["flow_matching_before"] - 1
        return {"val": {"images": len(val_loader.dataset), "metrics": {**fm, "before": held_out["before"],
                                                                        "after": held_out["after"]}}}  # fmt: skip

    evaluate_and_finish(out, key, report, steps=trainer.global_step, targets=str(targets) if targets else "ground_truth")
    if held_out:
        log.info("magnet: held-out flow-matching loss %.4f (base) -> %.4f (adapted); mask dice %.3f -> %.3f",
                 held_out["before"]["flow_matching"], held_out["after"]["flow_matching"],
                 held_out["before"]["mask_dice"], held_out["after"]["mask_dice"])  # fmt: skip
        record.log_metrics({f"magnet/{k}_{n}": v for n, m in held_out.items() for k, v in m.items()})


def _precision(cfg: DictConfig) -> str:
    return training_precision(cfg, cfg.magnet.train.precision)


def save_adapter(module: MagnetModule, out: Path) -> Path:
    """Write the adapter into ``out/adapter`` in the diffusers LoRA format, atomically (a temporary folder, renamed)."""
    tmp = out / temporary_name(ADAPTER)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.lora_state_dict().items()}
    module.backbone.save_lora(tmp, state, module.lora_metadata())
    final = out / ADAPTER
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    log.info("magnet: adapter (%d tensors) written to %s", len(state), final / LORA_FILE)
    return final


def targets_of(cfg: DictConfig, steps: dict[str, Path]) -> Path | None:
    """The folder ``magnet.targets`` names among the run's latest steps (``stage0``, ``refined``, ``deeplab``), or a
    folder given by path; None for the ground truth."""
    choice = str(cfg.magnet.targets)
    if choice == "ground_truth":
        return None
    if choice in STEP_TARGETS:
        return steps[{"refined": "refined", "stage0": "stage0", "segmenter": "deeplab"}[choice]]
    folder = Path(choice).expanduser()
    if not (folder / "train" / "masks").is_dir():
        raise ConfigError(
            f"magnet.targets={choice}: use refined, stage0, segmenter, ground_truth, or a folder holding train/masks/<id>.png"
        )
    return folder


def run_stage(cfg: DictConfig, dataset: DatasetDescription) -> Path:
    """``stage=magnet``: stage 0, its refinement (and DeepLabV3+ for ``targets=segmenter``), then MAGNET."""
    steps: dict[str, Path] = {}
    if cfg.magnet.targets in STEP_TARGETS:
        steps["stage0"] = stage0.run(cfg, dataset)
        steps["refined"] = refinement.run(cfg, dataset, steps["stage0"])
        if cfg.magnet.targets == "segmenter":
            steps["deeplab"] = deeplab.run(cfg, dataset, steps["refined"])
    return run(cfg, dataset, targets_of(cfg, steps))


def check_targets(value: object) -> None:
    """``magnet.targets`` without a model: one of the names or an existing folder."""
    choice = str(value)
    if choice not in (*STEP_TARGETS, "ground_truth") and not (Path(choice).expanduser() / "train" / "masks").is_dir():
        raise ConfigError(
            f"magnet.targets={choice}: use refined, stage0, segmenter, ground_truth, or a folder holding train/masks/<id>.png"
        )
