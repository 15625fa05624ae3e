"""data.labels=predicted: image-level labels from the pipeline's own models, set without ground truth."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stableseg_pp.artifacts import load_stored_maps
from stableseg_pp.evaluation.image_labels import label_metrics
from stableseg_pp.fit import run
from stableseg_pp.methods.labelers.diffusion import MapAreaLabeler
from stableseg_pp.methods.labelers.thresholds import check_threshold, decide, otsu_threshold, split_threshold
from stableseg_pp.runtime.errors import ConfigError
from stableseg_pp.stages import labels as labels_step

SMALL = ["data.generate.n_train=8", "data.generate.n_val=6", "stage0.n_overlays=1", "data.batch_size=4", "data.num_workers=0"]


def test_map_area_labeler_on_a_known_case():
    """Two classes win a fifth of their images, two others a few stray pixels: Otsu's cut between them, on the
    scores alone, names exactly the large ones."""
    mask = np.zeros((20, 20), np.uint8)
    mask[:8, :10] = 1  # 80 px: 20%
    mask[10:18, 10:20] = 2  # 80 px
    mask[19, 0] = 3  # 1 px: 0.25%
    mask[19, 1:3] = 4  # 2 px
    labeler = MapAreaLabeler()
    scores = labeler.scores(mask, [1, 2, 3, 4, 5])
    assert scores == {1: 0.2, 2: 0.2, 3: 0.0025, 4: 0.005, 5: 0.0}
    others = [{1: 0.18, 3: 0.003}, {2: 0.22, 4: 0.004, 5: 0.001}, {1: 0.3, 2: 0.15}]
    threshold = labeler.fit_threshold([scores, *others])
    assert 0.005 < threshold <= 0.15
    assert labeler.decide(scores, threshold, has_background=True) == [1, 2]
    # nothing reaches it: background only, or (no background class) the top-scoring class
    assert labeler.decide({1: 0.001, 2: 0.002}, threshold, has_background=True) == []
    assert labeler.decide({1: 0.001, 2: 0.002}, threshold, has_background=False) == [2]
    assert MapAreaLabeler(threshold=0.1).fit_threshold(others) == 0.1
    assert otsu_threshold(np.array([0.0, 0.1, 0.2, 5.0, 5.1, 5.3])) == pytest.approx(2.65, abs=0.1)


def test_per_class_thresholds_split_each_class_on_its_own():
    """Classes score at different levels (class 1: 0.3 present, 0.1 absent; class 2: 0.05 and -0.15): one split of all
    scores names class 1 in every image; each class's own split over the images (or its scores less its absent level,
    then one split) names both classes exactly where they are."""
    rng = np.random.default_rng(0)
    present = rng.random((60, 2)) < 0.5
    values = np.stack([np.where(present[:, 0], 0.3, 0.1), np.where(present[:, 1], 0.05, -0.15)], 1)
    values += rng.normal(0, 0.01, (60, 2))
    rows = [{1: float(a), 2: float(b)} for a, b in values]
    overall = split_threshold("otsu", rows)
    assert all(1 in decide(r, overall, True) for r in rows)
    for rule in ("otsu_per_class", "otsu_centred"):
        per_class = split_threshold(rule, rows)
        assert sorted(per_class) == [1, 2] and per_class[1] > overall
        named = np.array([[c in decide(r, per_class, True) for c in (1, 2)] for r in rows])
        assert (named == present).all(), rule
        check_threshold(rule)
        # one score, or a class the split's threshold names nowhere (absent from every image: split in two, it would
        # be named in half of them): the split's threshold
        absent = [{**r, 3: float(v)} for r, v in zip(rows, rng.normal(-0.3, 0.01, 60), strict=True)]
        guarded = split_threshold(rule, absent)
        assert guarded[3] == split_threshold("otsu", absent) and not any(3 in decide(r, guarded, True) for r in absent)
        assert split_threshold(rule, [*rows, {4: 0.5}])[4] == split_threshold("otsu", [*rows, {4: 0.5}])


@pytest.mark.parametrize("settings", [{"threshold": 0}, {"threshold": 1.5}, {"threshold": "mean"}, {"min_pixels": 0}])
def test_map_area_labeler_refuses_bad_settings(settings):
    with pytest.raises(ConfigError, match="labeler."):
        MapAreaLabeler(**settings)


def test_label_metrics_on_a_hand_computed_example():
    truth = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0]], bool)
    named = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0]], bool)
    scores = np.array([[0.9, 0.6, 0.8], [0.4, 0.7, 0.1], [0.2, 0.1, 0.3], [0.8, 0.2, 0.2]], np.float32)
    m = label_metrics(truth, named, ["a", "b", "c"], scores)
    # a: tp 2, fp 0, fn 1 -> P 1, R 2/3, F1 0.8; b: tp 1, fp 1 -> P 0.5, R 1, F1 2/3; c: tp 1, fn 1 -> P 1, R 0.5
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "images": 3, "named": 2})
    assert m["per_class"]["b"]["f1"] == pytest.approx(2 / 3) and m["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert m["mean_f1"] == pytest.approx((0.8 + 2 / 3 + 2 / 3) / 3)
    assert m["exact_images"] == pytest.approx(0.25)  # only image 3 is named exactly
    # AP: every class's positives hold its highest scores (a: .9 .8 .4; b: .7; c: .8 .3) -> 1; then swap two of b's
    assert m["map"] == pytest.approx(1.0)
    scores[1, 1], scores[0, 1] = 0.5, 0.6  # b's positive now ranks second: AP 1/2
    assert label_metrics(truth, named, ["a", "b", "c"], scores)["map"] == pytest.approx((1 + 0.5 + 1) / 3)


def _labels_json(folder: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/labels.json"))}


@pytest.mark.slow
@pytest.mark.parametrize(("labeler", "family"), [("diffusion", "miniature_sd"), ("diffusion_maps", "miniature_sd"),
                                                 ("diffusion", "miniature_mmdit"), ("clip", "miniature_sd")])  # fmt: skip
def test_predicted_labels_end_to_end_without_ground_truth(compose_fit, miniature_model, monkeypatch, tmp_path, labeler,
                                                          family):  # fmt: skip
    """stage 0 with data.labels=predicted: the labels step (denoising errors on either family, stage 0's all-class
    masks, or a CLIP), its
    quality where ground truth exists, stage 0 prompting for the named classes; labels do not change when the ground
    truth does (no threshold reads it); a killed labels step resumes to the same labels without rewriting finished
    images."""
    fewer_times = ["labeler.times=[200,600]"] if labeler == "diffusion" else []
    if labeler == "clip":  # a tiny random CLIP, offline
        fewer_times = [f"labeler.model={_tiny_clip(tmp_path / 'clip')}"]
    cfg = compose_fit("stage=0", "data.labels=predicted", f"labeler={labeler}", f"diffusion={family}", *fewer_times, *SMALL)
    out = run(cfg)["0"]
    run_dir = out.parent
    (folder,) = run_dir.glob("labels-*")
    evidences = [p for p in run_dir.glob("stage0-*") if p != out]  # stage 0 with every class: the maps' evidence
    assert len(evidences) == (labeler == "diffusion_maps")
    evidence = evidences[0] if evidences else None
    assert json.loads((out / "key.json").read_text())["labels"] == folder.name
    first = _labels_json(folder)
    assert set(first) == {"train", "val"} and len(first["val"]["labels"]) == 6
    metrics = json.loads((folder / "metrics.json").read_text())["val"]
    assert 0 <= metrics["mean_f1"] <= 1 and 0 <= metrics["map"] <= 1 and set(metrics["per_class"]) <= {
        "circle", "square", "triangle", "star", "half moon", "cross"}  # fmt: skip
    record = json.loads((folder / "_COMPLETE.json").read_text())["splits"]["val"]
    assert record["images"] == 6 and record["no_class_named"] == sum(not c for c in first["val"]["labels"].values())
    assert len(list((folder / "val" / "scores").glob("*.json"))) == 6
    confidences = labels_step.read_confidences(folder)  # the denoising labels weigh the named classes in stage 0
    for split, written in first.items():
        assert ("confidence" in written) == (labeler == "diffusion")
        if labeler == "diffusion":
            assert {sid: sorted(row) for sid, row in confidences[split].items()} == written["labels"]
            assert all(0 <= v <= 1 for row in confidences[split].values() for v in row.values())
    # stage 0 prompted for the named classes: its stored class ids are the labels
    for sid, named in first["val"]["labels"].items():
        assert list(load_stored_maps(out / "val" / "maps" / f"{sid}.npz").class_ids) == named
    assert json.loads((out / "metrics.json").read_text())["val"]["protocol"]["labels"] == "predicted"

    # the ground truth shuffled among the val images: the same labels (only metrics.json reads it)
    masks = Path(cfg.data.root) / "SegmentationClass"
    val_ids = sorted(first["val"]["labels"])
    saved = {sid: (masks / f"{sid}.png").read_bytes() for sid in val_ids}
    for sid, other in zip(val_ids, val_ids[1:] + val_ids[:1], strict=True):
        (masks / f"{sid}.png").write_bytes(saved[other])
    shutil.rmtree(folder)
    assert labels_step.run(cfg, _dataset(cfg), evidence) == folder
    assert _labels_json(folder) == first
    for sid in val_ids:
        (masks / f"{sid}.png").write_bytes(saved[sid])

    # killed after three images' scores, then run again: the same labels, the finished files kept
    shutil.rmtree(folder)
    calls = {"n": 0}
    real = labels_step.write_json

    def dying(path, obj):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("killed")
        return real(path, obj)

    monkeypatch.setattr(labels_step, "write_json", dying)
    with pytest.raises(KeyboardInterrupt):
        labels_step.run(cfg, _dataset(cfg), evidence)
    monkeypatch.setattr(labels_step, "write_json", real)
    kept = {p: p.stat().st_mtime_ns for p in folder.rglob("scores/*.json")}
    assert len(kept) == 3 and not (folder / "_COMPLETE.json").exists()
    assert labels_step.run(cfg, _dataset(cfg), evidence) == folder
    assert _labels_json(folder) == first
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())


def _dataset(cfg):
    from stableseg_pp.data.description import describe_dataset

    return describe_dataset(cfg.data)


def test_predicted_labels_settings_are_checked_before_work(compose_fit):
    from stableseg_pp.fit import check_settings

    with pytest.raises(ConfigError, match="labeler.threshold=2"):
        check_settings(compose_fit("data.labels=predicted", "labeler.threshold=2"))
    with pytest.raises(ConfigError, match="data.labels=predicted: MAGNET"):
        check_settings(compose_fit("stage=magnet", "diffusion=miniature_mmdit", "data.labels=predicted"))
    with pytest.raises(ConfigError, match="data.labels=guess: use oracle"):
        check_settings(compose_fit("data.labels=guess"))


def test_an_image_named_nothing_is_prompted_for_nothing(tmp_path):
    """labels=predicted takes each image's classes from the labels, never from its mask; an image named nothing
    gets no class (stage 0 writes it as background), and a missing labels map is an error, not silence."""
    from stableseg_pp.data.layouts import FolderLayout
    from stableseg_pp.data.prompted_images import PromptedImages

    for folder in ("images", "masks"):
        (tmp_path / folder / "val").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "val" / "a.jpg")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "masks" / "val" / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "val" / "b.jpg")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "masks" / "val" / "b.png")
    layout = FolderLayout(tmp_path, image_dir="images/{split}", mask_dir="masks/{split}")
    images = PromptedImages(layout, "val", ["background", "x", "y"], 16, labels="predicted", predicted={"a": [2]})
    assert images.read("a").class_ids == [2] and images.read("b").class_ids == []
    with pytest.raises(ValueError, match="predicted classes"):
        PromptedImages(layout, "val", ["background", "x", "y"], 16, labels="predicted")


def test_the_results_table_names_the_label_protocol(compose_fit, tmp_path):
    from stableseg_pp.data.description import describe_dataset
    from stableseg_pp.stages.self_training import label_protocol, write_results

    for labels, expected in (("oracle", "oracle"), ("all", "all"), ("predicted", "predicted (diffusion, then segmenter)")):
        cfg = compose_fit(f"data.labels={labels}", "data.generate.n_train=2", "data.generate.n_val=2")
        assert label_protocol(cfg, describe_dataset(cfg.data)) == expected
    table = write_results(tmp_path, [("init (stage-0 masks)", tmp_path / "stage0-x")], [], "predicted (diffusion)")
    assert table[0]["labels"] == "predicted (diffusion)" and table[0]["val_miou"] is None
    text = (tmp_path / "results.md").read_text()
    assert "| init (stage-0 masks) | no masks | predicted (diffusion) | `stage0-x` |" in text
    assert "No val mIoU: no ground truth to score against" in text  # said plainly, with how to get a score


class _PromptedBackbone:
    """A backbone whose denoiser predicts the noise exactly for the prompts of the classes its image holds (error 1
    otherwise, 2 for the empty prompt): the labeler's answer is known. The image's row rides on its latent's value."""

    def __init__(self, present: dict[int, set[str]]):
        self.present = present

    def encode_captions(self, prompts):
        return list(prompts)

    def noise_to(self, latents, time, noise):
        return latents + noise

    def prediction_target(self, latents, noise, time):
        return noise

    def time_input(self, time, batch, device):
        return torch.full((batch,), time)

    def denoise(self, noisy, time, prompts):
        row = int(noisy[0].flatten()[0])  # the noise is 0 here (randn patched): the latent's value
        errors = [0.0 if p and p.removeprefix("a photo of a ") in self.present[row] else (1.0 if p else 2.0) for p in prompts]
        return torch.stack([torch.full_like(noisy[0], e) for e in errors])  # the noise (0) plus the error


