"""Boundary F-score and the unsupervised (Hungarian-matched) protocol, alone and through `evaluate_masks`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stableseg_pp.artifacts import MaskSetLayout
from stableseg_pp.data.description import describe_dataset
from stableseg_pp.data.palette import save_palette_png
from stableseg_pp.evaluation.boundary import BoundaryFScore, boundary_counts, boundary_pixels, scores_from_counts
from stableseg_pp.evaluation.hungarian import UnsupervisedMetrics, match_segments
from stableseg_pp.evaluation.mask_sets import evaluate_masks, report_split
from stableseg_pp.evaluation.miou import SegmentationMetrics
from stableseg_pp.runtime.errors import ConfigError


def _square(shift: int = 0, size: int = 32) -> np.ndarray:
    labels = np.zeros((size, size), dtype=np.uint8)
    labels[8:20, 8 + shift : 20 + shift] = 1
    return labels


def _boundary(pred, target, tolerance) -> dict:
    metric = BoundaryFScore(tolerance)
    metric.update(pred, target)
    return metric.compute()


# --- boundary F-score ---------------------------------------------------------------------------------------


def test_boundary_pixels_are_both_sides_of_a_4_neighbour_change():
    edge = boundary_pixels(_square())
    assert edge[8, 8:20].all() and edge[7, 8:20].all() and edge[19, 8:20].all() and edge[20, 8:20].all()
    assert not edge[7, 7] and not edge[12, 12] and not edge[0].any()  # diagonal corner, inside, image border
    assert edge.sum() == 4 * 12 + 4 * 12 - 4  # outer ring without corners + inner ring


def test_a_square_shifted_by_one_pixel_matches_within_one_pixel_only():
    gt, pred = _square(), _square(shift=1)
    assert _boundary(pred, gt, 1)["boundary_f"] == 1.0
    exact = _boundary(pred, gt, 0)
    assert exact["boundary_f"] < 1 and exact["boundary_precision"] < 1 and exact["boundary_recall"] < 1
    assert _boundary(gt, gt, 0)["boundary_f"] == 1.0
    assert exact["boundary_tolerance_px"] == 0


def test_a_spurious_edge_lowers_precision_not_recall():
    gt = _square()
    pred = gt.copy()
    pred[26:29, 2:30] = 2  # a stripe far from every ground-truth edge
    result = _boundary(pred, gt, 2)
    assert result["boundary_recall"] == 1.0 and result["boundary_precision"] < 1
    assert result["boundary_f"] == pytest.approx(2 * result["boundary_precision"] / (1 + result["boundary_precision"]))


def test_the_255_band_is_not_a_boundary_and_predicted_edges_inside_it_are_not_counted():
    gt = np.zeros((10, 12), dtype=np.uint8)
    gt[:, 5:7] = 255
    gt[:, 7:] = 1
    counts = boundary_counts(gt, gt, 0)
    assert counts[3] == 20  # columns 4 and 7: the labelled pixels beside the band, not the band
    # a large ignored region: whatever the prediction draws well inside it does not change any count
    gt = np.zeros((40, 40), dtype=np.uint8)
    gt[5:15, 5:15] = 1
    gt[20:38, 20:38] = 255
    clean = np.where(gt == 255, 0, gt).astype(np.uint8)
    busy = clean.copy()
    busy[24:34:2, 24:34] = 3  # stripes, more than the tolerance away from the ignored region's border
    assert np.array_equal(boundary_counts(busy, gt, 2), boundary_counts(clean, gt, 2))
    labelled = np.where(gt == 255, 0, gt)  # the same stripes on labelled pixels are counted
    assert boundary_counts(busy, labelled, 2)[1] > boundary_counts(clean, labelled, 2)[1]


def test_counts_are_summed_over_the_split_and_empty_cases_do_not_crash():
    assert all(math.isnan(v) for k, v in BoundaryFScore(2).compute().items() if k != "boundary_tolerance_px")
    flat = np.zeros((8, 8), dtype=np.uint8)
    assert math.isnan(_boundary(flat, flat, 2)["boundary_f"])  # no boundary on either side: contributes nothing
    missed = _boundary(np.zeros((16, 16), dtype=np.uint8), _square(size=32)[:16, :16], 2)  # ground-truth edges, none predicted
    assert (missed["boundary_precision"], missed["boundary_recall"], missed["boundary_f"]) == (1.0, 0.0, 0.0)
    big_gt, big_pred = _square(size=64), _square(size=64)
    small_gt = np.zeros((16, 16), dtype=np.uint8)
    small_gt[4:8, 4:8] = 1
    small_pred = np.zeros_like(small_gt)
    small_pred[10:14, 10:14] = 1
    metric = BoundaryFScore(1)
    metric.update(torch.from_numpy(big_pred), torch.from_numpy(big_gt))
    metric.update(small_pred, small_gt)
    total = boundary_counts(big_pred, big_gt, 1) + boundary_counts(small_pred, small_gt, 1)
    assert metric.compute() == scores_from_counts(total, 1)
    per_image_mean = (_boundary(big_pred, big_gt, 1)["boundary_f"] + _boundary(small_pred, small_gt, 1)["boundary_f"]) / 2
    assert metric.compute()["boundary_f"] > per_image_mean + 0.1  # pixel counts weigh, not images


def test_boundary_tolerance_must_be_a_non_negative_number():
    for bad in (-1, "2", True, float("nan")):
        with pytest.raises(ValueError, match="non-negative"):
            BoundaryFScore(bad)
    with pytest.raises(ValueError, match="one size"):
        boundary_counts(np.zeros((4, 4)), np.zeros((4, 5)), 1)


# --- Hungarian matching -------------------------------------------------------------------------------------


def _blocks(seed: int = 0, classes: int = 5, size: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, classes, (size // 4, size // 4)), np.ones((4, 4), dtype=np.int64)).astype(np.uint8)


def test_a_relabelled_ground_truth_is_recovered_exactly():
    names = ["background", "a", "b", "c", "d"]
    perm = np.array([3, 0, 4, 1, 2])  # class -> segment id
    metrics = UnsupervisedMetrics(names, background_index=0, per_image=True)
    for seed in range(3):
        gt = _blocks(seed)
        metrics.update(perm[gt].astype(np.uint8), gt)
    result = metrics.compute()
    assert result["miou"] == 1.0 and result["pixel_accuracy"] == 1.0 and result["miou_per_image_matching"] == 1.0
    assert result["assignment"] == {int(s): names[c] for c, s in enumerate(perm)}
    assert result["segments"] == 5 and set(result["per_class_iou"]) == set(names)


def test_the_matching_maximises_the_matched_pixels():
    assert match_segments(np.array([[5, 4], [4, 0]])) == {1: 0, 0: 1}  # 8 pixels; greedy would take 5 + 0
    noisy = np.array([[10, 2, 0], [1, 0, 8], [0, 7, 3]])
    assert match_segments(noisy) == {0: 0, 2: 1, 1: 2}
    assert match_segments(torch.from_numpy(noisy)) == {0: 0, 2: 1, 1: 2}
    assert match_segments(np.zeros((3, 0))) == {}


def test_unmatched_segments_and_no_segment_count_as_wrong():
    gt = np.zeros((4, 10), dtype=np.uint8)
    gt[:, 5:] = 1  # 20 px of each class
    pred = np.zeros_like(gt)
    pred[:, 5:] = 1
    pred[:, 9] = 2  # a third segment: 4 px of class 1, left unmatched
    pred[0, 0] = 255  # no segment: 1 px of class 0 missed
    metrics = UnsupervisedMetrics(["background", "thing"], background_index=0)
    metrics.update(pred, gt)
    result = metrics.compute()
    assert result["assignment"] == {0: "background", 1: "thing"} and result["segments"] == 3
    assert result["per_class_iou"] == {"background": 19 / 20, "thing": 16 / 20}
    assert result["pixel_accuracy"] == pytest.approx(35 / 40) and result["pixels"] == 40
    assert result["miou"] == pytest.approx((19 / 20 + 16 / 20) / 2) and result["miou_without_background"] == 16 / 20
    assert "miou_per_image_matching" not in result


def test_fewer_segments_than_classes_leave_a_class_unmatched():
    gt = np.repeat(np.array([[0, 1, 2]], dtype=np.uint8), 4, axis=0).repeat(3, axis=1)  # 12 px of each class
    pred = np.where(gt == 2, 1, 0).astype(np.uint8)  # classes 0 and 1 merged into segment 0
    metrics = UnsupervisedMetrics(["a", "b", "c"], background_index=None)
    metrics.update(pred, gt)
    result = metrics.compute()
    assert result["assignment"][1] == "c" and result["assignment"][0] in ("a", "b")
    assert sorted(result["per_class_iou"].values()) == [0.0, 0.5, 1.0]
    assert result["miou"] == pytest.approx(0.5)


def test_per_image_matching_can_cheat_where_split_matching_cannot():
    gt = np.zeros((4, 8), dtype=np.uint8)
    gt[:, 4:] = 1
    metrics = UnsupervisedMetrics(["left", "right"], background_index=None, per_image=True)
    metrics.update(gt, gt)  # image 1: segment 0 left, 1 right
    metrics.update(1 - gt, gt)  # image 2: the ids swapped
    result = metrics.compute()
    assert result["miou_per_image_matching"] == 1.0 and result["pixel_accuracy_per_image_matching"] == 1.0
    assert result["miou"] == pytest.approx(1 / 3) and result["pixel_accuracy"] == 0.5


def test_supervised_metrics_unchanged_by_the_unsupervised_path_on_class_id_masks():
    """Sanity: class ids scored as identity-matched segments give the supervised numbers when the matching is the
    identity (every class predicted mostly as itself)."""
    names = ["background", "a", "b", "c", "d"]
    supervised = SegmentationMetrics(names, background_index=0, sync=False)
    unsupervised = UnsupervisedMetrics(names, background_index=0)
    rng = np.random.default_rng(3)
    for seed in range(3):
        gt = _blocks(seed)
        pred = np.where(rng.random(gt.shape) < 0.2, rng.integers(0, 5, gt.shape), gt).astype(np.uint8)
        supervised.update(torch.from_numpy(pred), torch.from_numpy(gt))
        unsupervised.update(pred, gt)
    a, b = supervised.compute(), unsupervised.compute()
    assert b["assignment"] == dict(enumerate(names))
    for key in ("miou", "miou_without_background", "pixel_accuracy", "pixels"):
        assert a[key] == pytest.approx(b[key]), key
    assert a["per_class_iou"] == pytest.approx(b["per_class_iou"])


# --- evaluate_masks on a written mask set -------------------------------------------------------------------

NAMES = ["background", "cat", "dog"]


def _voc_folder(root: Path, gts: dict[str, np.ndarray]) -> None:
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for sid, gt in gts.items():
        Image.fromarray(np.zeros((*gt.shape, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{sid}.jpg")
        save_palette_png(gt, root / "SegmentationClass" / f"{sid}.png")
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{sid}\n" for sid in gts))


def _ground_truths() -> dict[str, np.ndarray]:
    a = np.zeros((16, 16), dtype=np.uint8)
    a[2:9, 2:9] = 1
    a[9, 2:9] = 255  # a VOC-style ignore band below the cat
    b = np.zeros((16, 16), dtype=np.uint8)
    b[6:14, 4:12] = 2
    b[0:3, 0:3] = 1
    return {"img_a": a, "img_b": b}


def _dataset(compose_fit, *overrides):
    names = ",".join(NAMES)
    cfg = compose_fit("data=voc", f"data.class_names=[{names}]", *overrides)
    cfg.data.prompt_names = {}
    return describe_dataset(cfg.data, ["val"])


def _write_masks(folder: Path, masks: dict[str, np.ndarray]) -> MaskSetLayout:
    layout = MaskSetLayout(folder)
    layout.masks.mkdir(parents=True, exist_ok=True)
    for sid, mask in masks.items():
        save_palette_png(mask, layout.mask_path(sid))
    return layout


def test_evaluate_masks_writes_the_boundary_f_score_and_scores_segments_under_the_unsupervised_protocol(tmp_path, compose_fit):
    gts = _ground_truths()
    _voc_folder(tmp_path / "data" / "VOCdevkit" / "VOC2012", gts)
    ids = list(gts)

    # supervised: class-id masks (the cat shifted by a pixel); mIoU exactly as SegmentationMetrics gives it
    dataset = _dataset(compose_fit)
    assert dataset.boundary_tolerance == 2 and dataset.evaluation_protocol == "supervised"
    preds = {"img_a": np.roll(np.where(gts["img_a"] == 255, 0, gts["img_a"]), 1, axis=1).astype(np.uint8), "img_b": gts["img_b"]}
    masks = _write_masks(tmp_path / "stage0" / "val", preds)
    result = evaluate_masks(dataset, "val", ids, masks)
    direct = SegmentationMetrics(NAMES, background_index=0, sync=False)
    boundary = BoundaryFScore(2)
    for sid in ids:
        direct.update(torch.from_numpy(preds[sid]), torch.from_numpy(gts[sid]))
        boundary.update(preds[sid], gts[sid])
    assert {k: result[k] for k in ("miou", "miou_without_background", "pixel_accuracy", "per_class_iou")} == {
        k: direct.compute()[k] for k in ("miou", "miou_without_background", "pixel_accuracy", "per_class_iou")
    }
    assert {k: result[k] for k in boundary.compute()} == boundary.compute()
    assert result["boundary_f"] == 1.0 and result["boundary_tolerance_px"] == 2
    assert "segments" not in result["protocol"] and "assignment" not in result

    # the tolerance and the protocol leave the dataset's content key (so every step folder's hash) unchanged
    strict = _dataset(compose_fit, "data.boundary_tolerance=0", "data.protocol=unsupervised")
    assert strict.key() == dataset.key() and "boundary_tolerance" not in dataset.key() and "protocol" not in dataset.key()
    assert evaluate_masks(_dataset(compose_fit, "data.boundary_tolerance=0"), "val", ids, masks)["boundary_f"] < 1

    # unsupervised: segment ids (a permutation of the classes) are matched back to the classes over the split
    unsupervised = _dataset(compose_fit, "data.protocol=unsupervised")
    perm = np.array([2, 0, 1], dtype=np.uint8)  # class -> segment id
    segments = _write_masks(tmp_path / "kmeans" / "val", {sid: np.where(gt == 255, 255, perm[gt % 3]) for sid, gt in gts.items()})
    entry = report_split("kmeans", unsupervised, "val", ids, segments)
    result = entry["metrics"]
    assert result["protocol"]["segments"] == "hungarian" and result["images"] == 2
    assert result["miou"] == 1.0 and result["miou_per_image_matching"] == 1.0
    assert result["assignment"] == {2: "background", 0: "cat", 1: "dog"} and result["segments"] == 3
    assert result["boundary_f"] == 1.0

    # background ignored: miou (and the per-image figure) without the background class
    ignored = _dataset(compose_fit, "data.protocol=unsupervised", "data.eval_background=false")
    result = evaluate_masks(ignored, "val", ids, segments)
    assert result["protocol"]["background"] == "ignored" and result["miou"] == result["miou_without_background"] == 1.0
    assert result["miou_per_image_matching"] == result["miou_without_background_per_image_matching"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.boundary_tolerance=-1", "data.boundary_tolerance=-1: use a finite non-negative number"),
        ("data.boundary_tolerance=wide", "data.boundary_tolerance=wide"),
        ("data.protocol=semi", "data.protocol=semi: use supervised"),
    ],
)
def test_bad_evaluation_settings_are_one_line_config_errors(tmp_path, compose_fit, override, message):
    cfg = compose_fit("data=voc", override)
    with pytest.raises(ConfigError, match=message) as err:
        describe_dataset(cfg.data, ["val"])  # checked before the dataset folder is looked at
    assert "\n" not in str(err.value)
