"""Training pairs: joint augmentation, and clear errors for bad pseudo-masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from torch.utils.data import DataLoader

from stableseg_pp.data.files import BadInputError, image_size
from stableseg_pp.data.miniature import CLASS_NAMES, write_miniature_voc
from stableseg_pp.data.pairs import ImageMaskPairs, SameSizeBatches, eval_transform, train_transform
from stableseg_pp.data.palette import save_palette_png


@pytest.fixture()
def root(tmp_path):
    return write_miniature_voc(tmp_path / "mini", n_train=3, n_val=1)


def _pairs(root, masks, transform=None):
    images = [root / "JPEGImages" / f"train_{i:05d}.jpg" for i in range(len(masks))]
    return ImageMaskPairs(images, masks, len(CLASS_NAMES), transform or eval_transform())


def test_augmentation_moves_image_and_mask_together(root):
    gt = [root / "SegmentationClass" / f"train_{i:05d}.png" for i in range(3)]
    torch.manual_seed(0)
    ds = _pairs(root, gt, train_transform(48, (0.75, 1.5), 64))
    for i in range(3):
        img, mask = ds[i]
        assert img.shape == (3, 48, 48) and mask.shape == (48, 48) and mask.dtype == torch.int64
        # object pixels in the mask are coloured pixels in the image (not the grey background)
        rgb = img * torch.tensor([0.229, 0.224, 0.225])[:, None, None] + torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        sat = rgb.max(0).values - rgb.min(0).values
        fg, bg = (mask > 0) & (mask < 255), mask == 0
        if fg.sum() > 20:
            assert sat[fg].mean() > sat[bg].mean() + 0.1


def test_pseudo_mask_of_wrong_size_names_the_file(root, tmp_path):
    bad = tmp_path / "bad.png"
    save_palette_png(np.zeros((32, 40), np.uint8), bad)
    with pytest.raises(BadInputError, match=r"bad.png is 40x32 but its image .*train_00000.jpg is 64x64"):
        _pairs(root, [bad])[0]


def test_pseudo_mask_with_unknown_class_ids_names_the_file(root, tmp_path):
    bad = tmp_path / "ids.png"
    m = np.zeros((64, 64), np.uint8)
    m[3, 3] = 9
    Image.fromarray(m, mode="L").save(bad)
    with pytest.raises(BadInputError, match=r"ids.png holds class ids \[9\] outside 0..6"):
        _pairs(root, [bad])[0]


def test_pictures_of_many_sizes_are_batched_by_size_each_whole(root, tmp_path):
    """A folder of photos mixes sizes: evaluation batches hold one size each, every picture at its own size, in
    order within a size; pictures of one size give exactly the plain DataLoader's batches."""
    paths = []
    for i, size in enumerate([(64, 64), (40, 56), (64, 64), (40, 56), (64, 64), (30, 30)]):
        path = tmp_path / f"p{i}.png"
        Image.open(root / "JPEGImages" / f"train_{i % 3:05d}.jpg").resize(size[::-1]).save(path)
        paths.append(path)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a picture")
    assert image_size(paths[1]) == (56, 40) and image_size(tmp_path / "broken.jpg") is None
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored 56x40, shown turned a quarter: 40x56
    Image.open(paths[1]).save(tmp_path / "turned.jpg", exif=exif)
    assert image_size(tmp_path / "turned.jpg") == (56, 40) and image_size(tmp_path / "turned.jpg", True) == (40, 56)
    upright = ImageMaskPairs([tmp_path / "turned.jpg"], None, len(CLASS_NAMES), eval_transform(), exif_transpose=True)
    assert upright[0][0].shape == (3, 56, 40)

    items = ImageMaskPairs(paths, None, len(CLASS_NAMES), eval_transform())
    batches = SameSizeBatches(items, [image_size(p) for p in paths], batch_size=2)
    got = [(tuple(images.shape), index.tolist()) for images, index in DataLoader(batches, batch_size=None)]
    assert got == [((2, 3, 64, 64), [0, 2]), ((1, 3, 64, 64), [4]), ((2, 3, 40, 56), [1, 3]), ((1, 3, 30, 30), [5])]
    for images, index in DataLoader(batches, batch_size=None):  # each picture as it is read alone
        for j, i in enumerate(index.tolist()):
            assert torch.equal(images[j], items[i][0])

    same = ImageMaskPairs(paths[0:5:2], None, len(CLASS_NAMES), eval_transform())
    grouped = DataLoader(SameSizeBatches(same, [(64, 64)] * 3, batch_size=2), batch_size=None)
    for (a, ia), (b, ib) in zip(grouped, DataLoader(same, batch_size=2), strict=True):
        assert torch.equal(a, b) and torch.equal(ia, ib)
    unread = SameSizeBatches(items, [None, *[image_size(p) for p in paths[1:]]], batch_size=4)
    assert unread.batches[0] == [0]  # a picture whose size is unknown is a batch of its own: its error names it
    with pytest.raises(ValueError, match="6 items but 2 sizes"):
        SameSizeBatches(items, [(1, 1)] * 2, batch_size=2)
