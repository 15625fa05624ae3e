"""SLURM batch scripts: valid bash, the right nodes / tasks / GPUs, and a chain of dependent jobs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from stableseg_pp.launch import slurm

SHELL_SCRIPTS = [slurm.TEMPLATE, *sorted(Path(slurm.__file__).parent.glob("*.sh"))]


def sbatch_lines(text: str) -> dict[str, str]:
    lines = [ln.removeprefix("#SBATCH ").split("=", 1) for ln in text.splitlines() if ln.startswith("#SBATCH --")]
    return {k: v for k, v in (ln if len(ln) == 2 else (ln[0], "") for ln in lines)}


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_launch_scripts_are_valid_bash(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_rendered_job_has_one_task_and_gpu_per_device_on_every_node(tmp_path, monkeypatch):
    monkeypatch.setenv("STABLESEG_HOME", str(tmp_path))
    overrides = ["trainer.devices=4", "trainer.num_nodes=2", "launcher.partition=gpu", "launcher.time=02:00:00", "stage=all"]
    scripts = slurm.write_scripts(overrides, workdir=tmp_path)
    assert [s.name for s in scripts] == ["stage0.sbatch", "stage1.sbatch", "stage2.sbatch"]
    for stage, script in zip("012", scripts, strict=True):
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        opts = sbatch_lines(text)
        assert opts["--nodes"] == "2" and opts["--ntasks-per-node"] == "4" and opts["--gpus-per-node"] == "4"
        assert opts["--partition"] == "gpu" and opts["--time"] == "02:00:00"
        assert opts["--signal"].startswith("B:USR1@") and "--requeue" in opts
        assert "scontrol requeue" in text and "{{" not in text
        (srun,) = [ln for ln in text.splitlines() if ln.startswith("srun ")]
        assert f"stage={stage}" in srun and "stage=all" not in srun
        assert "trainer.devices=4 trainer.num_nodes=2" in srun and f"paths.root_dir={tmp_path}" in srun


def test_cpu_partition_asks_for_no_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("STABLESEG_HOME", str(tmp_path))
    (script,) = slurm.write_scripts(["trainer.devices=2", "launcher.gpus=false"], stages=["0"], workdir=tmp_path)
    opts = sbatch_lines(script.read_text())
    assert opts["--nodes"] == "1" and opts["--ntasks-per-node"] == "2" and "--gpus-per-node" not in opts


def test_stages_are_submitted_as_a_chain_of_afterok_jobs(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "sbatch"  # records its arguments, answers like `sbatch --parsable`
    fake.write_text(f'#!/bin/bash\necho "$@" >> {calls}\necho "$((1000 + $(wc -l < {calls})));cluster"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("STABLESEG_HOME", str(tmp_path))
    slurm.main(["--submit", "trainer.devices=2"])
    lines = calls.read_text().splitlines()
    assert len(lines) == 3
    assert "--dependency" not in lines[0] and lines[0].endswith("stage0.sbatch")
    assert "--dependency=afterok:1001" in lines[1] and lines[1].endswith("stage1.sbatch")
    assert "--dependency=afterok:1002" in lines[2] and lines[2].endswith("stage2.sbatch")
