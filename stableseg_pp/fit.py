"""Run the pipeline: ``python -m stableseg_pp.fit [stage=0|1|2|magnet|all] [group=option ...] [key=value ...]``.

``stage`` is a plain config value (not a config group); the registry in
:mod:`stableseg_pp.stages` maps it to the stage functions to run.

Several devices: every rank runs this whole script. Under ``srun`` or
``torchrun`` the launcher starts the ranks; ``trainer.devices=N`` on one
machine without a launcher restarts this command under ``torchrun``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from stableseg_pp.config import CONFIG_DIR, build, compose_checked, config_groups
from stableseg_pp.runtime import distributed
from stableseg_pp.runtime.errors import USAGE_EXIT, ConfigError, report_errors

if TYPE_CHECKING:  # the modules that import torch, Lightning and diffusers load when a run starts, not for --help
    from stableseg_pp import tracking
    from stableseg_pp.data.description import DatasetDescription

log = logging.getLogger(__name__)

# Each rank logs to its own folder: ${paths.run_dir}/hydra/rank<r>
OmegaConf.register_new_resolver("global_rank", distributed.env_rank, replace=True)


def build_tracker(cfg: DictConfig) -> tracking.Tracker:
    """The configured tracker on rank 0; the other ranks record nothing."""
    from hydra.utils import instantiate

    from stableseg_pp import tracking

    if not distributed.is_main() or not cfg.get("logger"):
        return tracking.NoTracker()
    return instantiate(cfg.logger)


def require_launcher(cfg: DictConfig) -> None:
    """Several devices need one process each, started by a launcher; a clear error otherwise."""
    n = distributed.configured_world_size(cfg.trainer)
    if n > 1 and distributed.launched_environment() is None:
        raise ConfigError(
            f"trainer.devices x trainer.num_nodes = {n} ranks, but this is a single process: start one process per "
            "device with srun (python -m stableseg_pp.launch.slurm) or torchrun (torchrun --nproc_per_node=N -m "
            "stableseg_pp.fit ...); "
            "on one machine `python -m stableseg_pp.fit trainer.devices=N` does it for you. See docs/cluster.md"
        )


def check_devices(cfg: DictConfig) -> None:
    """GPUs asked for must be there: checked before any rank is started or model loaded."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator not in ("gpu", "cuda"):
        return
    import torch

    available = torch.cuda.device_count()
    devices = cfg.trainer.get("devices", 1)
    wanted = len(devices) if OmegaConf.is_list(devices) else (available if str(devices) in ("auto", "-1") else int(devices))
    if available == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator}, but this machine has no GPU that PyTorch can use: "
            "run on a GPU machine, or use trainer=cpu (or trainer.accelerator=cpu)"
        )
    if wanted > available:
        raise ConfigError(f"trainer.devices={devices}, but this machine has {available} GPU(s): ask for at most {available}")