def test_denoising_labeler_names_the_classes_whose_prompts_denoise_best(monkeypatch):
    from stableseg_pp.methods.labelers import diffusion

    monkeypatch.setattr(diffusion.torch, "randn", lambda shape, generator=None: torch.zeros(shape))
    backbone = _PromptedBackbone({0: {"circle"}, 1: {"square", "star"}, 2: set()})
    labeler = diffusion.DenoisingLabeler(times=[100, 500], leave_one_out=False)
    latents = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 2, 2).clone()
    scores = labeler.scores(backbone, latents, ["a", "b", "c"], ["circle", "square", "star"])
    # image 0: circle's prompt explains it (error 0), the others do not (1): circle above the mean, the others below
    assert scores[0, 0] > 0 > scores[0, 1] and scores[0, 1] == scores[0, 2]
    assert scores[1, 1] == scores[1, 2] > 0 > scores[1, 0]
    assert torch.allclose(scores[2], torch.zeros(3))  # nothing explains image 2 better than the rest
    rows = [dict(enumerate(r.tolist())) for r in scores]
    threshold = labeler.fit_threshold(rows)
    assert [labeler.decide(r, threshold, True) for r in rows] == [[0], [1, 2], []]
    with pytest.raises(ConfigError, match="labeler.times"):
        diffusion.DenoisingLabeler(times=[1000])
    with pytest.raises(ConfigError, match="labeler=diffusion: object cannot noise"):
        labeler.require(object())
    from stableseg_pp.backbones.sd3_mmdit import SD3Backbone
    from stableseg_pp.backbones.sd_unet import SDUNetBackbone

    for family in (SDUNetBackbone, SD3Backbone):  # both families noise an image to a chosen time
        labeler.require(family())


