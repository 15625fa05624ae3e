"""Benchmark: DenseCRF images per second with 1 and 2 (or more) worker processes, and the pool's start time.

Inputs are miniature-world images (optionally upscaled) with noisy, blurred
class probabilities made from their ground truth, so the benchmark needs no
earlier stage.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image, ImageFilter

from stableseg_pp.data.miniature import draw_sample
from stableseg_pp.methods.dense_crf import CRFParams, CRFPool


def make_jobs(n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(n):
        s = draw_sample(10_000 + i)
        image = np.asarray(Image.fromarray(s.image).resize((size, size), Image.BICUBIC))
        mask = np.asarray(Image.fromarray(s.mask).resize((size, size), Image.NEAREST)).copy()
        mask[mask == 255] = 0
        classes = [0, *s.classes]
        probs = []
        for c in classes:
            m = Image.fromarray(((mask == c) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(size / 16))
            probs.append(np.asarray(m, dtype=np.float32) / 255 + rng.uniform(0, 0.3, (size, size)))
        p = np.stack(probs)
        jobs.append((i, image, (p / p.sum(0, keepdims=True)).astype(np.float32)))
    return jobs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m stableseg_pp.bench crf", description=__doc__)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    jobs = make_jobs(args.images, args.size)
    params = CRFParams(bilateral_sxy=max(3.0, 50 * args.size / 512), bilateral_srgb=30 if args.size < 128 else 5)
    results = {}
    for w in args.workers:
        with CRFPool(w) as pool:  # its start (processes up) is timed apart from the refinement
            start = time.perf_counter()
            n = sum(1 for _ in pool.refine(jobs, params))
            dt = time.perf_counter() - start
        results[w] = n / dt
        print(f"{args.size}x{args.size}, {n} images, {w} worker(s): pool start {pool.start_seconds:.3f} s, "
              f"{n / dt:8.1f} images/s ({dt:.2f} s)", flush=True)  # fmt: skip
    if 1 in results:
        for w, r in results.items():
            if w != 1:
                print(f"speed-up with {w} workers: {r / results[1]:.2f}x")
    return results
