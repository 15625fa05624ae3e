"""DenseCRF sharpens a noisy mask along image edges; the worker pool agrees with one process."""

from __future__ import annotations

import numpy as np

from stableseg_pp.methods.dense_crf import CRFParams, CRFPool, refine


def _case(seed=0, size=48):
    rng = np.random.default_rng(seed)
    truth = np.zeros((size, size), dtype=np.int64)
    truth[10:38, 14:34] = 1  # a sharp-edged rectangle
    image = np.where(truth[..., None] == 1, [200, 40, 40], [60, 120, 60]).astype(np.float64)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    # blurry, noisy probabilities: the rectangle dilated by 4 px and speckled
    soft = np.zeros((size, size))
    soft[6:42, 10:38] = 0.62
    soft[truth == 1] = 0.7
    soft = np.clip(soft + rng.normal(0, 0.2, soft.shape), 0.02, 0.98)
    probs = np.stack([1 - soft, soft]).astype(np.float32)
    return image, probs, truth


def _iou(pred, truth):
    return ((pred == 1) & (truth == 1)).sum() / ((pred == 1) | (truth == 1)).sum()


def test_crf_improves_a_noisy_mask():
    image, probs, truth = _case()
    before = _iou(probs.argmax(0), truth)
    labels, q = refine(image, probs, CRFParams(bilateral_sxy=10, bilateral_srgb=20))
    after = _iou(labels, truth)
    assert after > before + 0.1, (before, after)
    assert q.shape == probs.shape and np.allclose(q.sum(0), 1, atol=1e-4)


def test_low_confidence_pixels_are_ignored():
    image, probs, _ = _case()
    labels, q = refine(image, probs, CRFParams(min_confidence=0.999))
    assert (labels == 255).any() and ((labels == 255) == (q.max(0) < 0.999)).all()


def test_pool_matches_single_process():
    jobs = [(i, *_case(seed=i)[:2]) for i in range(4)]
    params = CRFParams(bilateral_sxy=10, bilateral_srgb=20)
    with CRFPool(1) as pool:
        single = dict(pool.refine(jobs, params))
    with CRFPool(2) as pool:
        pooled = dict(pool.refine(jobs, params, chunk=3))
    assert sorted(pooled) == [0, 1, 2, 3]
    assert all(np.array_equal(single[k], pooled[k]) for k in single)
