"""Bad input gets a clear error naming the file, or a logged skip when configured."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from stableseg_pp.data.description import describe_dataset
from stableseg_pp.data.files import BadInputError
from stableseg_pp.data.layouts import VOCLayout
from stableseg_pp.data.miniature import CLASS_NAMES, write_miniature_voc
from stableseg_pp.data.prompted_images import PromptedImages, collate_samples


@pytest.fixture()
def voc_root(tmp_path):
    return write_miniature_voc(tmp_path / "mini", n_train=2, n_val=4)


def _ds(root, **kw):
    return PromptedImages(VOCLayout(root), "val", CLASS_NAMES, resolution=64, **kw)


def test_truncated_image(voc_root):
    path = voc_root / "JPEGImages/val_00001.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BadInputError, match="val_00001.jpg.*cannot be read"):
        _ds(voc_root)[1]


def test_not_an_image(voc_root):
    (voc_root / "JPEGImages/val_00001.jpg").write_text("hello")
    with pytest.raises(BadInputError, match="val_00001.jpg"):
        _ds(voc_root)[1]


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_non_rgb_image_is_converted_unless_strict(voc_root, mode):
    path = voc_root / "JPEGImages/val_00002.jpg"
    img = Image.open(path).convert(mode)
    img.save(path, format="PNG")  # the suffix lies; the reader looks at the content
    with pytest.raises(BadInputError, match=rf"val_00002.jpg is {mode}, not RGB, and strict RGB input"):
        _ds(voc_root, convert_to_rgb=False)[2]
    sample = _ds(voc_root)[2]  # the default converts
    assert sample.image.shape[2] == 3


def test_missing_ground_truth(voc_root):
    (voc_root / "SegmentationClass/val_00003.png").unlink()
    with pytest.raises(BadInputError, match="ground-truth mask .*val_00003.png does not exist"):
        _ds(voc_root)[3]


def test_mask_with_out_of_range_ids(voc_root):
    path = voc_root / "SegmentationClass/val_00000.png"
    mask = np.array(Image.open(path))
    mask[0, 0] = 40
    Image.fromarray(mask, mode="L").save(path)
    with pytest.raises(BadInputError, match=r"val_00000.png holds class ids \[40\]"):
        _ds(voc_root)[0]


def test_skip_is_logged(voc_root, caplog):
    (voc_root / "JPEGImages/val_00001.jpg").write_text("broken")
    ds = _ds(voc_root, on_bad_input="skip")
    with caplog.at_level(logging.WARNING):
        batch = collate_samples([ds[i] for i in range(len(ds))])
    assert [s.id for s in batch] == ["val_00000", "val_00002", "val_00003"]
    assert "skipping val_00001" in caplog.text and "val_00001.jpg" in caplog.text
    assert ds.skipped[0][0] == "val_00001"


def test_unknown_class_name_in_prompt_names(compose_fit):
    cfg = compose_fit()
    cfg.data.prompt_names = {"hexagon": "six sides"}
    with pytest.raises(ValueError, match=r"unknown classes \['hexagon'\]"):
        describe_dataset(cfg.data)


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)nope does not exist.*JPEGImages/<id>.jpg.*docs/datasets/voc.md"):
        VOCLayout(tmp_path / "nope").check(["val"])


def test_missing_split_file(voc_root):
    with pytest.raises(FileNotFoundError, match=r"(?s)test.txt not found.*ImageSets/Segmentation/<split>.txt"):
        PromptedImages(VOCLayout(voc_root), "test", CLASS_NAMES, resolution=64)
