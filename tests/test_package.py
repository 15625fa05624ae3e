"""The package installs without the checkout: a wheel (not editable) runs `fit` from any directory,
and users add config groups from their own folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from stableseg_pp.config import compose_config

REPO = Path(__file__).resolve().parent.parent
TOP_LEVEL_SKIP = {".venv", ".git", "outputs", "data", "build", "wandb", ".whl", ".gl"}


def _skip(folder: str, names: list[str]) -> set[str]:
    """What a source distribution leaves out: run outputs and environments at the top, caches anywhere."""
    skip = {n for n in names if n == "__pycache__" or n.endswith((".egg-info", "_cache"))}
    return skip | (TOP_LEVEL_SKIP & set(names) if Path(folder) == REPO else set())


def _user_config_dir(root: Path) -> Path:
    """A user's own config folder adding the data group `my_shapes` (the miniature world under another name)."""
    folder = root / "my_configs" / "data"
    folder.mkdir(parents=True)
    (folder / "my_shapes.yaml").write_text("defaults:\n  - miniature\nname: my_shapes\nlimit: 3\n")
    return root / "my_configs"


@pytest.mark.slow
def test_wheel_installs_and_runs_from_any_directory(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_skip)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True)
    (wheel,) = wheels.glob("stableseg_pp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # configs/ and launch/ stand at the top of the checkout and ship inside the package
    assert (REPO / "configs" / "fit.yaml").exists() and not (REPO / "stableseg_pp" / "configs").exists()
    assert "stableseg_pp/configs/fit.yaml" in names and "stableseg_pp/launch/templates/stage.sbatch" in names
    assert "stableseg_pp/configs/experiment/voc_stableseg_pp.yaml" in names and "stableseg_pp/launch/slurm.py" in names
    assert any(n.startswith("stableseg_pp/assets/miniature_sd/") for n in names)
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "STABLESEG_HOME": str(work)}
    env.pop("PYTHONSAFEPATH", None)
    where = subprocess.run(
        [sys.executable, "-c", "import stableseg_pp; print(stableseg_pp.__file__)"], cwd=work, env=env,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(site))  # the installed copy, not the checkout
    done = subprocess.run(
        [sys.executable, "-m", "stableseg_pp.fit", "stage=0", "debug=fast", "trainer.accelerator=cpu"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (stage0,) = (work / "outputs" / "debug-miniature").glob("stage0-*")
    metrics = json.loads((stage0 / "metrics.json").read_text())
    assert metrics["val"]["images"] == 8 and 0 < metrics["val"]["miou"] <= 1

    # a user's own config group, added with --config-dir, composes with the shipped ones
    user = _user_config_dir(tmp_path)
    shown = subprocess.run(
        [sys.executable, "-m", "stableseg_pp.fit", "--config-dir", str(user), "data=my_shapes", "--cfg", "job"],
        cwd=work, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "name: my_shapes" in shown.stdout and "limit: 3" in shown.stdout


def test_user_config_folder_through_the_search_path(tmp_path):
    user = _user_config_dir(tmp_path)
    cfg = compose_config([f"hydra.searchpath=[file://{user}]", "data=my_shapes"])
    assert cfg.data.name == "my_shapes" and cfg.data.limit == 3 and cfg.data.generate.n_train == 400
    assert cfg.run_name == "my_shapes-miniature_sd"
