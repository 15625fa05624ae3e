"""Learn one weight per stored attention map from a segmenter's predictions (StableSeg++ step 2).

Reads stage 0's per-layer class maps of the training images and the DeepLabV3+
predictions on them; needs no diffusion forward. Writes ``weights.json`` (layer
-> weight, usable as ``zero_shot.layer_weights``) and a bar plot.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from stableseg_pp import tracking
from stableseg_pp.attention.weights import MapExample, fit_map_weights
from stableseg_pp.data.datasets import split_ids
from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.pipeline import distributed
from stableseg_pp.pipeline.atomic import atomic_save
from stableseg_pp.pipeline.run_dir import open_stage, write_record
from stableseg_pp.pipeline.writers import PseudoMaskLayout, load_stored_maps, write_json
from stableseg_pp.stages import zero_shot
from stableseg_pp.tracking.base import StepRecord

log = logging.getLogger(__name__)
NAME = "weights"


def load_examples(stage0: PseudoMaskLayout, targets: PseudoMaskLayout, ids: list[str]) -> tuple[list[MapExample], list[str]]:
    """Stack each image's stored maps at the finest stored resolution; map the target to channels."""
    examples, layer_names = [], None
    for sid in ids:
        stored = load_stored_maps(stage0.maps_path(sid))
        if not stored.class_ids or not targets.is_done(sid):
            continue
        names = sorted(stored.cross_maps)
        if layer_names is None:
            layer_names = names
        elif names != layer_names:
            raise ValueError(f"{stage0.maps_path(sid)} stores layers {names}, others store {layer_names}")
        side = max(m.shape[-1] for m in stored.cross_maps.values())
        size = (max(m.shape[-2] for m in stored.cross_maps.values()), side)
        maps = torch.stack(
            [
                F.interpolate(torch.from_numpy(stored.cross_maps[n].astype(np.float32))[None], size=size, mode="bilinear")[0]
                for n in names
            ]
        )
        pred = np.array(Image.open(targets.mask_path(sid)))
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        lut[0] = 0
        for c, cid in enumerate(stored.class_ids):
            lut[cid] = c + 1
        channel = torch.from_numpy(lut[pred].astype(np.int64))[None, None].float()
        target = F.interpolate(channel, size=size, mode="nearest")[0, 0].long()
        examples.append(MapExample(maps=maps, target=target))
    return examples, layer_names or []


def plot_weights(weights: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(weights)
    short = [n.replace(".transformer_blocks.0.attn2.processor", "").replace("_blocks", "") for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names)), 3.2))
    ax.bar(range(len(names)), [weights[n] for n in names], color="#4477aa")
    ax.set_xticks(range(len(names)), short, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("learned weight")
    ax.set_title("attention-map weights (StableSeg++)")
    fig.tight_layout()
    atomic_save(path, lambda t: fig.savefig(t, format="png", dpi=120))
    plt.close(fig)


def run(cfg: DictConfig, stage0_dir: Path, segmenter_dir: Path) -> Path:
    key = {
        "stage": NAME,
        "maps": stage0_dir.name,
        "targets": segmenter_dir.name,
        "map_weights": OmegaConf.to_container(cfg.map_weights, resolve=True),
        "threshold": _threshold(cfg),
        "seed": cfg.seed,
    }
    out, finished = open_stage(cfg.paths.run_dir, NAME, key, cfg.force)
    if finished:
        return out
    with tracking.active().step(out, [stage0_dir, segmenter_dir], key) as record:
        # rank 0 learns the weights (a small fit without diffusion forwards); the others wait and read them
        distributed.on_main(lambda: _learn(cfg, stage0_dir, segmenter_dir, out, key, record))
    return out


def _learn(cfg: DictConfig, stage0_dir: Path, segmenter_dir: Path, out: Path, key: dict, record: StepRecord) -> None:
    ids = split_ids(cfg.data, "train")
    examples, names = load_examples(PseudoMaskLayout(stage0_dir / "train"), PseudoMaskLayout(segmenter_dir / "train"), ids)
    mw = cfg.map_weights
    model, history = fit_map_weights(examples, names, _threshold(cfg), mw.epochs, mw.lr, mw.batch_size, cfg.seed)
    weights = model.as_dict()
    write_json(out / "weights.json", weights)
    plot_weights(weights, out / "weights.png")
    log.info("weights: learned from %d images: %s", len(examples), json.dumps({k: round(v, 3) for k, v in weights.items()}))
    write_record(out, key, images=len(examples), loss=history)
    record.log_table("map_weights", [{"layer": k, "weight": v} for k, v in weights.items()])
    record.log_image("map_weights_plot", out / "weights.png")
    record.log_metrics({"fit/final_loss": history[-1]} if history else {})


def _threshold(cfg: DictConfig) -> float | None:
    """Stage 0's background threshold; None when the dataset has no background class."""
    return None if zero_shot.background_mode(cfg) == "none" else cfg.zero_shot.background_threshold


def load_weights(folder: Path) -> dict[str, float]:
    return json.loads((folder / "weights.json").read_text())
