"""Learn one weight per stored attention map from a segmenter's predictions (StableSeg++ step 2).

Reads stage 0's per-site class maps of the training images and the DeepLabV3+
predictions on them; needs no diffusion forward. Writes ``weights.json`` (the
backbone family and site id -> weight; stage 2 passes it to the regenerated
stage 0, ``stage0.site_weights=<folder>`` uses it by hand) and a bar plot.
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

from stableseg_pp.artifacts import ChannelClasses, MaskSetLayout, SiteWeights, load_stored_maps
from stableseg_pp.backbones.base import parse_map_id
from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.evaluation.site_plots import plot_site_bars, plot_site_heads
from stableseg_pp.methods.background import background_rule
from stableseg_pp.methods.map_weights import MapExample, fit_map_weights
from stableseg_pp.runtime import distributed
from stableseg_pp.runtime.errors import ConfigError
from stableseg_pp.runtime.run_dir import write_record
from stableseg_pp.stages.step import Step
from stableseg_pp.tracking.base import StepRecord

log = logging.getLogger(__name__)
STEP = Step("weights")


def load_examples(
    dataset: DatasetDescription, stage0: MaskSetLayout, targets: MaskSetLayout, ids: list[str], per_head: bool = False
) -> tuple[list[MapExample], list[str], str | None]:
    """Stack each image's stored maps at the finest stored resolution; map the target to channels.

    ``per_head``: the per-head maps (one weight per site and head) instead of the sites' head-mean maps.
    Returns the examples, the map ids (sorted) and the backbone family that stored them.
    """
    examples, site_ids, family = [], None, None
    for sid in ids:
        if not stage0.is_done(sid) or not targets.is_done(sid):  # a picture stage 0 skipped (data.on_bad_input=skip)
            continue
        stored = load_stored_maps(stage0.maps_path(sid))
        if not stored.class_ids:
            continue
        names = sorted(n for n in stored.site_maps if (parse_map_id(n)[1] is not None) == per_head)
        if not names:
            raise ConfigError(
                f"{stage0.maps_path(sid)} stores no {'per-head' if per_head else 'per-site'} class maps: stage 0 stores "
                "per-head maps with zero_shot.store_head_maps=true (map_weights.per_head=true sets it for the whole run)"
            )
        if site_ids is None:
            site_ids, family = names, stored.family
        elif names != site_ids or stored.family != family:
            raise ValueError(
                f"{stage0.maps_path(sid)} stores sites {names} of a {stored.family!r} backbone, "
                f"others store {site_ids} of a {family!r} one: the stage-0 folder mixes two backbones"
            )
        side = max(stored.site_maps[n].shape[-1] for n in names)
        size = (max(stored.site_maps[n].shape[-2] for n in names), side)
        maps = torch.stack(
            [
                F.interpolate(torch.from_numpy(stored.site_maps[n].astype(np.float32))[None], size=size, mode="bilinear")[0]
                for n in names
            ]
        )
        pred = np.array(Image.open(targets.mask_path(sid)))
        channels = ChannelClasses(tuple(stored.class_ids), dataset.background_index)
        channel = torch.from_numpy(channels.to_channels(pred).astype(np.int64))[None, None].float()
        target = F.interpolate(channel, size=size, mode="nearest")[0, 0].long()
        examples.append(MapExample(maps=maps, target=target))
    return examples, site_ids or [], family


def plot_weights(weights: dict[str, float], path: Path) -> None:
    """A bar per site, or (per-head weights) a site x head heat map."""
    if any(parse_map_id(n)[1] is not None for n in weights):
        plot_site_heads(weights, path, "learned weight", "attention-map weights per head (StableSeg++)", "{:.3f}")
    else:
        plot_site_bars(weights, path, "learned weight", "attention-map weights (StableSeg++)")


def check_background(cfg: DictConfig) -> None:
    """The map weights are fitted with stage 0's constant background channel; ``zero_shot.background=word`` has
    none (the word is a channel of its own), so stage 2 would learn weights for a rule stage 0 never applies: refused
    before any weights load (a dataset without background class has no background rule at all, and is fine)."""
    has_background = cfg.data.get("background_index") is not None
    background_rule(cfg.zero_shot, has_background).require_constant(
        "stage 2 learns attention-map weights", ", or stop at stage=1"
    )


def run(cfg: DictConfig, dataset: DatasetDescription, stage0_dir: Path, segmenter_dir: Path) -> Path:
    key = {
        "maps": stage0_dir.name,
        "targets": segmenter_dir.name,
        "map_weights": OmegaConf.to_container(cfg.map_weights, resolve=True),
        "threshold": background_rule(cfg.zero_shot, dataset.has_background).constant,
        "seed": cfg.seed,
    }

    def compute(out: Path, key: dict, record: StepRecord) -> None:
        # rank 0 learns the weights (a small fit without diffusion forwards); the others wait and read them
        distributed.on_main(lambda: _learn(cfg, dataset, stage0_dir, segmenter_dir, out, key, record))

    return STEP.run(cfg, key, [stage0_dir, segmenter_dir], compute)


def _learn(
    cfg: DictConfig,
    dataset: DatasetDescription,
    stage0_dir: Path,
    segmenter_dir: Path,
    out: Path,
    key: dict,
    record: StepRecord,
) -> None:
    ids = dataset.split_ids("train")
    examples, names, family = load_examples(
        dataset, MaskSetLayout(stage0_dir / "train"), MaskSetLayout(segmenter_dir / "train"), ids, cfg.map_weights.per_head
    )
    mw = cfg.map_weights
    rule = background_rule(cfg.zero_shot, dataset.has_background)
    model, history = fit_map_weights(examples, names, rule, mw.epochs, mw.lr, mw.batch_size, cfg.seed)
    learned = SiteWeights(family=family or "unknown", weights=model.as_dict())
    learned.save(out)
    plot_weights(dict(learned.weights), out / "weights.png")
    rounded = {k: round(v, 3) for k, v in learned.weights.items()}
    log.info("weights: learned from %d images: %s", len(examples), json.dumps(rounded))
    write_record(out, key, images=len(examples), loss=history)
    record.log_table("map_weights", [{"site": k, "weight": v} for k, v in learned.weights.items()])
    record.log_image("map_weights_plot", out / "weights.png")
    record.log_metrics({"fit/final_loss": history[-1]} if history else {})