class _CountingBackbone(_PromptedBackbone):
    """A prompt's error: 1 per class the image holds that it does not name, 0.25 per class it names wrongly; the
    empty prompt 2."""

    def denoise(self, noisy, time, prompts):
        present = self.present[int(noisy[0].flatten()[0])]
        named = [set(p.removeprefix("a photo of a ").split(" and ")) if p else None for p in prompts]
        errors = [2.0 if n is None else len(present - n) + 0.25 * len(n - present) for n in named]
        return torch.stack([torch.full_like(noisy[0], e**0.5) for e in errors])  # squared: the error itself


def test_leave_one_out_adds_how_much_the_prompt_of_every_class_misses_each(monkeypatch):
    """With ``leave_one_out`` a class's score gains (error of every class but it - error of every class) / empty's;
    computed by hand for an image holding a circle, and one holding a square and a star."""
    from stableseg_pp.methods.labelers import diffusion

    monkeypatch.setattr(diffusion.torch, "randn", lambda shape, generator=None: torch.zeros(shape))
    backbone = _CountingBackbone({0: {"circle"}, 1: {"square", "star"}})
    latents = torch.arange(2, dtype=torch.float32).view(2, 1, 1, 1).expand(2, 1, 2, 2).clone()
    names, ids = ["circle", "square", "star"], ["a", "b"]
    alone = diffusion.DenoisingLabeler(times=[100], leave_one_out=False).scores(backbone, latents, ids, names)
    both = diffusion.DenoisingLabeler(times=[100], leave_one_out=True).scores(backbone, latents, ids, names)
    # image a, prompts alone: circle 0, square and star 1.25 (mean 5/6); every class 0.5, without the circle 1.5,
    # without the square or the star 0.25
    assert alone[0].tolist() == pytest.approx([(5 / 6) / 2, (5 / 6 - 1.25) / 2, (5 / 6 - 1.25) / 2])
    assert both[0].tolist() == pytest.approx([(5 / 6 + 1.0) / 2, (5 / 6 - 1.25 - 0.25) / 2, (5 / 6 - 1.25 - 0.25) / 2])
    # image b, alone: circle 2.25, square and star 1 (mean 17/12); every class 0.25, without the circle 0, without
    # the square or the star 1.25
    assert both[1].tolist() == pytest.approx([(17 / 12 - 2.25 - 0.25) / 2, *[(17 / 12 - 1 + 1.0) / 2] * 2])
    with pytest.raises(ConfigError, match="labeler.leave_one_out=1"):
        diffusion.DenoisingLabeler(leave_one_out=1)


