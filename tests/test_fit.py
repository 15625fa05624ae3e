"""`fit` on the real composed config: stage 0 end to end, skipping, resuming, forcing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stableseg_pp import artifacts
from stableseg_pp.config import CONFIG_DIR
from stableseg_pp.fit import run
from stableseg_pp.runtime.atomic import atomic_save
from stableseg_pp.runtime.run_dir import COMPLETE
from stableseg_pp.stages import resolve_stages
from tests.conftest import file_stamps as _files
from tests.conftest import killed_after_records

SMALL = [
    "stage=0",
    "data.limit=6",
    "data.batch_size=2",
    "stage0.n_overlays=2",
    "data.generate.n_train=12",
    "data.generate.n_val=6",
]


def test_stage0_end_to_end_then_skipped(compose_fit, miniature_model):
    cfg = compose_fit(*SMALL)
    out = run(cfg)["0"]
    for split in ("train", "val"):
        masks = sorted((out / split / "masks").glob("*.png"))
        assert [m.stem for m in masks] == [f"{split}_{i:05d}" for i in range(6)]
        img = Image.open(masks[0])
        assert img.mode == "P" and img.size == (64, 64)
        assert set(np.unique(np.array(img))) <= set(range(7))
        stored = artifacts.load_stored_maps(out / split / "maps" / f"{split}_00000.npz")
        n = len(stored.class_ids)
        assert stored.family == "sd_unet"
        assert stored.site_maps and all(m.dtype == np.float16 and m.shape[0] == n for m in stored.site_maps.values())
        assert stored.scores.shape == (1 + n, 16, 16) and stored.scores.dtype == np.float16
        assert len(list((out / split / "overlays").glob("*.png"))) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["val"]["miou"] <= 1.0 and metrics["val"]["labels"] == "oracle"
    assert set(metrics["val"]["per_class_iou"]) == set(cfg.data.class_names)
    assert (out / COMPLETE).exists()

    before = _files(out)
    again = run(compose_fit(*SMALL))["0"]
    assert again == out
    assert _files(out) == before  # nothing rewritten

    forced = run(compose_fit(*SMALL, "force=true"))["0"]
    assert forced == out and _files(out)[COMPLETE] != before[COMPLETE]


def test_changed_setting_gets_its_own_folder(compose_fit, miniature_model):
    a = run(compose_fit(*SMALL, "data.limit=2"))["0"]
    b = run(compose_fit(*SMALL, "data.limit=2", "zero_shot.background_threshold=0.4"))["0"]
    assert a != b and a.parent == b.parent


def test_killed_run_resumes_without_recomputing(compose_fit, miniature_model, monkeypatch):
    cfg = compose_fit(*SMALL)
    with killed_after_records(monkeypatch, 3) as calls:
        run(cfg)
    original = artifacts.MaskSetWriter.write_record
    out = Path(cfg.paths.run_dir).glob("stage0-*").__next__()
    assert not (out / COMPLETE).exists()
    done = _files(out / "train" / "masks")
    assert sorted(Path(k).stem for k in done) == calls
    assert not list(out.rglob("*.tmp*"))  # no half-written file under any name
    # what a SIGKILL leaves (no except clause runs): a writer's temporary file, and one named as earlier versions did
    stale = [out / "train" / "masks" / ".train_00009.png.1icdo_7r.tmp", out / "train" / "masks" / ".train_00010.png.x.tmp.png"]
    for path in stale:
        path.write_bytes(b"")

    seen: list[str] = []

    def recording(self, p, layout):
        seen.append(p.id)
        original(self, p, layout)

    monkeypatch.setattr(artifacts.MaskSetWriter, "write_record", recording)
    run(compose_fit(*SMALL))
    assert not set(seen) & set(calls)
    assert len(seen) == 12 - len(calls)
    after = _files(out / "train" / "masks")
    assert all(after[k] == v for k, v in done.items())  # finished images untouched
    assert (out / COMPLETE).exists()
    assert not any(p.exists() for p in stale)  # the step removed what the killed run left


def test_temporary_names_never_end_like_the_file(tmp_path):
    seen: list[str] = []
    atomic_save(tmp_path / "mask.png", lambda t: (seen.append(t), Path(t).write_bytes(b"png")))
    (name,) = (Path(t).name for t in seen)
    assert name.startswith(".mask.png.") and name.endswith(".tmp") and not name.endswith(".png")
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]


def test_stage_is_a_plain_value(compose_fit):
    assert not (Path(CONFIG_DIR) / "stage").exists()
    assert compose_fit("stage=0").stage == 0
    assert resolve_stages("all") == ["2"] and resolve_stages(0) == ["0"]
    with pytest.raises(ValueError, match="stage='7' is not a stage"):
        resolve_stages("7")


def test_bad_scale_is_a_clear_error(compose_fit, miniature_model):
    cfg = compose_fit(*SMALL, "zero_shot.cross_scales=[3]")
    with pytest.raises(ValueError, match=r"zero_shot.cross_scales=\[3\]: map sides \[3\] do not exist.*available: \[4, 8, 16\]"):
        run(cfg)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["experiment=voc_stableseg"],
            {"data.name": "voc", "diffusion.name": "sd15", "zero_shot.mode": "ca+sa", "crf.bilateral_sxy": 50},
        ),
        (["experiment=miniature"], {"data.name": "miniature", "zero_shot.resolution": 64, "crf.bilateral_sxy": 20}),
        # the StableSeg paper's settings: Table 5 (VOC and Context-59 StableSeg++), Table 3 best scales per dataset
        (
            ["experiment=voc_stableseg_pp"],
            {
                "zero_shot.cross_scales": [8, 16, 32, 64],
                "zero_shot.self_scales": "all",
                "data.eval_background": False,
                "data.layout.splits.train": "train_aug",
                "segmenter.model.encoder_name": "resnet101",
                "self_training.rounds": 2,
            },
        ),
        (["experiment=context59_stableseg_pp"], {"zero_shot.cross_scales": [8, 16, 32, 64], "data.background_index": None}),
        (["experiment=context59_stableseg"], {"zero_shot.cross_scales": [8, 16], "zero_shot.self_scales": "all"}),
        (["experiment=ade20k_stableseg"], {"zero_shot.cross_scales": [8, 16], "data.name": "ade20k"}),
        (["experiment=cityscapes_stableseg"], {"zero_shot.cross_scales": [8, 16], "data.palette": "cityscapes"}),
        (["experiment=uecfoodpix_stableseg"], {"zero_shot.cross_scales": [8, 16, 32, 64], "zero_shot.self_scales": [8, 16, 32]}),
        (["experiment=foodseg103_stableseg"], {"zero_shot.cross_scales": [8, 16], "data.layout.splits.val": "test"}),
        (["experiment=coco_object_stableseg"], {"data.name": "coco_object", "data.background_index": 0}),
        (["experiment=coco_stuff_stableseg"], {"data.name": "coco_stuff", "data.background_index": None}),
        (["debug=fast"], {"data.limit": 8, "run_name": "debug-miniature"}),
        (["diffusion=sd21"], {"zero_shot.resolution": 512, "diffusion.dtype": "float16"}),
        (["segmenter=deeplabv3plus"], {"segmenter.model.encoder_name": "resnet101"}),
    ],
)
def test_presets_compose(compose_fit, overrides, expected):
    from omegaconf import OmegaConf

    cfg = compose_fit(*overrides)
    for key, value in expected.items():
        assert OmegaConf.select(cfg, key) == value, key


PRESETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_has_the_splits_its_stages_need(compose_fit, preset):
    from stableseg_pp.launch import slurm
    from stableseg_pp.stages import check_stage_splits, stage_chain

    cfg = compose_fit(f"experiment={preset}")
    check_stage_splits(cfg.stage, list(cfg.stage0.splits))  # no "run the earlier stages first" half-way
    chain = stage_chain(cfg.stage)
    zero_shot_only = preset.endswith(("_stableseg", "_seg4diff"))  # the papers' zero-shot reproductions
    assert chain == (["0"] if zero_shot_only else ["0", "1", "2"])
    scripts = slurm.write_scripts([f"experiment={preset}", f"paths.root_dir={cfg.paths.root_dir}"])
    assert [s.stem for s in scripts] == [f"stage{k}" for k in chain]  # the SLURM chain queues only those


def test_training_stages_without_train_pseudo_masks_are_refused(compose_fit):
    from stableseg_pp.runtime.errors import ConfigError
    from stableseg_pp.stages import check_stage_splits

    cfg = compose_fit("experiment=voc_stableseg", "stage=all")
    with pytest.raises(ConfigError, match=r"stage=all trains DeepLabV3\+ .* train split.*stage0.splits=\['val'\]"):
        check_stage_splits(cfg.stage, list(cfg.stage0.splits))


@pytest.mark.parametrize("preset", ["voc_stableseg_pp", "context59_stableseg_pp"])
def test_table5_presets_start_from_imagenet_and_say_how_to_cache_it(compose_fit, preset, monkeypatch):
    from stableseg_pp.config import build
    from stableseg_pp.runtime.errors import ConfigError

    cfg = compose_fit(f"experiment={preset}")
    assert cfg.segmenter.model.encoder_weights == "imagenet" and cfg.segmenter.model.encoder_name == "resnet101"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-cache")  # nothing cached: the offline load must fail clearly
    with pytest.raises(ConfigError, match=r"encoder_weights=imagenet: the resnet101 encoder weights are not in the local"):
        build(cfg.segmenter.model, class_names=["a", "b"], _convert_="all")


@pytest.mark.slow
def test_annotation_free_protocol_with_150_class_names(compose_fit, miniature_model):
    """data.labels=all with an ADE20K-sized class list: the prompt is split, every image gets a mask."""
    cfg = compose_fit(*SMALL, "stage0.splits=[val]", "data.labels=all", "data.limit=3")
    cfg.data.class_names = list(cfg.data.class_names) + [f"thing {i}" for i in range(143)]
    out = run(cfg)["0"]
    masks = sorted((out / "val" / "masks").glob("*.png"))
    assert len(masks) == 3
    stored = artifacts.load_stored_maps(out / "val" / "maps" / f"{masks[0].stem}.npz")
    assert len(stored.class_ids) == 149 and all(m.shape[0] == 149 for m in stored.site_maps.values())
    assert json.loads((out / "metrics.json").read_text())["val"]["labels"] == "all"