def check_writable(cfg: DictConfig) -> None:
    """The run folder must be writable before any work starts: it is created (Hydra would create it next) and a
    file is written into it and removed, so read-only mounts, immutable folders and root squash all show here."""
    folder = Path(cfg.paths.run_dir).resolve()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    advice = "set paths.root_dir (or STABLESEG_HOME) to a folder you can write"
    if not existing.is_dir():
        raise ConfigError(f"cannot write the run folder {folder}: {existing} is a file, not a folder; {advice}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"cannot write the run folder {folder}: {reason} ({err.filename or existing}); {advice}") from err


def check_settings(cfg: DictConfig) -> None:
    """Everything that can be checked before a rank starts or a model loads (a clear one-line error otherwise)."""
    from stableseg_pp.runtime.progress import check_log_every
    from stableseg_pp.stages import check_segmenter, check_stage_splits, magnet, refinement, resolve_stages, weights
    from stableseg_pp.stages.emerdiff import check_emerdiff_settings
    from stableseg_pp.stages.stage0 import check_zero_shot_settings

    check_stage_splits(cfg.stage, list(cfg.stage0.splits))
    check_segmenter(cfg.stage, cfg.stage0.get("segmenter", "stableseg"))
    refinement.check_refine(cfg.get("refine", "crf"))
    check_emerdiff_settings(cfg, refines=resolve_stages(cfg.stage) != ["0"])
    check_devices(cfg)
    check_writable(cfg)
    check_zero_shot_settings(cfg)
    check_log_every(cfg.segmenter.train.log_every, "segmenter.train.log_every")
    check_log_every(cfg.magnet.train.log_every, "magnet.train.log_every")
    if "magnet" in resolve_stages(cfg.stage) or cfg.self_training.get("magnet"):
        magnet.check_targets(cfg.magnet.targets)
        if cfg.data.get("labels") == "predicted":
            raise ConfigError(
                "data.labels=predicted: MAGNET prompts with each image's classes and does not read predicted labels "
                "yet; train MAGNET with data.labels=oracle or all, or run stage 0-2 without it"
            )
    if cfg.data.get("labels") == "predicted":
        build(cfg.labeler)  # the labeler's constructor checks its settings before any work
    if "2" in resolve_stages(cfg.stage) and int(cfg.self_training.rounds) > 1:
        weights.check_background(cfg)


def start_run(cfg: DictConfig) -> DatasetDescription:
    """What every rank does before the first step: the checks, the process group, the seed, the dataset description."""
    import lightning as L

    from stableseg_pp.data.description import describe_dataset
    from stableseg_pp.runtime.progress import quiet_lightning_tips
    from stableseg_pp.stages.stage0 import check_backbone_available, check_backbone_settings

    quiet_lightning_tips()
    check_settings(cfg)
    check_backbone_available(cfg)  # before the dataset is written or described
    require_launcher(cfg)
    distributed.setup(cfg.trainer.accelerator)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with distributed.main_first():  # rank 0 writes the miniature world on first use; the others then read it
        dataset = describe_dataset(cfg.data, list(cfg.stage0.splits))
    check_backbone_settings(cfg, dataset)
    return dataset


def run(cfg: DictConfig) -> dict[str, Path]:
    """Run the configured stage(s); returns each stage's output folder. Every rank calls it."""
    from stableseg_pp import tracking
    from stableseg_pp.runtime.pipeline_progress import PROGRESS
    from stableseg_pp.stages import STAGES, planned_steps, resolve_stages

    stages = resolve_stages(cfg.stage)
    dataset = start_run(cfg)
    outputs = {}
    PROGRESS.plan(planned_steps(cfg))
    with tracking.activate(build_tracker(cfg), OmegaConf.to_container(cfg, resolve=True)):
        for key in stages:
            log.info("running stage %s", key)
            outputs[key] = STAGES[key](cfg, dataset)
            log.info("stage %s outputs: %s", key, outputs[key])
    PROGRESS.finish()
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


def run_command(cfg: DictConfig) -> None:
    """What ``python -m stableseg_pp.fit`` does: checks, then this process's ranks or the run itself."""
    from stableseg_pp.data.description import describe_dataset
    from stableseg_pp.stages.stage0 import check_backbone_settings

    n = distributed.configured_world_size(cfg.trainer)
    if n > 1 and distributed.launched_environment() is None and int(cfg.trainer.get("num_nodes", 1)) == 1:
        check_settings(cfg)  # before torchrun starts ranks that would all fail the same way
        check_backbone_settings(cfg, describe_dataset(cfg.data, list(cfg.stage0.splits)))
        code = relaunch_under_torchrun(n)
        if code:
            raise RankFailure(f"{n} ranks under torchrun: a rank failed (exit code {code}); its error is printed above")
        return
    try:
        run(cfg)
    finally:
        distributed.teardown()


class RankFailure(RuntimeError):
    """A rank started by the torchrun relaunch failed; it has printed its own one-line error."""


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="fit")
def main(cfg: DictConfig) -> None:
    # one line per known error (exit 2), one line per failure (exit 1); HYDRA_FULL_ERROR=1 gives the traceback
    debug = os.environ.get("HYDRA_FULL_ERROR") == "1"
    report_errors(lambda: run_command(cfg), debug, "HYDRA_FULL_ERROR=1", "stableseg_pp.fit")


def overrides_with_config_dir(args: list[str]) -> list[str] | None:
    """The overrides of a command line, ``--config-dir DIR`` (``-cd``) as the search path entry it adds; None when
    the line has another of Hydra's flags."""
    overrides, rest = [], list(args)
    while rest:
        arg = rest.pop(0)
        if arg in ("--config-dir", "-cd") and rest:
            overrides.append(f"hydra.searchpath=[file://{Path(rest.pop(0)).resolve()}]")
        elif arg.startswith("--config-dir="):
            overrides.append(f"hydra.searchpath=[file://{Path(arg.split('=', 1)[1]).resolve()}]")
        elif arg.startswith("-"):
            return None
        else:
            overrides.append(arg)
    return overrides


def check_overrides(args: list[str]) -> None:
    """Compose the config once before Hydra does, so that a bad override (an unknown config group option, a key
    that does not exist, a value that does not parse) is one line with exit code 2 like every other user error,
    and check that the run folder can be written (Hydra creates its log folder in it before the run starts)."""
    overrides = overrides_with_config_dir(args)
    if overrides is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return  # Hydra's other flags (--cfg, -m, --help): Hydra composes and reports
    try:
        check_writable(compose_checked(overrides))
    except ConfigError as err:
        print(f"stableseg_pp.fit: error: {err}", file=sys.stderr)
        sys.exit(USAGE_EXIT)


HELP = """Examples:
  python -m stableseg_pp.fit                                   # the whole pipeline on the miniature world (CPU)
  python -m stableseg_pp.fit stage=0 debug=fast                # StableSeg pseudo-masks of a few images
  python -m stableseg_pp.fit experiment=voc_stableseg_pp paths.data_dir=/data
  python -m stableseg_pp.fit --config-dir my_configs data=my_shapes

Config groups (group=option):
{groups}

The composed config: --cfg job; Hydra's own help: --hydra-help. Docs: docs/guide.md, docs/configs.md."""


def print_help(args: list[str]) -> None:
    """``fit --help``: what to run, the config groups and their choices (bases such as ``data/common`` left out)."""
    overrides = overrides_with_config_dir([a for a in args if a not in ("--help", "-h")]) or []
    folders = [o.split("file://", 1)[1].rstrip("]") for o in overrides if o.startswith("hydra.searchpath=")]
    groups = "\n".join(f"  {group}: {', '.join(options)}" for group, options in config_groups(folders).items())
    print(__doc__.strip() + "\n\n" + HELP.format(groups=groups))


if __name__ == "__main__":
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        print_help(sys.argv[1:])
        sys.exit(0)
    check_overrides(sys.argv[1:])
    main()
