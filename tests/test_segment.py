"""Zero-shot segmentation of arbitrary pictures from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from stableseg_pp.data.miniature import draw_sample
from stableseg_pp.segment import main


def test_segment_writes_mask_and_overlay(tmp_path, miniature_model):
    paths = []
    for seed, size in ((3, (64, 64)), (4, (96, 80))):
        p = tmp_path / f"pic{seed}.png"
        Image.fromarray(draw_sample(seed).image).resize(size).save(p)
        paths.append(p)
    out = tmp_path / "out"
    written = main([*map(str, paths), "--classes", "circle,half moon,star", "--out", str(out)])
    assert len(written) == 2
    mask = Image.open(out / "pic4_mask.png")
    assert mask.mode == "P" and mask.size == (96, 80)
    assert set(np.unique(np.array(mask))) <= {0, 1, 2, 3}
    overlay = Image.open(out / "pic4_overlay.png")  # image | masks, enlarged 3x (to at least 192 px), titled
    assert overlay.size[0] == 6 + 2 * (3 * 96 + 6) and overlay.size[1] > 3 * 80 + 20
    assert json.loads((out / "classes.json").read_text())["2"] == "half moon"


def test_segment_rejects_bad_image(tmp_path, miniature_model, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(SystemExit) as stop:
        main([str(bad), "--classes", "circle", "--out", str(tmp_path / "o")])
    assert stop.value.code == 2
    assert "bad.png cannot be read" in capsys.readouterr().err
