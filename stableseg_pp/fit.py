"""Hydra entry point: ``python -m stableseg_pp.fit stage=0``.

``stage`` is a plain config value (not a config group); the registry in
:mod:`stableseg_pp.stages` maps it to the stage functions to run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from stableseg_pp.stages import STAGES, resolve_stages

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def run(cfg: DictConfig) -> dict[str, Path]:
    """Run the configured stage(s); returns each stage's output folder."""
    stages = resolve_stages(cfg.stage)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    outputs = {}
    for key in stages:
        log.info("running stage %s", key)
        outputs[key] = STAGES[key](cfg)
        log.info("stage %s outputs: %s", key, outputs[key])
    return outputs


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="fit")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
