"""data=images: a folder of the user's own photos, no masks, to a trained segmenter and its masks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from stableseg_pp.data.layouts import DatasetLayoutError, ImageFolderLayout
from stableseg_pp.data.miniature import CLASS_NAMES, write_miniature_voc
from stableseg_pp.fit import run

CLASSES = "data.class_names=[" + ",".join(CLASS_NAMES) + "]"


def _picture(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_a_folder_of_photos_is_found_recursively_in_any_format(tmp_path):
    photos = tmp_path / "photos"
    for i, name in enumerate(["a.jpg", "b.PNG", "trip/c.jpeg", "trip/day 2/d.webp", ".thumbs/e.jpg", "notes.txt"]):
        if name.endswith(".txt"):
            (photos / name).write_text("not a picture")
        else:
            _picture(photos / name, i)
    layout = ImageFolderLayout(photos, val_every=3)
    layout.check(["train", "val"])
    every = sorted(layout.split_ids("train") + layout.split_ids("val"))
    assert every == ["a", "b", "trip/c", "trip/day 2/d"]  # hidden folders and other files are not photos
    assert layout.split_ids("val") == ["a", "trip/day 2/d"]  # every 3rd in name order, held out of training
    assert layout.image_path("train", "trip/c") == photos / "trip" / "c.jpeg"
    assert not layout.has_mask("train", "b") and not layout.has_mask("val", "a")

    _picture(photos / "a.png")  # two files, one id
    with pytest.raises(DatasetLayoutError, match=r"a\.jpg and .*a\.png have the same name"):
        ImageFolderLayout(photos).check(["train", "val"])
    (photos / "a.png").unlink()
    with pytest.raises(DatasetLayoutError, match="holds no pictures"):
        (tmp_path / "empty").mkdir()
        ImageFolderLayout(tmp_path / "empty").check(["train", "val"])
    with pytest.raises(DatasetLayoutError, match=r"missing does not exist"):
        ImageFolderLayout(tmp_path / "missing").check(["train"])
    with pytest.raises(DatasetLayoutError, match="val_every=1"):
        ImageFolderLayout(photos, val_every=1)
    assert layout.exif_transpose and not ImageFolderLayout(photos, exif_transpose=False).exif_transpose
    with pytest.raises(DatasetLayoutError, match="exif_transpose='yes'"):
        ImageFolderLayout(photos, exif_transpose="yes")

    # a small labelled val set of its own: scored
    _picture(tmp_path / "val" / "v.jpg")
    (tmp_path / "val_masks").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "val_masks" / "v.png")
    scored = ImageFolderLayout(photos, val_images=str(tmp_path / "val"), val_masks=str(tmp_path / "val_masks"))
    assert scored.split_ids("val") == ["v"] and scored.has_mask("val", "v") and len(scored.split_ids("train")) == 4


def test_the_images_preset_says_what_it_needs(compose_fit, tmp_path):
    from stableseg_pp.data.description import describe_dataset
    from stableseg_pp.runtime.errors import ConfigError

    _picture(tmp_path / "photos" / "a.jpg")
    _picture(tmp_path / "photos" / "b.jpg")
    cfg = compose_fit("data=images", f"data.root={tmp_path / 'photos'}")
    with pytest.raises(ConfigError, match="set data.class_names"):
        describe_dataset(cfg.data)
    dataset = describe_dataset(compose_fit("data=images", f"data.root={tmp_path / 'photos'}", CLASSES).data)
    assert dataset.labels == "predicted" and not dataset.require_masks
    assert dataset.split_ids("val") == ["a"] and dataset.split_ids("train") == ["b"]

    # the steps' keys hold the folder's listing: a photo added or replaced recomputes, an unchanged folder reuses
    def key():
        return describe_dataset(compose_fit("data=images", f"data.root={tmp_path / 'photos'}", CLASSES).data).key()

    before = key()
    assert before == key() and set(before["pictures"]) == {"train", "val"}
    _picture(tmp_path / "photos" / "c.jpg")
    added = key()
    assert added["pictures"]["train"] != before["pictures"]["train"]
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(tmp_path / "photos" / "c.jpg")  # replaced, same name
    os.utime(tmp_path / "photos" / "c.jpg", ns=(10**18, 10**18))  # (whatever the file system's time resolution)
    assert key()["pictures"]["train"] != added["pictures"]["train"]
    assert "pictures" not in describe_dataset(compose_fit().data).key()  # a dataset with split lists: as it was


@pytest.mark.slow
def test_a_folder_of_photos_to_a_trained_segmenter_and_its_masks(compose_fit, miniature_model, tmp_path, capsys):
    """fit data=images on the miniature world's val pictures alone (sub-folders, no masks): labels predicted, round
    2's labels from round 1's DeepLabV3+, every step without a mask, the table saying there is nothing to score;
    predict on the folder writes a mask per photo."""
    from stableseg_pp.predict import main as predict

    world = write_miniature_voc(tmp_path / "world", n_train=1, n_val=20, size=64)
    photos = tmp_path / "photos"
    val_ids = (world / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    for i, sid in enumerate(val_ids):  # two sub-folders
        target = photos / ("a" if i % 2 else "b") / f"{sid}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(world / "JPEGImages" / f"{sid}.jpg", target)
    for sid, size in ((val_ids[4], (96, 80)), (val_ids[8], (40, 48))):  # photos come in many sizes
        path = photos / "b" / f"{sid}.jpg"
        Image.open(path).resize(size).save(path)
    (photos / "b" / "zz_broken.jpg").write_bytes(b"\xff\xd8 not a picture")  # the last id: a val photo, skipped
    turned = photos / "a" / f"{val_ids[5]}.jpg"  # a phone's portrait photo: stored sideways, EXIF says turn it
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.open(turned).resize((64, 48)).save(turned, exif=exif)
    cfg = compose_fit(
        "data=images", f"data.root={photos}", CLASSES, "data.layout.val_every=5", "stage=all", "labeler=segmenter",
        "labeler.first_round.times=[200,600]", "stage0.n_overlays=1", "segmenter.train.max_epochs=2",
        "segmenter.train.batch_size=8", "map_weights.epochs=3", "crf.workers=1", "data.num_workers=0",
    )  # fmt: skip
    final = run(cfg)["2"]
    run_dir = final.parent
    first, second = sorted(run_dir.glob("labels-*"), key=lambda p: p.stat().st_mtime)
    second_key = json.loads((second / "key.json").read_text())
    assert second_key["evidence"].startswith("deeplab-")  # round 1's DeepLabV3+
    assert second_key["second_opinion"] == first.name  # round 1's scores settle the classes in doubt
    for split in ("train", "val"):
        settled = json.loads((second / split / "labels.json").read_text())["second_opinion"]
        assert settled["from"] == first.name and settled["named"] >= 0
    assert not (first / "metrics.json").exists() or json.loads((first / "metrics.json").read_text())["val"] is None
    for folder in (first, second):
        record = json.loads((folder / "_COMPLETE.json").read_text())["splits"]
        assert record["train"]["images"] == 16 and record["val"]["images"] == 4 and record["val"]["metrics"] is None
    table = json.loads((run_dir / "results.json").read_text())
    assert len(table) == 6 and all(r["val_miou"] is None for r in table)
    assert {r["labels"] for r in table} == {"predicted (diffusion, then segmenter)"}
    assert "No val mIoU: no ground truth to score against" in (run_dir / "results.md").read_text()
    assert len(list((final / "train" / "masks").rglob("*.png"))) == 16  # ids keep their sub-folder

    with pytest.raises(SystemExit) as failed:  # the broken photo is named; the others are done
        predict([str(final), str(photos), "--out", str(tmp_path / "masks"), "--device", "cpu"])
    assert failed.value.code == 2 and "zz_broken.jpg cannot be read" in capsys.readouterr().err
    masks = sorted((tmp_path / "masks").glob("*_mask.png"))
    assert len(masks) == 20 and not (tmp_path / "masks" / "zz_broken_mask.png").exists()
    assert Image.open(masks[0]).size == (64, 64) and np.array(Image.open(masks[0])).max() < len(CLASS_NAMES)
    shown = ((val_ids[4], "b", (96, 80)), (val_ids[8], "b", (40, 48)), (val_ids[5], "a", (48, 64)))  # turned upright
    for sid, folder, size in shown:  # each photo's mask at its own size, as a viewer shows it, in fit as in predict
        assert Image.open(tmp_path / "masks" / f"{sid}_mask.png").size == size
        split = "val" if (final / "val" / "masks" / folder / f"{sid}.png").exists() else "train"
        assert Image.open(final / split / "masks" / folder / f"{sid}.png").size == size