def test_leave_one_out_needs_the_prompt_of_every_class_to_fit():
    """The prompt naming every class must fit the text encoder (checked from the tokenizer, before weights): else a
    one-line error that says to turn leave_one_out off; each class's own prompt must fit in any case."""
    from stableseg_pp.backbones.prompts import PromptTooLongError
    from stableseg_pp.methods.labelers.diffusion import DenoisingLabeler

    class _Tokenizer:  # fits prompts of at most 3 class names
        def check_prompt(self, names, template, joiner):
            if len(names) > 3 or any(len(n) > 20 for n in names):
                raise PromptTooLongError(f"{template.format(joiner.join(names))!r} is too long")

    names = ["circle", "square", "star", "cross"]
    DenoisingLabeler(leave_one_out=False).check_prompts(_Tokenizer(), names)
    DenoisingLabeler(leave_one_out=True).check_prompts(_Tokenizer(), names[:3])
    with pytest.raises(ConfigError, match=r"prompt naming all 4 classes does not fit .* labeler.leave_one_out=false"):
        DenoisingLabeler(leave_one_out=True).check_prompts(_Tokenizer(), names)
    with pytest.raises(PromptTooLongError):
        DenoisingLabeler(leave_one_out=False).check_prompts(_Tokenizer(), ["x" * 30])


