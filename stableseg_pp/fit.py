"""Hydra entry point: ``python -m stableseg_pp.fit stage=0``.

``stage`` is a plain config value (not a config group); the registry in
:mod:`stableseg_pp.stages` maps it to the stage functions to run.

Several devices: every rank runs this whole script. Under ``srun`` or
``torchrun`` the launcher starts the ranks; ``trainer.devices=N`` on one
machine without a launcher restarts this command under ``torchrun``.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from stableseg_pp import tracking
from stableseg_pp.config import CONFIG_DIR
from stableseg_pp.data.description import describe_dataset
from stableseg_pp.runtime import distributed
from stableseg_pp.stages import STAGES, resolve_stages

log = logging.getLogger(__name__)

# Each rank logs to its own folder: ${paths.run_dir}/hydra/rank<r>
OmegaConf.register_new_resolver("global_rank", distributed.env_rank, replace=True)


def world_size_of(cfg: DictConfig) -> int:
    return distributed.configured_world_size(cfg.trainer)


def build_tracker(cfg: DictConfig) -> tracking.Tracker:
    """The configured tracker on rank 0; the other ranks record nothing."""
    if not distributed.is_main() or not cfg.get("logger"):
        return tracking.NoTracker()
    return instantiate(cfg.logger)


def require_launcher(cfg: DictConfig) -> None:
    """Several devices need one process each, started by a launcher; a clear error otherwise."""
    n = world_size_of(cfg)
    if n > 1 and distributed.launched_environment() is None:
        raise SystemExit(
            f"trainer.devices x trainer.num_nodes = {n} ranks, but this is a single process: start one process per "
            "device with srun (python -m stableseg_pp.launch.slurm) or torchrun (stableseg_pp/launch/torchrun.sh); "
            "on one machine `python -m stableseg_pp.fit trainer.devices=N` does it for you. See docs/cluster.md"
        )


def run(cfg: DictConfig) -> dict[str, Path]:
    """Run the configured stage(s); returns each stage's output folder. Every rank calls it."""
    stages = resolve_stages(cfg.stage)
    require_launcher(cfg)
    distributed.setup(cfg.trainer.accelerator)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with distributed.main_first():  # rank 0 writes the miniature world on first use; the others then read it
        dataset = describe_dataset(cfg.data, list(cfg.zero_shot.splits))
    outputs = {}
    with tracking.activate(build_tracker(cfg), OmegaConf.to_container(cfg, resolve=True)):
        for key in stages:
            log.info("running stage %s", key)
            outputs[key] = STAGES[key](cfg, dataset)
            log.info("stage %s outputs: %s", key, outputs[key])
    return outputs


def relaunch_under_torchrun(n: int) -> int:
    """Start ``n`` ranks of this same command on this machine (Lightning then joins them, one device each)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    cmd += ["-m", "stableseg_pp.fit", *sys.argv[1:]]
    log.info("starting %d ranks: %s", n, " ".join(cmd))
    proc = subprocess.Popen(cmd)
    # torchrun stops its ranks on SIGTERM; pass ours on (Ctrl+C reaches it directly)
    signal.signal(signal.SIGTERM, lambda signum, _frame: proc.send_signal(signum))
    return proc.wait()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="fit")
def main(cfg: DictConfig) -> None:
    n = world_size_of(cfg)
    if n > 1 and distributed.launched_environment() is None and int(cfg.trainer.get("num_nodes", 1)) == 1:
        sys.exit(relaunch_under_torchrun(n))
    try:
        run(cfg)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
