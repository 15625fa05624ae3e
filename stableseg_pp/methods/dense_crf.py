"""DenseCRF refinement of soft pseudo-masks (Krähenbühl & Koltun 2011) with pydensecrf.

Unary: -log of the class probabilities; pairwise: a Gaussian (smoothness) and a
bilateral (appearance) kernel, the image being the bilateral guide. Distances
are in pixels, so the defaults must suit the image size: the literature values
(bilateral sxy 50, srgb 5) are for 500-pixel photographs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from multiprocessing import get_all_start_methods, get_context

import numpy as np

from stableseg_pp.data.palette import IGNORE_INDEX


@dataclass(frozen=True)
class CRFParams:
    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0
    min_confidence: float | None = None  # pixels whose refined probability is below this get 255

    def as_dict(self) -> dict:
        return asdict(self)


def refine(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> tuple[np.ndarray, np.ndarray]:
    """Refine (K, H, W) class probabilities with the (H, W, 3) uint8 image as guide.

    Returns (labels (H, W) uint8 channel index, 255 where not confident; refined probabilities (K, H, W)).
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    k, h, w = probs.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"CRF: image is {image.shape[1]}x{image.shape[0]} but probabilities are {w}x{h}")
    probs = np.clip(probs.astype(np.float32), 1e-6, None)
    probs /= probs.sum(0, keepdims=True)
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.ascontiguousarray(image.astype(np.uint8)),
        compat=params.bilateral_compat,
    )
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(k, h, w)
    labels = q.argmax(0).astype(np.uint8)
    if params.min_confidence is not None:
        labels[q.max(0) < params.min_confidence] = IGNORE_INDEX
    return labels, q


def _refine_job(args):
    key, image, probs, params = args
    labels, _ = refine(image, probs, params)
    return key, labels


def _ready(_: int) -> int:
    return os.getpid()


class CRFPool:
    """DenseCRF worker processes, started once and used for every split of a step.

    Workers are forked where the platform can (Linux, macOS: they start in milliseconds with this process's modules
    already imported; spawned workers import the whole entry point again, torch, Lightning and diffusers included,
    which took 15-19 s per pool on a 16-core GPU host), spawned elsewhere. They run only NumPy and pydensecrf.

    Args:
        workers: processes (1 = refine in this process).
    """

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))
        self._pool = None
        self.start_seconds = 0.0

    def __enter__(self) -> CRFPool:
        if self.workers > 1:
            method = "fork" if "fork" in get_all_start_methods() else "spawn"
            start = time.perf_counter()
            self._pool = get_context(method).Pool(self.workers)
            self._pool.map(_ready, range(self.workers))  # every worker up
            self.start_seconds = time.perf_counter() - start
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate() if exc[0] is not None else self._pool.close()
            self._pool.join()
            self._pool = None

    def refine(
        self, jobs: Iterable[tuple[object, np.ndarray, np.ndarray]], params: CRFParams, chunk: int = 32
    ) -> Iterator[tuple[object, np.ndarray]]:
        """Refine (key, image, probs) jobs; yields (key, labels). Jobs are pulled ``chunk`` at a time, so memory stays
        bounded on large datasets."""
        tasks = ((key, image, probs, params) for key, image, probs in jobs)
        if self._pool is None:
            yield from map(_refine_job, tasks)
            return
        while batch := list(islice(tasks, chunk)):
            yield from self._pool.imap(_refine_job, batch, chunksize=max(1, len(batch) // (4 * self.workers)))