def test_flow_matching_noise_to_a_time_is_the_schedulers_and_its_target_the_flow():
    """The MM-DiT's noising for the labeler: ``scale_noise`` of its own scheduler at that time, and the target from
    which the noisy latent goes back to the clean one (x0 = x_t - sigma * target)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stableseg_pp.backbones.sd3_mmdit import SD3Backbone

    backbone, schedule = SD3Backbone(), FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for index in (1, 5, 8):
        time, sigma = schedule.timesteps[index], float(schedule.sigmas[index])
        noisy = backbone.noise_to(clean, float(time), noise)
        torch.testing.assert_close(noisy, schedule.scale_noise(clean, time[None], noise))
        target = backbone.prediction_target(clean, noise, float(time))
        torch.testing.assert_close(noisy - sigma * target, clean, atol=1e-5, rtol=0)
        assert backbone.time_input(float(time), 2, torch.device("cpu")).tolist() == [float(time)] * 2


def test_the_segmenter_labeler_labels_round_one_with_its_first_labeler(compose_fit, tmp_path):
    """labeler=segmenter: round 1 (no segmenter yet) is labelled by first_round, the later rounds by the previous
    round's DeepLabV3+ (the classes it predicts over enough of an image); a first round that itself needs a segmenter
    is refused; the progress plan counts a labels step per round."""
    from stableseg_pp.config import build
    from stableseg_pp.methods.labelers.segmenter import SegmenterLabeler
    from stableseg_pp.stages import planned_steps

    cfg = compose_fit("data.labels=predicted", "labeler=segmenter")
    assert build(labels_step.round_labeler(cfg)).name == "diffusion"
    assert build(labels_step.round_labeler(cfg, tmp_path / "deeplab-x")).name == "segmenter"
    maps_first = compose_fit("data.labels=predicted", "labeler=segmenter", "labeler@labeler.first_round=diffusion_maps")
    assert build(labels_step.round_labeler(maps_first)).name == "diffusion_maps"
    labeler = build(cfg.labeler)  # score=peak: each class's peak probability, split as it is
    assert labeler.reads == "class_peaks"
    peaks = [{1: 0.02, 2: 0.97, 3: 0.61}, *({1: 0.05 * i, 2: 1 - 0.05 * i, 3: 0.9 - 0.8 * (i % 2)} for i in range(9))]
    assert labeler.scores(np.array([0.9, 0.02, 0.97, 0.61]), [1, 2, 3]) == peaks[0]
    threshold = labeler.fit_threshold(peaks)  # Otsu's split of every peak, no labels
    assert 0.45 < threshold < 0.55
    assert labeler.decide(peaks[0], threshold, True) == [2, 3]
    area = build(compose_fit("data.labels=predicted", "labeler=segmenter", "labeler.score=area").labeler)
    assert area.reads == "mask"
    mask = np.zeros((10, 10), np.uint8)
    mask[:3, :3], mask[0, 9] = 2, 3  # class 2 on 9 % of the image, class 3 on one pixel
    scores = area.scores(mask, [1, 2, 3])
    assert scores == {1: 0.0, 2: 0.09, 3: 0.01}
    assert area.decide(scores, 0.05, True) == [2]
    with pytest.raises(ConfigError, match="labeler.score='mean'"):
        SegmenterLabeler(first_round=build(cfg.labeler.first_round), score="mean")
    with pytest.raises(ConfigError, match="labeler.first_round"):
        SegmenterLabeler(first_round=labeler)
    # steps: labels, stage 0, CRF, DeepLabV3+ | weights, round 1's labels again (the second opinion, found),
    # labels (from the segmenter), stage 0, CRF, DeepLabV3+
    assert planned_steps(compose_fit("stage=all", "data.labels=predicted", "labeler=segmenter")) == 10
    assert planned_steps(compose_fit("stage=all", "data.labels=predicted", "labeler=segmenter", "labeler.doubt=null")) == 9
    # the maps labeler: its evidence (stage 0 with every class) and labels in round 1, reused in round 2
    assert planned_steps(compose_fit("stage=all", "data.labels=predicted", "labeler=diffusion_maps")) == 11


def test_the_segmenter_settles_the_classes_in_doubt_with_round_ones_scores(compose_fit):
    """A class whose peak lies in [doubt x threshold, threshold) is named where round 1's score for it reaches the cut
    that separates round 1's scores of the images this round is sure of (no labels read); sure decisions and peaks
    below the band stay as they are; doubt=null is the peaks alone; a bad doubt is one config line."""
    from stableseg_pp.config import build
    from stableseg_pp.methods.labelers.segmenter import SegmenterLabeler, separating_cut

    labeler = build(compose_fit("data.labels=predicted", "labeler=segmenter").labeler)
    assert labeler.second_opinion and labeler.doubt == 0.5
    # class 1: sure there (peak 0.9) where round 1 scored 5 or 6, sure absent (0.05) where it scored 1 or 2
    peaks = {"a": 0.9, "b": 0.9, "c": 0.05, "d": 0.05, "e": 0.3, "f": 0.3, "g": 0.1, "h": 0.45}
    first = {"a": 5.0, "b": 6.0, "c": 1.0, "d": 2.0, "e": 4.5, "f": 2.5, "g": 9.0, "h": 3.0}
    scores = {sid: {1: p, 2: 0.0} for sid, p in peaks.items()}
    firsts = {sid: {1: v, 2: 0.0} for sid, v in first.items()}
    labels = {sid: labeler.decide(scores[sid], 0.5, True) for sid in scores}
    settled, cuts = labeler.reconsider(scores, 0.5, labels, firsts)
    assert cuts == {1: 3.5}  # the middle of the gap between 2 (absent) and 5 (there); class 2 has no sure case
    # e (peak 0.3, round 1: 4.5) is named; f (2.5, under the cut) and g (peak under the band) are not; h: 3.0 < 3.5
    assert {sid for sid, named in settled.items() if 1 in named} == {"a", "b", "e"}
    assert labels["e"] == [] and settled["e"] == [1]
    # overlapping groups: cuts at 0.175 and 0.55 each misplace one score (balanced accuracy 5/6): their middle
    assert separating_cut(np.array([0.8, 0.9, 0.2]), np.array([0.1, 0.15, 0.3])) == pytest.approx(0.3625)
    assert separating_cut(np.array([1.0]), np.array([1.0])) == 1.0
    # the images named nothing are counted; without a background class they get their top class, and still count
    assert labels_step.no_class_named(labeler, scores, 0.5, settled, True) == ["c", "d", "f", "g", "h"]
    top = {sid: labeler.decide(scores[sid], 0.5, False) for sid in scores}
    assert top["c"] == [1] and top["e"] == [1]
    assert labels_step.no_class_named(labeler, scores, 0.5, top, False) == ["c", "d", "e", "f", "g", "h"]
    peaks_only = build(compose_fit("data.labels=predicted", "labeler=segmenter", "labeler.doubt=null").labeler)
    assert not peaks_only.second_opinion
    with pytest.raises(ConfigError, match="labeler.doubt=1.5"):
        SegmenterLabeler(first_round=build(compose_fit("labeler=diffusion").labeler), doubt=1.5)


def test_the_segmenter_writes_each_class_peak_probability_with_its_masks(tmp_path):
    """The DeepLabV3+ prediction writer stores each class's highest probability over the image (the segmenter
    labeler's evidence) with the mask and confidence; a step folder without them is one clear error."""
    import torch

    from stableseg_pp.artifacts import MaskSetLayout, SegmenterMaskWriter

    probs = torch.rand(2, 4, 6, 5).softmax(1)
    layout = MaskSetLayout(tmp_path / "deeplab-x" / "train")
    SegmenterMaskWriter(layout, ["a", "b"]).write_on_batch_end(None, None, (probs, torch.tensor([0, 1])), None, None, 0)
    for j, sid in enumerate(["a", "b"]):
        assert layout.is_done(sid)
        expected = probs[j].flatten(1).amax(1)
        assert np.allclose(layout.read_class_peaks(sid), expected.numpy(), atol=1e-6)
        assert labels_step.READERS["class_peaks"](layout, sid).shape == (4,)
    layout.class_peaks_path("a").unlink()
    with pytest.raises(FileNotFoundError, match="deeplab-x predates class peaks"):
        layout.read_class_peaks("a")


