"""The miniature world: deterministic, in the VOC layout, with an appearance per class."""

from __future__ import annotations

import numpy as np
from PIL import Image

from stableseg_pp.data.layouts import VOCLayout
from stableseg_pp.data.miniature import CLASS_COLOURS, CLASS_NAMES, draw_sample, write_miniature_voc
from stableseg_pp.data.prompted_images import PromptedImages


def test_samples_are_deterministic_and_labelled():
    a, b, c = draw_sample(5), draw_sample(5), draw_sample(6)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (64, 64, 3) and a.mask.shape == (64, 64)
    present = set(np.unique(a.mask).tolist()) - {0, 255}
    assert present == set(a.classes)
    assert a.caption == "a photo of a " + " and ".join(CLASS_NAMES[i] for i in a.classes)


def test_edges_are_ignored_and_classes_have_their_own_colour():
    edge = colour_hits = colour_total = 0
    for seed in range(60):
        s = draw_sample(seed)
        edge += (s.mask == 255).sum()
        for cid in s.classes:
            mean = s.image[s.mask == cid].reshape(-1, 3).astype(float).mean(0)
            nearest = int(np.argmin([np.linalg.norm(mean - np.array(col)) for col in CLASS_COLOURS[1:]])) + 1
            colour_hits += nearest == cid
            colour_total += 1
    assert edge > 0
    assert colour_hits / colour_total > 0.9


def test_multi_word_class_exists():
    assert any(" " in name for name in CLASS_NAMES)


def test_written_in_voc_layout_and_read_back(tmp_path):
    root = write_miniature_voc(tmp_path / "mini", n_train=6, n_val=3)
    assert (root / "ImageSets/Segmentation/train.txt").read_text().split() == [f"train_{i:05d}" for i in range(6)]
    mask = Image.open(root / "SegmentationClass/val_00000.png")
    assert mask.mode == "P"
    ds = PromptedImages(VOCLayout(root), "val", CLASS_NAMES, resolution=64)
    sample = ds[0]
    expected = draw_sample_for(root, "val", 0)
    assert np.array_equal(sample.mask, expected.mask)
    assert sample.class_ids == sorted(expected.classes)
    assert sample.pixels.shape == (3, 64, 64) and -1.0 <= sample.pixels.min() and sample.pixels.max() <= 1.0
    # rewriting with the same parameters is a no-op, and files are complete
    before = (root / "JPEGImages/val_00000.jpg").stat().st_mtime_ns
    write_miniature_voc(tmp_path / "mini", n_train=6, n_val=3)
    assert (root / "JPEGImages/val_00000.jpg").stat().st_mtime_ns == before
    assert not list(root.rglob("*.tmp*"))


def draw_sample_for(root, split, index):
    from stableseg_pp.data.miniature import sample_seed

    return draw_sample(sample_seed(split, index, 0))
