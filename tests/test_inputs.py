"""Real-world inputs: any readable image becomes RGB correctly by default; outputs readable under the umask."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from stableseg_pp.data.files import image_to_rgb, load_rgb
from stableseg_pp.data.miniature import CLASS_NAMES, draw_sample
from stableseg_pp.data.palette import save_palette_png
from stableseg_pp.fit import run


def _grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def _write_odd_images(folder, rgbs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The same pictures stored in the modes real datasets hold; returns id -> the RGB a person would see."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    grey8 = _grey(rgbs[0])
    Image.fromarray(grey8, mode="L").save(folder / "img_grey.jpg", format="PNG")
    expected["img_grey"] = np.repeat(grey8[..., None], 3, axis=2)
    grey16 = _grey(rgbs[1]).astype(np.uint16) * 257  # 16-bit greyscale PNG: 8-bit value v stored as v * 257
    Image.fromarray(grey16).save(folder / "img_grey16.jpg", format="PNG")
    expected["img_grey16"] = np.repeat(_grey(rgbs[1])[..., None], 3, axis=2)
    Image.fromarray(rgbs[2]).convert("CMYK").save(folder / "img_cmyk.jpg", format="TIFF")
    expected["img_cmyk"] = rgbs[2]  # no ICC profile: C = 255 - R, K = 0, exactly invertible
    pal = Image.fromarray(rgbs[3]).quantize(colors=32)
    pal.save(folder / "img_palette.jpg", format="PNG")
    lut = np.array(pal.getpalette()[: 3 * 256] + [0] * max(0, 768 - len(pal.getpalette())), dtype=np.uint8).reshape(-1, 3)
    expected["img_palette"] = lut[np.asarray(pal)]
    rgba = np.concatenate([rgbs[4], np.full((*rgbs[4].shape[:2], 1), 90, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(folder / "img_rgba.jpg", format="PNG")
    expected["img_rgba"] = rgbs[4]  # alpha dropped, colours as stored
    return expected


def test_conversions_match_the_reference(tmp_path):
    rgbs = [draw_sample(s).image for s in range(5)]
    expected = _write_odd_images(tmp_path, rgbs)
    for sid, ref in expected.items():
        got = load_rgb(tmp_path / f"{sid}.jpg")
        assert got.dtype == np.uint8 and got.shape == ref.shape
        np.testing.assert_array_equal(got, ref, err_msg=sid)
    # 32-bit integer and float greyscale
    assert image_to_rgb(Image.fromarray(np.full((2, 2), 65535, np.int32), mode="I")).max() == 255
    assert image_to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32), mode="F"))[0, 0, 0] == 128


@pytest.mark.slow
def test_stage0_default_config_reads_every_mode(tmp_path, compose_fit, miniature_model):
    root = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    samples = [draw_sample(s + 70) for s in range(5)]
    expected = _write_odd_images(root / "JPEGImages", [s.image for s in samples])
    ids = list(expected)  # written in the order of samples
    (root / "SegmentationClass").mkdir(parents=True)
    for sid, s in zip(ids, samples, strict=True):
        save_palette_png(s.mask, root / "SegmentationClass" / f"{sid}.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    names = ",".join(f"'{n}'" for n in CLASS_NAMES)
    cfg = compose_fit("stage=0", "data=voc", f"data.class_names=[{names}]", "diffusion=miniature_sd", "stage0.splits=[val]",
                      "data.batch_size=5", "data.num_workers=0")  # fmt: skip
    cfg.data.prompt_names = {}
    out = run(cfg)["0"]
    assert sorted(p.stem for p in (out / "val" / "masks").glob("*.png")) == sorted(ids)
    record = json.loads((out / "_COMPLETE.json").read_text())
    assert record["splits"]["val"]["converted_to_rgb"] == {"CMYK": 1, "I;16": 1, "L": 1, "P": 1, "RGBA": 1}
    assert record["splits"]["val"]["skipped"] == 0


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_get_the_mode_of_a_plain_open(tmp_path, umask, mode):
    code = (
        "import os, sys; os.umask(int(sys.argv[1], 8));"
        "from stableseg_pp.runtime.atomic import atomic_write_text;"
        "p = atomic_write_text(sys.argv[2], 'x'); open(sys.argv[3], 'w').close();"
        "print(oct(os.stat(p).st_mode & 0o777), oct(os.stat(sys.argv[3]).st_mode & 0o777))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, oct(umask), str(tmp_path / "atomic.txt"), str(tmp_path / "plain.txt")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    atomic, plain = out.stdout.split()
    assert atomic == plain == oct(mode)


def test_broken_colour_profile_falls_back(tmp_path):
    cmyk = Image.fromarray(draw_sample(1).image).convert("CMYK")
    cmyk.info["icc_profile"] = b"not a profile"
    got = image_to_rgb(cmyk)  # a broken ICC profile falls back to Pillow's conversion
    np.testing.assert_array_equal(got, draw_sample(1).image)
