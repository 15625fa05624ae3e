"""Every dataset reader on a tiny fixture in its own on-disk layout, through the real composed data config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from stableseg_pp.data.description import build_layout, describe_dataset
from stableseg_pp.data.labels import (
    COCO_STUFF27_CLASSES,
    COCO_STUFF27_HIERARCHY,
    COCO_STUFF27_IDS,
    COCO_STUFF27_TRAIN_IDS,
    COCO_STUFF_FINE_NAMES,
    COCO_STUFF_UNUSED_IDS,
    LabelMap,
)
from stableseg_pp.data.layouts import DatasetLayoutError
from stableseg_pp.data.miniature import CLASS_NAMES, draw_sample
from stableseg_pp.data.palette import save_palette_png
from stableseg_pp.fit import run
from stableseg_pp.stages import crf, stage0


def split_ids(data, split):
    return describe_dataset(data, splits=[]).split_ids(split)


def build_dataset(data, split, resolution, ids):
    return describe_dataset(data, splits=[]).prompted_images(split, ids, resolution)


SIZE = (6, 8)  # H, W


def image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (*SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def mask(path: Path, values: list[int], mode: str = "P") -> np.ndarray:
    """A mask whose rows hold ``values`` in turn; saved as palette ('P'), 'L' or RGB (class in red)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.array([values[r % len(values)] for r in range(SIZE[0])], dtype=np.uint8)[:, None].repeat(SIZE[1], 1)
    if mode == "P":
        save_palette_png(arr, path)
    elif mode == "L":
        Image.fromarray(arr, mode="L").save(path)
    else:  # RGB with the class in the red channel, other channels noise
        rgb = np.stack([arr, np.full_like(arr, 7), np.full_like(arr, 99)], axis=-1)
        Image.fromarray(rgb).save(path)
    return arr


def ids_file(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(ids) + "\n")


def classes_in(layout, split, sid, n):
    return sorted(np.unique(layout.read_mask(split, sid, n)).tolist())


def test_voc_with_sbd_train_aug(tmp_path, compose_fit):
    root = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    for sid in ("2007_000001", "2007_000002", "2008_000003", "2011_000004"):
        image(root / "JPEGImages" / f"{sid}.jpg")
    mask(root / "SegmentationClass" / "2007_000001.png", [0, 15, 255])
    mask(root / "SegmentationClass" / "2007_000002.png", [0, 20])
    ids_file(root / "ImageSets/Segmentation/train.txt", ["2007_000001"])
    ids_file(root / "ImageSets/Segmentation/val.txt", ["2007_000002"])
    # SBD masks (mmsegmentation's SegmentationClassAug), no aug.txt: train_aug = aug masks - val
    for sid, v in (("2007_000001", [0, 15]), ("2007_000002", [0, 20]), ("2008_000003", [0, 3]), ("2011_000004", [0, 7])):
        mask(root / "SegmentationClassAug" / f"{sid}.png", v, mode="L")
    cfg = compose_fit("data=voc")
    layout = build_layout(cfg.data)
    assert split_ids(cfg.data, "train") == ["2007_000001"] and split_ids(cfg.data, "val") == ["2007_000002"]
    assert classes_in(layout, "train", "2007_000001", 21) == [0, 15, 255]  # VOC's own mask, ignore kept
    aug = compose_fit("data=voc", "data.layout.splits.train=train_aug")
    assert split_ids(aug.data, "train") == ["2007_000001", "2008_000003", "2011_000004"]
    assert classes_in(build_layout(aug.data), "train", "2011_000004", 21) == [0, 7]  # from SegmentationClassAug
    ids_file(root / "ImageSets/Segmentation/aug.txt", ["2008_000003"])  # an explicit list wins
    assert split_ids(aug.data, "train") == ["2008_000003"]
    sample = build_dataset(aug.data, "train", 64, ["2008_000003"])[0]
    assert sample.class_ids == [3] and cfg.data.prompt_names["pottedplant"] == "potted plant"


def test_context59_reduces_zero_label(tmp_path, compose_fit):
    root = tmp_path / "data" / "VOCdevkit" / "VOC2010"
    image(root / "JPEGImages" / "2008_000008.jpg")
    mask(root / "SegmentationClassContext" / "2008_000008.png", [0, 1, 59], mode="L")
    ids_file(root / "ImageSets/SegmentationContext/train.txt", ["2008_000008"])
    ids_file(root / "ImageSets/SegmentationContext/val.txt", ["2008_000008"])
    cfg = compose_fit("data=context59")
    assert len(cfg.data.class_names) == 59 and cfg.data.background_index is None
    # stored 0 (no class) -> ignore, 1 -> aeroplane (0), 59 -> wood (58)
    assert classes_in(build_layout(cfg.data), "val", "2008_000008", 59) == [0, 58, 255]
    sample = build_dataset(cfg.data, "val", 64, ["2008_000008"])[0]
    assert sample.class_ids == [0, 58]  # no background class: class 0 is prompted for


