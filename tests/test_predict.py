"""The trained segmenter is usable: `predict` and the exported model give the LightningModule's masks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from stableseg_pp.data.miniature import CLASS_NAMES, draw_sample
from stableseg_pp.data.pairs import ImageMaskPairs, eval_transform
from stableseg_pp.evaluation.site_plots import short_site_labels
from stableseg_pp.models.deeplab import DeepLabV3PlusModule
from stableseg_pp.pictures import legend_strip, overlay_png, present_classes
from stableseg_pp.predict import main, predict_mask


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small DeepLabV3+ after a few steps, saved as a step folder's last.ckpt."""
    folder = tmp_path_factory.mktemp("deeplab-test")
    L.seed_everything(0)
    module = DeepLabV3PlusModule(CLASS_NAMES, encoder_name="resnet18", lr=0.05)
    samples = [draw_sample(s) for s in range(8)]
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in samples])
    masks = torch.stack([torch.from_numpy(s.mask.astype(np.int64)) for s in samples])
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, DataLoader(TensorDataset(images, masks), batch_size=4))
    trainer.save_checkpoint(folder / "checkpoints" / "last.ckpt")
    return folder, module.eval()


def _module_masks(module, paths):
    """What the pipeline's own prediction path gives (eval transform, predict_step, argmax of the probabilities)."""
    ds = ImageMaskPairs(paths, None, len(CLASS_NAMES), eval_transform())
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        probs, _ = module.predict_step((images, torch.arange(len(ds))), 0)
    return probs.argmax(1).to(torch.uint8).numpy()


def test_predict_and_export_match_the_lightning_module(trained, tmp_path):
    folder, module = trained
    paths = []
    for s in (20, 21, 22):
        p = tmp_path / "in" / f"pic{s}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(draw_sample(s).image).save(p)
        paths.append(p)
    out = tmp_path / "out"
    main([str(folder), *map(str, paths), "--out", str(out), "--export", str(tmp_path / "seg.pt2"), "--export-size", "64"])
    expected = _module_masks(module, paths)
    for p, ref in zip(paths, expected, strict=True):
        got = np.array(Image.open(out / f"{p.stem}_mask.png"))
        np.testing.assert_array_equal(got, ref)
    assert json.loads((out / "classes.json").read_text())["5"] == CLASS_NAMES[5]

    # the documented loader (stableseg_pp/export.py), in a process that imports torch only
    loader = f"""
import json, sys, torch
extra = {{"stableseg_pp.json": ""}}
program = torch.export.load({str(tmp_path / "seg.pt2")!r}, extra_files=extra)
info = json.loads(extra["stableseg_pp.json"])
images = torch.load({str(tmp_path / "batch.pt")!r})
torch.save(program.module()(images), {str(tmp_path / "ids.pt")!r})
print(json.dumps(info))
assert not [m for m in sys.modules if m.startswith(("stableseg_pp", "lightning", "segmentation_models_pytorch"))]
"""
    batch = torch.stack([torch.from_numpy(draw_sample(s).image).permute(2, 0, 1) for s in (20, 21, 22)])
    torch.save(batch, tmp_path / "batch.pt")
    done = subprocess.run([sys.executable, "-c", loader], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["class_names"] == list(CLASS_NAMES) and info["input_size"] == 64
    np.testing.assert_array_equal(torch.load(tmp_path / "ids.pt").numpy(), expected.astype(np.int64))


def test_predict_refuses_a_folder_without_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path), str(tmp_path / "x.png"), "--out", str(tmp_path / "o")])
    assert stop.value.code == 2 and "not a checkpoint file nor a DeepLabV3+ step folder" in capsys.readouterr().err


class _RunsCodeWhenLoaded:
    """Unpickling this calls ``Path.touch`` on ``marker``: what a hostile checkpoint could do with any function."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_predict_reads_weights_only_and_refuses_pickled_code(trained, tmp_path, capsys):
    folder, _ = trained
    state = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)  # the trained checkpoint: plain data
    marker = tmp_path / "code-ran"
    state["hyper_parameters"]["note"] = _RunsCodeWhenLoaded(marker)
    hostile = tmp_path / "hostile.ckpt"
    torch.save(state, hostile)
    pic = tmp_path / "p.png"
    Image.fromarray(draw_sample(3).image).save(pic)
    with pytest.raises(SystemExit) as stop:
        main([str(hostile), str(pic), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "holds Python objects besides weights" in err and "--trust-checkpoint" in err
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_predict_checks_its_inputs_before_loading_the_checkpoint(trained, tmp_path, capsys, monkeypatch):
    folder, _ = trained
    monkeypatch.setattr(DeepLabV3PlusModule, "load_from_checkpoint", lambda *a, **k: pytest.fail("the checkpoint loaded"))
    with pytest.raises(SystemExit) as stop:
        main([str(folder), str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")])
    assert stop.value.code == 2 and "missing.png does not exist" in capsys.readouterr().err


def test_overlays_have_titles_and_a_legend_of_the_classes_present():
    sample = draw_sample(3)
    picture = overlay_png(sample.image, sample.mask, sample.mask, class_names=CLASS_NAMES, mask_title="pseudo-masks")
    side = 64 * 3  # enlarged to at least 192 px per panel
    assert picture.size[0] >= 3 * side and picture.size[1] > side + 30  # titles above, a legend below
    present = present_classes([sample.mask], CLASS_NAMES)
    assert present[0] == "background" and set(present) == set(np.unique(sample.mask).tolist()) - {255}
    legend = legend_strip({1: "circle", 2: "square"}, None, 400)
    assert 0 < legend.height < 40  # one row for two names
    assert legend_strip({k: f"a long class name {k}" for k in range(1, 21)}, None, 400).height > 3 * legend.height


def test_site_labels_are_short_and_distinct():
    unet = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2", "mid_block.attentions.0.transformer_blocks.0.attn2",
            "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]  # fmt: skip
    assert short_site_labels(unet) == ["down.0.att.0", "mid.att.0", "up.1.att.1"]
    assert short_site_labels([f"transformer_blocks.{i}.attn" for i in range(3)]) == ["block.0", "block.1", "block.2"]


def test_a_picture_far_larger_than_the_training_is_predicted_at_the_training_scale():
    """eval_max_side: a picture whose shorter side is past it is predicted scaled down to it, logits back at its
    size; pictures within it, and modules without it (older checkpoints), predict at their own size."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    module = DeepLabV3PlusModule(CLASS_NAMES, encoder_name="resnet18", eval_max_side=32).eval()
    big, small = torch.randn(1, 3, 96, 128), torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        scaled = F.interpolate(big, size=(32, 43), mode="bilinear", align_corners=False, antialias=True)
        expected = F.interpolate(module(scaled), size=(96, 128), mode="bilinear", align_corners=False)
        assert torch.allclose(module.predict_logits(big), expected)
        assert torch.equal(module.predict_logits(small), module(small))
        module.hparams.eval_max_side = None
        assert torch.equal(module.predict_logits(big), module(big))
    assert predict_mask(module, np.zeros((96, 128, 3), np.uint8)).shape == (96, 128)
