"""Training pairs: joint augmentation, and clear errors for bad pseudo-masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from torch.utils.data import DataLoader

from stableseg_pp.data.files import BadInputError, image_size
from stableseg_pp.data.miniature import CLASS_NAMES, write_miniature_voc
from stableseg_pp.data.pairs import ImageMaskPairs, eval_transform, evaluation_batch_size, train_transform
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


def test_pictures_of_many_sizes_are_predicted_one_at_a_time_each_whole(root, tmp_path):
    """A folder of photos mixes sizes: evaluation then takes one picture per batch, each at its own size (turned as
    its EXIF says where the layout asks); pictures of one size keep the configured batch."""
    paths = []
    for i, size in enumerate([(64, 64), (40, 56), (64, 64)]):
        path = tmp_path / f"p{i}.png"
        Image.open(root / "JPEGImages" / f"train_{i:05d}.jpg").resize(size[::-1]).save(path)
        paths.append(path)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a picture")
    assert image_size(paths[1]) == (56, 40) and image_size(tmp_path / "broken.jpg") is None
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored 56x40, shown turned a quarter: 40x56
    Image.open(paths[1]).save(tmp_path / "turned.jpg", exif=exif)
    assert image_size(tmp_path / "turned.jpg") == (56, 40) and image_size(tmp_path / "turned.jpg", True) == (40, 56)

    def pairs(files, exif_transpose=False):
        return ImageMaskPairs(files, None, len(CLASS_NAMES), eval_transform(), exif_transpose=exif_transpose)

    mixed = pairs(paths)
    assert evaluation_batch_size(mixed, 8) == 1
    assert [tuple(x.shape) for x, _ in DataLoader(mixed, batch_size=1)] == [(1, 3, 64, 64), (1, 3, 40, 56), (1, 3, 64, 64)]
    assert evaluation_batch_size(pairs(paths[::2]), 8) == 8
    assert evaluation_batch_size(pairs([paths[0], tmp_path / "broken.jpg"]), 8) == 1  # its reader names it
    upright = pairs([tmp_path / "turned.jpg"], exif_transpose=True)
    assert upright[0][0].shape == (3, 56, 40)
    assert evaluation_batch_size(pairs([paths[1], tmp_path / "turned.jpg"], exif_transpose=True), 8) == 1
    assert evaluation_batch_size(pairs([paths[1], tmp_path / "turned.jpg"]), 8) == 8  # as stored: one size
