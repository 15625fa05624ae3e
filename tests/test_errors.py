"""Known user errors give one line and exit code 2, never a traceback; one writer per step folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stableseg_pp.backbones.sd_unet import SDUNetBackbone
from stableseg_pp.data.files import DATA_HINT, BadInputError
from stableseg_pp.data.miniature import draw_sample
from stableseg_pp.runtime.cpus import loader_workers
from stableseg_pp.runtime.errors import ConfigError, one_line
from stableseg_pp.segment import main as segment_main
from stableseg_pp.stages import stage0
from stableseg_pp.stages.step import build_backbone
from tests.test_datasets import _voc_fixture_from_the_miniature_world


def _fit(tmp_path: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environ.update({"HF_HUB_OFFLINE": "1", "STABLESEG_HOME": str(tmp_path), **(env or {})})
    cmd = [sys.executable, "-m", "stableseg_pp.fit", "stage=0", "debug=fast", *overrides]
    return subprocess.run(cmd, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=300)


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("stableseg_pp.")]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage=3"], "stage=3 is not a stage"),
        (["zero_shot.mode=cross"], "zero_shot.mode=cross: use one of"),
        (["data.labels=some"], "data.labels=some: use oracle"),
        (["zero_shot.cross_scales=[7]"], r"zero_shot.cross_scales=[7]: map sides [7] do not exist"),
        (["zero_shot.resolution=100"], "zero_shot.resolution=100 must be a multiple of 16"),
        (
            ["diffusion=miniature_mmdit", "zero_shot.cross_depths=[9]"],
            "zero_shot.cross_depths=[9]: depths [9] do not exist for this backbone; available: [0, 1, 2, 3, 4]",
        ),
        (["diffusion.pretrained=/nope"], "diffusion.pretrained='/nope': no such folder"),
        (["diffusion.pretrained=someorg/somemodel"], "pre-fill the Hugging Face cache"),
        (["trainer.accelerator=gpu", "trainer.devices=2"], "trainer.accelerator=gpu, but this machine has no GPU"),
        (["segmenter.train.log_every=0"], "segmenter.train.log_every=0: the steps between logged values"),
        (["stage=2", "zero_shot.background=word"], "zero_shot.background=word: stage 2 learns attention-map weights"),
        (["zero_shot.splits=[val]"], "zero_shot.splits is now stage0.splits"),
        (["data.class_names=[background,circle,circle,star]"], "data.class_names names ['circle'] more than once"),
        (["data.class_names=[background]"], "data.class_names=['background']: no class to segment"),
        (["data.class_names=background"], "data.class_names='background' is not a list"),  # not its ten letters
        (["data.background_index=9"], "data.background_index=9: give the position of the background class"),
        (["emerdiff.clusters=5"], "emerdiff.clusters is now emerdiff_steps.clusters"),
        (["zero_shot.mode=sa+ca"], "zero_shot.mode=sa+ca: use one of ca, sa, ca+sa"),
        (["stage0.segmenter=emerdiff", "emerdiff.strength=-1"], "emerdiff.strength=-1: give lambda > 0"),
        (["paths.data_dir=/nonexistent", "data.generate=null"], "dataset folder /nonexistent/miniature does not exist"),
        (
            [
                "data.labels=all",
                "data.require_masks=false",
                f"data.class_names=[circle,'{' '.join(['word'] * 200)}']",  # one name longer than any prompt
                "data.background_index=null",
            ],
            "tokens but the text encoder takes 77",
        ),
        (
            [
                "data.labels=predicted",
                "labeler.first_round.leave_one_out=true",
                "data.require_masks=false",
                "data.class_names=[" + ",".join(f"'w{i}{' word' * 8}'" for i in range(10)) + "]",  # each fits alone
                "data.background_index=null",
            ],
            "labeler.leave_one_out: the prompt naming all 10 classes does not fit the text encoder",
        ),
    ],
)
def test_fit_user_errors_are_one_line(tmp_path, overrides, message):
    done = _fit(tmp_path, *overrides)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    (line,) = _error_lines(done.stderr)
    assert line.startswith("stableseg_pp.fit: error: ") and message in line
    assert "Loading pipeline components" not in done.stderr  # checked from the configs, before any weights are read
    assert "stacktrace above" not in line  # no pointer to a traceback the one-line report does not show
    if any("someorg" in o for o in overrides):  # a model missing offline: found before the dataset is written
        assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_bad_image_in_error_mode_is_one_line(tmp_path):
    done = _fit(tmp_path, "stage0.splits=[val]")  # writes the miniature world
    assert done.returncode == 0, done.stderr[-2000:]
    (tmp_path / "data" / "miniature" / "JPEGImages" / "val_00003.jpg").write_bytes(b"not a picture")
    done = _fit(tmp_path, "stage0.splits=[val]", "force=true")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = _error_lines(done.stderr)
    assert "val_00003.jpg cannot be read" in line and "data.on_bad_input=skip" in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_segment_on_a_missing_gpu_is_one_line(tmp_path, capsys):
    pic = _picture(tmp_path / "p.png", 1)
    with pytest.raises(SystemExit) as stop:
        segment_main([str(pic), "--classes", "circle", "--out", str(tmp_path / "o"), "--device", "cuda"])
    assert stop.value.code == 2 and "--device cuda: this machine has no GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_traceback_only_when_asked(tmp_path):
    done = _fit(tmp_path, "zero_shot.mode=cross", env={"HYDRA_FULL_ERROR": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_bad_input_policy_is_not_part_of_the_content_key(compose_fit):
    from stableseg_pp.data.description import describe_dataset

    keys = []
    for policy in ("error", "skip"):
        cfg = compose_fit("debug=fast", f"data.on_bad_input={policy}")
        dataset = describe_dataset(cfg.data)
        keys.append(stage0.stage_key(cfg, dataset, build_backbone(cfg), None))
    assert keys[0] == keys[1]  # a run stopped at a bad image resumes its folder with skip


@pytest.mark.slow
def test_two_identical_runs_at_once_share_one_folder_cleanly(tmp_path):
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "STABLESEG_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "stableseg_pp.fit", "stage=0", "debug=fast"]
    procs = [
        subprocess.Popen(cmd, cwd=tmp_path, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    (folder,) = (tmp_path / "outputs" / "debug-miniature").glob("stage0-*")
    record = json.loads((folder / "_COMPLETE.json").read_text())
    assert record["images_predicted"] == 16  # computed once: the second run found it finished
    assert sum("finished outputs" in e for e in errs) == 1
    for split in ("train", "val"):
        ranks = (folder / split / "ranks" / "rank0.txt").read_text().split()
        assert len(ranks) == len(set(ranks)) == 8  # no image written twice
    assert not list(folder.rglob("*.tmp*"))


def _picture(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(draw_sample(seed).image).save(path)
    return path


def test_segment_same_names_and_a_bad_file_in_the_middle(tmp_path, miniature_model, capsys):
    a = _picture(tmp_path / "a" / "photo.png", 3)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    b = _picture(tmp_path / "b" / "photo.png", 4)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        segment_main([str(a), str(bad), str(b), "--classes", "circle,star", "--out", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "1 of 3 images could not be used" in err and "broken.png" in err and "Traceback" not in err
    assert "data.on_bad_input" not in err  # segment's messages name its own options
    assert sorted(p.name for p in out.glob("*_mask.png")) == ["a_photo_mask.png", "b_photo_mask.png"]
    assert json.loads((out / "classes.json").read_text()) == {"0": "background", "1": "circle", "2": "star"}
    first, second = (np.array(Image.open(out / f"{n}_photo_mask.png")) for n in "ab")
    assert first.shape == second.shape == (64, 64)


def test_segment_follows_exif_orientation(tmp_path, miniature_model):
    pixels = np.zeros((40, 64, 3), np.uint8)  # stored 64 wide, 40 high
    pixels[:, :32] = draw_sample(5).image[:40, :32]
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(pixels).save(path, exif=exif)
    segment_main([str(path), "--classes", "circle", "--out", str(tmp_path / "o")])
    assert Image.open(tmp_path / "o" / "phone_mask.png").size == (40, 64)  # as the user sees it: 40 wide, 64 high


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data=nonexistent", "Could not find 'data/nonexistent'; available: ade20k"),
        ("zero_shot.foo=1", "Could not override 'zero_shot.foo'.; To append to your config use +zero_shot.foo=1"),
    ],
)
def test_bad_overrides_are_one_line(tmp_path, override, message):
    done = subprocess.run(
        [sys.executable, "-m", "stableseg_pp.fit", override], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = _error_lines(done.stderr)
    assert message in line


class _BrokenFiles(torch.utils.data.Dataset):
    """Item 1 cannot be read (raised from the underlying error, as the readers do)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        if i == 1:
            try:
                raise OSError("image file is truncated (3 bytes not processed)")
            except OSError as err:
                raise BadInputError(f"image /data/x_{i}.jpg cannot be read ({err}): it is truncated{DATA_HINT}") from err
        return i


