"""Analyses of a backbone's attention maps, on any backbone and dataset config.

    python -m stableseg_pp.analyze layers diffusion=miniature_mmdit
    python -m stableseg_pp.analyze layers diffusion=sd3_medium diffusion.pretrained=/models/sd3-medium \\
        data=voc paths.data_dir=/data analyze.images=300

``layers``: the mIoU of each attention site alone and of each head alone on
the first ``analyze.images`` images of ``analyze.split`` (the grounding-expert
analysis of Seg4Diff, docs/analysis.md). It runs stage 0 on those images with
every head's maps stored (one diffusion forward per image for all sites and
heads; content-addressed and resumable like every step), then scores the
stored maps. The ``key=value`` overrides are ``fit``'s.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from stableseg_pp.config import compose_checked
from stableseg_pp.runtime import distributed
from stableseg_pp.runtime.errors import ConfigError, report_errors

log = logging.getLogger("stableseg_pp.analyze")

# analysis name -> the step module (``run(cfg, dataset, stage0_folder) -> folder``) run on stage 0's outputs; imported
# when it runs, so that --help does not wait for torch
ANALYSES: dict[str, str] = {"layers": "stableseg_pp.stages.layers"}


def analysis_config(overrides: list[str]) -> DictConfig:
    """fit's config with ``overrides``, set up for stage 0 on the analysed images with every head's maps stored."""
    cfg = compose_checked(overrides)
    split, images = cfg.analyze.split, cfg.analyze.images
    if split not in ("train", "val"):
        raise ConfigError(f"analyze.split={split}: use train or val")
    if images is not None and (isinstance(images, bool) or not isinstance(images, int) or images < 1):
        raise ConfigError(f"analyze.images={images}: give a number of images (>= 1) or null for the whole split")
    cfg.stage = 0
    cfg.stage0.splits = [split]
    cfg.zero_shot.store_head_maps = True
    if images is not None:
        cfg.data.limit = min(images, cfg.data.limit or images)
    return cfg


def run(name: str, cfg: DictConfig) -> Path:
    """Stage 0 on the analysed images (reused when finished), then the analysis; returns its folder."""
    from stableseg_pp import tracking
    from stableseg_pp.fit import build_tracker, start_run
    from stableseg_pp.stages import stage0

    analysis = importlib.import_module(ANALYSES[name])
    try:
        dataset = start_run(cfg)
        with tracking.activate(build_tracker(cfg), OmegaConf.to_container(cfg, resolve=True)):
            out = analysis.run(cfg, dataset, stage0.run(cfg, dataset))
        log.info("%s analysis: %s", name, out)
        return out
    finally:
        distributed.teardown()


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(
        prog="python -m stableseg_pp.analyze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("analysis", choices=sorted(ANALYSES), help="what to analyse")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (as for fit)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    debug = args.debug or os.environ.get("HYDRA_FULL_ERROR") == "1"
    return report_errors(lambda: run(args.analysis, analysis_config(args.overrides)), debug, "--debug", "stableseg_pp.analyze")


if __name__ == "__main__":
    main()
