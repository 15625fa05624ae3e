"""One shape for every pipeline step, and what the steps share (the configured backbone, its key, the device).

A step is content-addressed: its folder is ``<name>-<hash of its key>``, where
``name`` is also its module under ``stages/`` and its kind in the trackers. The
runner does what every step does around its own computation: claim the folder
(lock, resume or skip when finished), record the step in the tracker, and hand
the folder on. A step's key holds what that step itself consumes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from stableseg_pp import tracking
from stableseg_pp.backbones.base import DiffusionBackbone
from stableseg_pp.config import build
from stableseg_pp.runtime.run_dir import open_stage
from stableseg_pp.tracking.base import StepRecord

# compute(out, key, record): the step's own work in its (claimed, unfinished) folder; ends with its completion record
Compute = Callable[[Path, dict, StepRecord], None]


@dataclass(frozen=True)
class Step:
    """A content-addressed step of the pipeline.

    Args:
        name: the folder prefix (``<name>-<hash>``), the step's module under ``stages/`` and its tracker kind.
    """

    name: str

    def run(self, cfg: DictConfig, key: Mapping[str, Any], inputs: Sequence[Path], compute: Compute) -> Path:
        """The step's folder for ``key`` (``inputs``: the step folders it reads, for lineage), computed unless a
        finished one exists; every rank calls it."""
        key = {"stage": self.name, **key}
        with open_stage(cfg.paths.run_dir, self.name, key, cfg.force) as (out, finished):
            if finished:
                return out
            with tracking.active().step(out, list(inputs), key) as record:
                compute(out, key, record)
        return out


def method_settings(node: DictConfig) -> dict:
    """A method's config node as its settings (what its content key holds): the node without Hydra's own keys
    (``_target_``, ``_partial_``, ``_convert_``)."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not (k.startswith("_") and k.endswith("_"))}


def on_gpu(cfg: DictConfig) -> bool:
    """Whether the trainer runs on GPUs (``gpu``/``cuda``, or ``auto`` on a machine that has one)."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def this_device(cfg: DictConfig) -> torch.device:
    """This rank's device, for a step that runs a model outside a Lightning loop."""
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu(cfg) else torch.device("cpu")


def load_on_device(cfg: DictConfig, backbone: DiffusionBackbone) -> torch.device:
    """Load ``backbone`` on this rank's device, for a step that runs it outside a Lightning loop; returns the device."""
    device = this_device(cfg)
    backbone.load()
    for module in backbone.modules().values():
        module.to(device)
    return device


def build_backbone(cfg: DictConfig, adapter: Path | None = None) -> DiffusionBackbone:
    """The configured backbone (``diffusion._target_``), not loaded yet; ``adapter``: a LoRA (e.g. a MAGNET step
    folder) that replaces ``diffusion.lora``."""
    return build(cfg.diffusion, _convert_="all", **({"lora": str(adapter)} if adapter is not None else {}))


def diffusion_key(cfg: DictConfig, backbone: DiffusionBackbone) -> dict:
    """What the backbone contributes to a content key: its settings and the identity of its weights (and adapter)."""
    diffusion = OmegaConf.to_container(cfg.diffusion, resolve=True)
    for k in ("_target_", "name", "pretrained", "dtype", "lora"):  # the identity says what the weights are
        diffusion.pop(k, None)
    return {**diffusion, **backbone.identity()}