def test_peak_confidences_reach_stage_zero_as_class_weights(compose_fit, tmp_path):
    """A labeler whose scores are probabilities (the segmenter's peaks) has its confidence in each named class
    written with the labels and read back by class id; stage 0 batches them as (images, classes) weights, 1 where
    an image has none, and none at all when no image has any (the paper's stage 0)."""
    import torch

    from stableseg_pp.config import build
    from stableseg_pp.data.prompted_images import Sample
    from stableseg_pp.models.zero_shot_module import class_weights
    from stableseg_pp.runtime.atomic import write_json

    write_json(tmp_path / "train" / labels_step.LABELS_FILE,
               {"threshold": 0.5, "labels": {"a": [2, 5]}, "confidence": {"a": {"2": 0.9, "5": 0.6}}})  # fmt: skip
    write_json(tmp_path / "val" / labels_step.LABELS_FILE, {"threshold": 0.5, "labels": {"b": [1]}})
    assert labels_step.read_confidences(tmp_path) == {"train": {"a": {2: 0.9, 5: 0.6}}, "val": {}}
    assert labels_step.read_labels(tmp_path) == {"train": {"a": [2, 5]}, "val": {"b": [1]}}
    from stableseg_pp.data.description import describe_dataset

    dataset = describe_dataset(compose_fit("data.labels=predicted").data, splits=[])
    ids = ["val_00000", "val_00001"]
    named = {"val_00000": [2, 5], "val_00001": [1]}
    images = dataset.prompted_images("val", ids, 32, named, {"val_00000": {2: 0.9, 5: 0.6}})
    assert images[0].class_weights == [0.9, 0.6] and images[0].class_ids == [2, 5]
    assert images[1].class_weights is None  # no confidence for this image: all alike
    assert dataset.prompted_images("val", ids, 32, named)[0].class_weights is None
    pixels, image = torch.zeros(3, 4, 4), np.zeros((4, 4, 3), np.uint8)
    weighted = Sample("a", pixels, image, None, [2, 5], [0.9, 0.6])
    plain = Sample("b", pixels, image, None, [1, 3, 4])
    assert class_weights([plain]) is None
    assert torch.allclose(class_weights([weighted, plain]), torch.tensor([[0.9, 0.6, 1.0], [1.0, 1.0, 1.0]]))
    node = {"_target_": "stableseg_pp.methods.labelers.segmenter.SegmenterLabeler",
            "first_round": {"_target_": "stableseg_pp.methods.labelers.diffusion.DenoisingLabeler"}}  # fmt: skip
    labeler = build(node)
    assert labeler.confidences and not build({**node, "weigh_maps": False}).confidences
    # confidence: a peak over the class's median peak where it is named, at most 1, to the power weight_power
    peaks = {"a": {1: 0.9, 2: 0.3}, "b": {1: 0.45, 2: 0.6}, "c": {1: 1.0, 2: 0.01}}
    named = {"a": [1, 2], "b": [1, 2], "c": [1]}
    assert build({**node, "weight_power": 1}).confidence(peaks, named) == {
        "a": {1: 1.0, 2: pytest.approx(0.3 / 0.45)},
        "b": {1: 0.5, 2: 1.0},
        "c": {1: 1.0},
    }
    assert labeler.confidence(peaks, named) == {  # the default: the square root
        "a": {1: 1.0, 2: pytest.approx((0.3 / 0.45) ** 0.5)},
        "b": {1: pytest.approx(0.5**0.5), 2: 1.0},
        "c": {1: 1.0},
    }
    with pytest.raises(ConfigError, match="labeler.weight_power=0"):
        build({**node, "weight_power": 0})
    assert not build({**node, "score": "area"}).confidences  # areas are not probabilities
    with pytest.raises(ConfigError, match="labeler.weigh_maps='yes'"):
        build({**node, "weigh_maps": "yes"})