def test_ade20k_folders_and_reduce_zero_label(tmp_path, compose_fit):
    root = tmp_path / "data" / "ADEChallengeData2016"
    for split in ("training", "validation"):
        image(root / "images" / split / f"ADE_{split}_00000001.jpg")
        mask(root / "annotations" / split / f"ADE_{split}_00000001.png", [0, 1, 150], mode="L")
    cfg = compose_fit("data=ade20k")
    layout = build_layout(cfg.data)
    assert split_ids(cfg.data, "val") == ["ADE_validation_00000001"]
    assert classes_in(layout, "val", "ADE_validation_00000001", 150) == [0, 149, 255]
    assert cfg.data.class_names[149] == "flag" and len(cfg.data.class_names) == 150


def test_cityscapes_train_ids_and_raw_label_ids(tmp_path, compose_fit):
    root = tmp_path / "data" / "cityscapes"
    for city, name in (("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313")):
        image(root / "leftImg8bit" / "train" / city / f"{name}_leftImg8bit.png")
    mask(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png", [0, 18, 255], mode="L")
    # only the official label ids: road 7 -> 0, bicycle 33 -> 18, ego vehicle 1 -> ignore
    mask(root / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png", [7, 33, 1], mode="L")
    cfg = compose_fit("data=cityscapes")
    layout = build_layout(cfg.data)
    ids = split_ids(cfg.data, "train")
    assert ids == ["aachen/aachen_000000_000019", "bochum/bochum_000000_000313"]
    assert classes_in(layout, "train", ids[0], 19) == [0, 18, 255]
    assert classes_in(layout, "train", ids[1], 19) == [0, 18, 255]
    assert layout.image_path("train", ids[1]).name == "bochum_000000_000313_leftImg8bit.png"


def _coco_fixture(root: Path) -> None:
    image(root / "images/val2017/000000000139.jpg")
    mask(root / "annotations/val2017/000000000139_labelTrainIds.png", [0, 79, 80, 170, 255], mode="L")


def test_coco_stuff_and_coco_object_from_the_same_files(tmp_path, compose_fit):
    _coco_fixture(tmp_path / "data" / "coco_stuff164k")
    stuff = compose_fit("data=coco_stuff")
    assert len(stuff.data.class_names) == 171 and stuff.data.background_index is None
    assert classes_in(build_layout(stuff.data), "val", "000000000139", 171) == [0, 79, 80, 170, 255]
    obj = compose_fit("data=coco_object")
    assert len(obj.data.class_names) == 81 and obj.data.class_names[80] == "toothbrush"
    # things 0..79 -> 1..80, stuff -> background 0, ignore stays
    assert classes_in(build_layout(obj.data), "val", "000000000139", 81) == [0, 1, 80, 255]


def _coco_stuff27_fixture(root: Path) -> None:
    """Two pictures, each with its mmsegmentation train-id mask and its raw stuffthingmaps mask (the same classes)."""
    for k, sid in enumerate(("000000000139", "000000000285")):
        image(root / f"images/val2017/{sid}.jpg", seed=k)
    ann = root / "annotations/val2017"
    # person, tv, wall-brick, wood, unlabeled; raw also holds street sign (fine 11, never annotated in COCO)
    mask(ann / "000000000139_labelTrainIds.png", [0, 62, 159, 170, 255], mode="L")
    mask(ann / "000000000139.png", [0, 71, 170, 181, 255, 11], mode="L")
    # banana, fruit, chair, table, fog: the thing and stuff halves of "food" and "furniture"; fog is water
    mask(ann / "000000000285_labelTrainIds.png", [46, 110, 56, 153, 108], mode="L")
    mask(ann / "000000000285.png", [51, 121, 61, 164, 119], mode="L")


def test_coco_stuff27_from_train_ids_and_from_raw_stuffthingmaps(tmp_path, compose_fit):
    _coco_stuff27_fixture(tmp_path / "data" / "coco_stuff164k")
    train_ids = compose_fit("data=coco_stuff27")
    raw = compose_fit("data=coco_stuff27", "data.layout.mask_suffix=.png", "data.layout.label_map.lut=coco_stuff27")
    for cfg in (train_ids, raw):
        assert list(cfg.data.class_names) == list(COCO_STUFF27_CLASSES) and cfg.data.background_index is None
        layout = build_layout(cfg.data)
        assert split_ids(cfg.data, "val") == ["000000000139", "000000000285"]
        # person 9, electronic 0, wall 18, solid 24; unlabeled and the unused fine id -> ignore
        assert classes_in(layout, "val", "000000000139", 27) == [0, 9, 18, 24, 255]
        # food 2, food-stuff 14, furniture 3, furniture-stuff 15, water 26
        assert classes_in(layout, "val", "000000000285", 27) == [2, 3, 14, 15, 26]
        sample = build_dataset(cfg.data, "val", 64, ["000000000139"])[0]
        assert sample.class_ids == [0, 9, 18, 24]  # no background class: every coarse class is prompted for
    assert build_layout(train_ids.data).mask_path("val", "000000000139").name == "000000000139_labelTrainIds.png"
    assert build_layout(raw.data).mask_path("val", "000000000139").name == "000000000139.png"
    names = list(train_ids.data.class_names)
    prompts = [train_ids.data.prompt_names.get(n, n) for n in names]
    assert len(set(prompts)) == 27 and names[14:16] == ["food-stuff", "furniture-stuff"]


def test_coco_stuff27_table_covers_every_class(compose_fit):
    train = LabelMap(lut="coco_stuff27_train_ids").table()
    fine = LabelMap(lut="coco_stuff27").table()
    assert len(COCO_STUFF27_CLASSES) == 27 and len(COCO_STUFF_FINE_NAMES) == 182
    assert sorted(COCO_STUFF27_TRAIN_IDS) == list(range(171)) and set(COCO_STUFF27_TRAIN_IDS.values()) == set(range(27))
    assert all(0 <= train[t] < 27 for t in range(171)) and (train[171:] == 255).all()
    # every fine class has exactly one super-category; the 11 never-annotated COCO thing ids are ignored
    listed = [f for fines in COCO_STUFF27_HIERARCHY.values() for f in fines]
    assert sorted(listed) == sorted(COCO_STUFF_FINE_NAMES)
    assert sorted(COCO_STUFF_UNUSED_IDS) == [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
    assert all(fine[i] == 255 for i in COCO_STUFF_UNUSED_IDS) and (fine[182:] == 255).all()
    assert sorted(COCO_STUFF27_IDS) == sorted(set(range(182)) - COCO_STUFF_UNUSED_IDS)
    # the two sources agree: train id t is the coco_stuff class named class_names[t], whose raw fine id is its
    # position in COCO-Stuff's labels.txt
    stuff_names = list(compose_fit("data=coco_stuff").data.class_names)
    for t, name in enumerate(stuff_names):
        assert train[t] == fine[COCO_STUFF_FINE_NAMES.index(name)], name
    # spot checks against STEGO's fine_to_coarse (src/data.py; 0-indexed fine id -> coarse id)
    stego = {0: 9, 2: 11, 15: 7, 33: 10, 43: 5, 51: 2, 61: 3, 71: 0, 77: 1, 83: 4, 26: 6, 9: 8, 91: 17, 100: 13,
             101: 12, 119: 26, 120: 14, 129: 15, 131: 16, 156: 23, 168: 22, 170: 18, 179: 19, 94: 20, 110: 21,
             181: 24, 112: 25}  # fmt: skip
    assert {f: int(fine[f]) for f in stego} == stego


def test_uecfoodpix_red_channel_and_class_list(tmp_path, compose_fit):
    root = tmp_path / "data" / "UECFOODPIXCOMPLETE" / "data"
    for split in ("train", "test"):
        image(root / "UECFoodPIXCOMPLETE" / split / "img" / "1.jpg")
        mask(root / "UECFoodPIXCOMPLETE" / split / "mask" / "1.png", [0, 1, 102], mode="RGB")
    (root / "category.txt").write_text("id\tname\n" + "".join(f"{i}\tfood {i}\n" for i in range(1, 103)))
    cfg = compose_fit("data=uecfoodpix")
    names = describe_dataset(cfg.data).class_names
    assert len(names) == 103 and names[:2] == ["background", "food 1"]
    assert split_ids(cfg.data, "val") == ["1"]  # val = the official test split
    assert classes_in(build_layout(cfg.data), "val", "1", 103) == [0, 1, 102]


def test_foodseg103_class_list_and_masks(tmp_path, compose_fit):
    root = tmp_path / "data" / "FoodSeg103"
    for split in ("train", "test"):
        image(root / "Images" / "img_dir" / split / "00000048.jpg")
        mask(root / "Images" / "ann_dir" / split / "00000048.png", [0, 24, 103], mode="L")
    (root / "category_id.txt").write_text("".join(f"{i}\t{'background' if i == 0 else f'food {i}'}\n" for i in range(104)))
    cfg = compose_fit("data=foodseg103")
    names = describe_dataset(cfg.data).class_names
    assert len(names) == 104 and names[0] == "background"
    assert classes_in(build_layout(cfg.data), "train", "00000048", 104) == [0, 24, 103]


DATASETS = ["voc", "context59", "ade20k", "cityscapes", "coco_stuff", "coco_object", "coco_stuff27", "uecfoodpix", "foodseg103"]


@pytest.mark.parametrize("name", DATASETS)
def test_missing_or_wrong_layout_says_what_was_expected(tmp_path, compose_fit, name):
    cfg = compose_fit(f"data={name}")
    with pytest.raises(DatasetLayoutError, match=r"(?s)does not exist.*expected:.*docs/datasets/"):
        describe_dataset(cfg.data)
    Path(cfg.data.root).mkdir(parents=True)
    (Path(cfg.data.root) / "something_else").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"(?s)(not the expected layout|not found).*expected:"):
        describe_dataset(cfg.data)


def test_every_layout_points_to_its_docs_page(compose_fit):
    repo = Path(__file__).resolve().parent.parent
    for name in DATASETS:
        layout = instantiate(compose_fit(f"data={name}").data.layout, root="/nowhere", _convert_="all")
        assert (repo / layout.doc).exists(), f"{name}: {layout.doc} is missing"


def _voc_fixture_from_the_miniature_world(root: Path, n_train: int = 6, n_val: int = 4) -> None:
    """Miniature pictures stored as PASCAL VOC 2012 (so the miniature model can segment them)."""
    splits = {"train": [f"2012_{i:06d}" for i in range(n_train)], "val": [f"2012_{100 + i:06d}" for i in range(n_val)]}
    for split, ids in splits.items():
        for k, sid in enumerate(ids):
            s = draw_sample(1000 * (split == "val") + k + 7)
            Image.fromarray(s.image).save(
                root / "JPEGImages" / f"{sid}.jpg" if (root / "JPEGImages").is_dir() else _mk(root / "JPEGImages") / f"{sid}.jpg",
                quality=95,
            )
            save_palette_png(s.mask, _mk(root / "SegmentationClass") / f"{sid}.png")
        ids_file(root / "ImageSets" / "Segmentation" / f"{split}.txt", ids)


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_stage0_end_to_end_on_a_voc_layout_folder(tmp_path, compose_fit, miniature_model):
    _voc_fixture_from_the_miniature_world(tmp_path / "data" / "VOCdevkit" / "VOC2012")
    names = ",".join(f"'{n}'" for n in CLASS_NAMES)
    cfg = compose_fit(
        "stage=0", "data=voc", f"data.class_names=[{names}]", "diffusion=miniature_sd",
        "data.batch_size=4", "data.num_workers=0", "data.eval_background=false",
    )  # fmt: skip
    cfg.data.prompt_names = {}  # the VOC synonyms name VOC classes
    out = run(cfg)["0"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(p.stem for p in (out / "val" / "masks").glob("*.png")) == [f"2012_{100 + i:06d}" for i in range(4)]
    assert metrics["val"]["images"] == 4 and 0 < metrics["val"]["miou"] <= 1
    assert metrics["val"]["protocol"] == {
        "dataset": "voc", "split": "val", "classes": 7, "background": "ignored", "labels": "oracle", "label_map": None,
    }  # fmt: skip
    assert metrics["val"]["miou"] == metrics["val"]["miou_without_background"]


def test_a_dataset_without_background_gets_a_class_for_every_pixel(tmp_path, compose_fit, miniature_model):
    """Pascal Context layout (reduce_zero_label) holding miniature pictures; the 6 shapes are the classes."""
    root = tmp_path / "data" / "VOCdevkit" / "VOC2010"
    ids = [f"2010_{i:06d}" for i in range(4)]
    for k, sid in enumerate(ids):
        s = draw_sample(k + 40)
        Image.fromarray(s.image).save(_mk(root / "JPEGImages") / f"{sid}.jpg", quality=95)
        save_palette_png(s.mask, _mk(root / "SegmentationClassContext") / f"{sid}.png")  # 0 = no class -> ignored
    for split in ("train", "val"):
        ids_file(root / "ImageSets" / "SegmentationContext" / f"{split}.txt", ids)
    shapes = ",".join(f"'{n}'" for n in CLASS_NAMES[1:])
    cfg = compose_fit("data=context59", f"data.class_names=[{shapes}]", "data.batch_size=4", "data.num_workers=0",
                      "diffusion=miniature_sd", "crf.workers=1", "crf.bilateral_sxy=20", "crf.bilateral_srgb=30")  # fmt: skip
    cfg.data.prompt_names = {}
    dataset = describe_dataset(cfg.data)
    s0_dir = stage0.run(cfg, dataset)
    crf_dir = crf.run(cfg, dataset, s0_dir)
    for folder in (s0_dir, crf_dir):
        masks = [np.array(Image.open(p)) for p in sorted((folder / "val" / "masks").glob("*.png"))]
        assert len(masks) == 4 and all(m.max() < 6 for m in masks)  # never 255: no pixel left without a class
        metrics = json.loads((folder / "metrics.json").read_text())["val"]
        assert metrics["protocol"]["background"] == "none" and metrics["protocol"]["classes"] == 6
        assert metrics["protocol"]["label_map"] == {"reduce_zero_label": True}
        assert metrics["miou"] > 0.2


@pytest.mark.slow
def test_stage2_end_to_end_without_a_background_class(tmp_path, compose_fit, miniature_model):
    """StableSeg++ on a Context-layout folder: class 0 is a real class, so a segmenter pixel of class 0 in an
    image whose prompt does not name it has no channel; the weights must stay finite and the table finish."""
    root = tmp_path / "data" / "VOCdevkit" / "VOC2010"
    ids = [f"2010_{i:06d}" for i in range(6)]
    for k, sid in enumerate(ids):
        s = draw_sample(k + 40)
        Image.fromarray(s.image).save(_mk(root / "JPEGImages") / f"{sid}.jpg", quality=95)
        save_palette_png(s.mask, _mk(root / "SegmentationClassContext") / f"{sid}.png")
    for split in ("train", "val"):
        ids_file(root / "ImageSets" / "SegmentationContext" / f"{split}.txt", ids)
    shapes = ",".join(f"'{n}'" for n in CLASS_NAMES[1:])
    cfg = compose_fit("stage=2", "data=context59", f"data.class_names=[{shapes}]", "data.batch_size=6",
                      "data.num_workers=0", "diffusion=miniature_sd", "crf.workers=1", "segmenter.train.max_epochs=1",
                      "segmenter.train.batch_size=6", "segmenter.train.crop_size=64", "map_weights.epochs=3")  # fmt: skip
    cfg.data.prompt_names = {}
    run(cfg)
    run_dir = Path(cfg.paths.run_dir)
    (weights_dir,) = run_dir.glob("weights-*")
    learned = json.loads((weights_dir / "weights.json").read_text())
    assert learned["family"] == "sd_unet" and learned["sites"]
    assert all(np.isfinite(w) and w > 0 for w in learned["sites"].values()), learned
    assert abs(sum(learned["sites"].values()) - 1) < 1e-4
    table = json.loads((run_dir / "results.json").read_text())
    assert len(table) == 6 and all(r["val_miou"] is not None and np.isfinite(r["val_miou"]) for r in table)


@pytest.mark.slow
def test_voc_stableseg_preset_runs_to_completion_on_a_voc_fixture(tmp_path, compose_fit, miniature_model):
    """The zero-shot preset as documented (`experiment=voc_stableseg paths.data_dir=...`), with the miniature backbone."""
    _voc_fixture_from_the_miniature_world(tmp_path / "data" / "VOCdevkit" / "VOC2012")
    names = ",".join(f"'{n}'" for n in CLASS_NAMES)
    cfg = compose_fit("experiment=voc_stableseg", f"paths.data_dir={tmp_path / 'data'}", "diffusion=miniature_sd",
                      "zero_shot.resolution=64", "trainer=cpu", f"data.class_names=[{names}]")  # fmt: skip
    cfg.data.prompt_names = {}
    outputs = run(cfg)  # the preset's own stage plan: stage 0 on val
    assert list(outputs) == ["0"]
    record = json.loads((outputs["0"] / "_COMPLETE.json").read_text())
    assert set(record["splits"]) == {"val"} and record["splits"]["val"]["metrics"]["protocol"]["background"] == "ignored"
