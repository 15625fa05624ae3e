"""Write SLURM batch scripts for the pipeline stages and submit them as a chain of jobs.

``python -m stableseg_pp.launch.slurm [--submit] [--stages 0 1 2] <fit overrides>`` composes
the same config ``fit`` will, fills ``launch/templates/stage.sbatch`` once per stage (nodes =
``trainer.num_nodes``, one task and one GPU per ``trainer.devices``) into
``<run_dir>/slurm/stage<k>.sbatch`` and, with ``--submit``, queues them so that each stage
starts only when the one before ended well (``--dependency=afterok``). Each later stage finds
the earlier stages' finished folders and does not redo them.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from stableseg_pp.config import compose_config
from stableseg_pp.runtime.distributed import configured_world_size

TEMPLATE = Path(__file__).resolve().parent / "templates" / "stage.sbatch"


def stage_overrides(cfg: DictConfig, overrides: Sequence[str], stage: str) -> list[str]:
    """The job's ``fit`` overrides: the user's, this stage, and the data/output root pinned to an absolute path."""
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("stage=", "paths.root_dir="))]
    return [*keep, f"paths.root_dir={Path(cfg.paths.root_dir).resolve()}", f"stage={stage}"]


def render(cfg: DictConfig, stage: str, overrides: Sequence[str], workdir: Path, template: Path = TEMPLATE) -> str:
    """The batch script of one stage."""
    launcher = cfg.launcher
    nodes = int(cfg.trainer.num_nodes)
    tasks = configured_world_size(cfg.trainer) // nodes
    options = [f"--gpus-per-node={tasks}"] if launcher.gpus else []
    for name in ("partition", "account", "qos", "mem"):
        if launcher.get(name):
            options.append(f"--{name}={launcher[name]}")
    options += list(launcher.sbatch_options)
    fields = {
        "job_name": f"{launcher.job_name}-stage{stage}",
        "nodes": str(nodes),
        "tasks_per_node": str(tasks),
        "cpus_per_task": str(launcher.cpus_per_task),
        "time": str(launcher.time),
        "log_dir": str(Path(launcher.log_dir).resolve()),
        "signal_grace_s": str(launcher.signal_grace_s),
        "sbatch_options": "\n".join(f"#SBATCH {o}" for o in options),
        "workdir": shlex.quote(str(workdir)),
        "setup": "\n".join(launcher.setup),
        "overrides": " ".join(shlex.quote(o) for o in stage_overrides(cfg, overrides, stage)),
    }
    text = template.read_text()
    for name, value in fields.items():
        text = text.replace("{{" + name + "}}", value)
    if left := re.findall(r"\{\{\w+\}\}", text):
        raise ValueError(f"{template}: no value for {sorted(set(left))}")
    return text


def write_scripts(overrides: Sequence[str], stages: Sequence[str] | None = None, workdir: Path | None = None) -> list[Path]:
    from stableseg_pp.stages import stage_chain  # the stage registry imports torch: not needed for --help

    cfg = compose_config(overrides)
    stages = [str(s) for s in (stages or cfg.launcher.get("stages") or stage_chain(cfg.stage))]
    log_dir = Path(cfg.launcher.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    scripts = []
    for stage in stages:
        path = log_dir / f"stage{stage}.sbatch"
        path.write_text(render(cfg, stage, overrides, (workdir or Path.cwd()).resolve()))
        scripts.append(path)
    return scripts


def submit_chain(scripts: Sequence[Path], sbatch: str = "sbatch") -> list[str]:
    """Queue the scripts in order, each after the previous one succeeded; returns the job ids."""
    ids: list[str] = []
    for script in scripts:
        cmd = [sbatch, "--parsable"] + ([f"--dependency=afterok:{ids[-1]}"] if ids else []) + [str(script)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
        ids.append(out.split(";")[0])  # --parsable prints "<id>[;<cluster>]"
        print(f"submitted {script.name}: job {ids[-1]}" + (f" (after {ids[-2]})" if len(ids) > 1 else ""))
    return ids


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stableseg_pp.launch.slurm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--submit", action="store_true", help="queue the scripts as a chain (afterok)")
    parser.add_argument("--dry-run", action="store_true", help="with --submit: write and print, do not queue")
    parser.add_argument("--stages", nargs="+", help="stages to chain (default: launcher.stages, else the chain of `stage`)")
    args, overrides = parser.parse_known_args(argv)
    scripts = write_scripts(overrides, args.stages)
    for s in scripts:
        print(f"wrote {s}")
    if args.submit and not args.dry_run:
        submit_chain(scripts)
    elif args.dry_run:
        print(scripts[0].read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