def _tiny_clip(folder: Path) -> Path:
    """A randomly initialised CLIP with the miniature U-Net's tokenizer and a 32-pixel image processor."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    from stableseg_pp.backbones.loading import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(Path(resolve_model_path("miniature_sd")) / "tokenizer")
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **small,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_relative_confidence_places_a_score_between_the_class_absent_and_named_levels():
    """A named class's confidence: (score - its median where not named) / (its median where named - that), in
    [0, 1]; with ``absent_at_zero`` the absent level is 0 (peaks); a class named everywhere counts fully. The
    denoising labeler gives its labels these confidences unless ``weigh_maps=false``."""
    from stableseg_pp.methods.labelers.diffusion import DenoisingLabeler
    from stableseg_pp.methods.labelers.thresholds import relative_confidence

    scores = {"a": {1: 0.5, 2: 0.3}, "b": {1: 0.3, 2: 0.1}, "c": {1: 0.2, 2: 0.2}, "d": {1: 0.0, 2: -0.2}}
    labels = {"a": [1, 2], "b": [1, 2], "c": [2], "d": [2]}
    # class 1: named in a, b (median 0.4), absent in c, d (median 0.1); class 2 named everywhere
    assert relative_confidence(scores, labels) == {
        "a": {1: 1.0, 2: 1.0}, "b": {1: pytest.approx(0.2 / 0.3), 2: 1.0}, "c": {2: 1.0}, "d": {2: 1.0}}  # fmt: skip
    at_zero = relative_confidence(scores, labels, absent_at_zero=True)
    assert at_zero["b"] == {1: pytest.approx(0.3 / 0.4), 2: pytest.approx(0.1 / 0.15)} and at_zero["d"] == {2: 0.0}
    assert DenoisingLabeler().confidences and not DenoisingLabeler(weigh_maps=False).confidences
    assert DenoisingLabeler().confidence(scores, {"a": [1], "b": [1], "c": [], "d": []})["b"] == {1: pytest.approx(2 / 3)}
    with pytest.raises(ConfigError, match="labeler.weigh_maps=1"):
        DenoisingLabeler(weigh_maps=1)


def test_a_nested_labelers_error_names_its_own_key(compose_fit):
    """The segmenter's round-1 labeler is a nested node: its errors name ``labeler.first_round.<key>``, the key the
    user wrote, though the labeler's own message names its settings as ``labeler.<key>``; the top node's own errors
    are unchanged."""
    from stableseg_pp.config import build

    with pytest.raises(ConfigError, match=r"^labeler.first_round.weigh_maps='yes': use true or false$"):
        build(compose_fit("data.labels=predicted", "labeler.first_round.weigh_maps=yes").labeler)
    with pytest.raises(ConfigError, match=r"^labeler.weigh_maps='yes': use true or false$"):
        build(compose_fit("data.labels=predicted", "labeler.weigh_maps=yes").labeler)


def test_clip_labeler_scores_are_the_models_similarities_relative_to_the_classes(tmp_path):
    """labeler=clip on a tiny random CLIP (offline): each score is the image-prompt cosine similarity minus its mean
    over the classes, as the model's own processor and features give it."""
    from transformers import AutoModel, AutoProcessor

    from stableseg_pp.methods.labelers.clip import ClipLabeler

    folder = _tiny_clip(tmp_path / "clip")
    labeler = ClipLabeler(model=str(folder))
    labeler.load(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1  # already at the model's side: no resampling
    names = ["circle", "square", "half moon"]
    scores = labeler.score_pictures(pixels, ["a", "b", "c"], names)
    assert scores.shape == (3, 3) and torch.allclose(scores.sum(1), torch.zeros(3), atol=1e-6)

    model, processor = AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    pictures = [((p + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy() for p in pixels]
    inputs = processor(text=[f"a photo of a {n}" for n in names], images=pictures, return_tensors="pt",
                       padding="max_length")  # fmt: skip
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    image = image if isinstance(image, torch.Tensor) else image.pooler_output
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    cosine = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    torch.testing.assert_close(scores, cosine - cosine.mean(1, keepdim=True), atol=2e-3, rtol=0)  # 8-bit pictures
    assert labeler.identity()["folder"] == "clip"
    with pytest.raises(ConfigError, match="labeler.model=.*missing.*cannot load it"):
        ClipLabeler(model=str(tmp_path / "missing")).load(torch.device("cpu"))