def test_an_error_in_a_dataloader_worker_keeps_its_message():
    loader = torch.utils.data.DataLoader(_BrokenFiles(), batch_size=1, num_workers=2)
    with pytest.raises(BadInputError) as caught:
        list(loader)
    assert str(caught.value).startswith("Caught BadInputError in DataLoader worker process")  # torch's wrapping
    assert one_line(caught.value) == (
        "image /data/x_1.jpg cannot be read (image file is truncated (3 bytes not processed)): it is truncated; "
        "replace or remove it, or set data.on_bad_input=skip"
    )


@pytest.mark.slow
def test_bad_data_read_by_loader_workers_is_one_line_naming_the_file(tmp_path):
    root = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    _voc_fixture_from_the_miniature_world(root)
    bad = root / "JPEGImages" / "2012_000002.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # a truncated JPEG: its header still reads
    done = _fit(tmp_path, "data=voc", "data.num_workers=2", "stage0.splits=[train]")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    (line,) = _error_lines(done.stderr)
    assert "2012_000002.jpg cannot be read" in line and "data.on_bad_input=skip" in line
    assert "DataLoader worker" not in line and "convert_to_rgb" not in line  # the truncation has nothing to convert


@pytest.mark.slow
def test_a_read_only_outputs_folder_is_one_line(tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    if subprocess.run(["chattr", "+i", str(outputs)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here (needs root on a file system that supports it)")
    try:
        done = _fit(tmp_path)
    finally:
        subprocess.run(["chattr", "-i", str(outputs)], check=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    (line,) = _error_lines(done.stderr)
    assert line.startswith("stableseg_pp.fit: error: cannot write the run folder") and "paths.root_dir" in line


def test_loader_workers_follow_the_cpus_of_the_rank(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    assert loader_workers(None, "data.num_workers") == 2  # null: one per CPU
    assert loader_workers(4, "data.num_workers") == 2  # more than the CPUs: capped (torch would warn)
    assert loader_workers(0, "data.num_workers") == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert loader_workers(None, "data.num_workers") == 1
    with pytest.raises(ConfigError, match="data.num_workers=-1: give a whole number"):
        loader_workers(-1, "data.num_workers")


def test_segment_checks_everything_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_loading(self):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(SDUNetBackbone, "load", no_loading)
    pic = _picture(tmp_path / "p.png", 1)
    out, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(tmp_path / "missing.png")], "image " + str(tmp_path / "missing.png") + " does not exist"),
        ([str(empty)], "a folder with no pictures"),  # a folder stands for the pictures in it: none here
        ([str(pic), "zero_shot.prompt_template=a photo"], "zero_shot.prompt_template='a photo': give a text with one {}"),
        ([str(pic), "data.convert_to_rgb=false"], "data.convert_to_rgb=false: segment reads the pictures named on its"),
        ([str(pic), "data.on_bad_input=skip"], "data settings do not apply"),
    ]
    for inputs, message in cases:
        with pytest.raises(SystemExit) as stop:
            segment_main([*inputs, "--classes", "circle", "--out", str(out)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and "Traceback" not in err, err
        assert not out.exists()  # nothing written, not even a legend


def test_segment_out_is_a_file_is_a_usage_error(tmp_path, capsys):
    pic = _picture(tmp_path / "p.png", 1)
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(SystemExit) as stop:
        segment_main([str(pic), "--classes", "circle", "--out", str(tmp_path / "taken")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--out " + str(tmp_path / "taken") + " is a file, not a folder" in err


def test_segment_never_mixes_class_lists_in_one_folder(tmp_path, miniature_model, capsys):
    pic = _picture(tmp_path / "p.png", 1)
    out = tmp_path / "masks"
    segment_main([str(pic), "--classes", "circle,star", "--out", str(out)])
    legend = (out / "classes.json").read_text()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(SystemExit) as stop:
        segment_main([str(pic), "--classes", "car", "--out", str(out)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "holds masks of the classes background, circle, star" in err
    assert (out / "classes.json").read_text() == legend and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    segment_main([str(_picture(tmp_path / "q.png", 2)), "--classes", "circle,star", "--out", str(out)])  # same list
    assert sorted(p.name for p in out.glob("*_mask.png")) == ["p_mask.png", "q_mask.png"]


def test_background_word_is_refused_for_stage_2_only(compose_fit):
    from stableseg_pp.fit import check_settings

    for stage in ("0", "1"):
        check_settings(compose_fit(f"stage={stage}", "zero_shot.background=word"))  # no learned weights: fine
    check_settings(compose_fit("stage=2", "zero_shot.background=word", "data.background_index=null"))  # no rule at all
    with pytest.raises(ConfigError, match="zero_shot.background=word: stage 2"):
        check_settings(compose_fit("stage=all", "zero_shot.background=word"))
