"""The ``diffusion`` labeler: the backbone's own class maps as evidence, no extra weights.

Stage 0 runs once with every class in the prompt; a class's score in an image
is the fraction of its pixels that class wins there under stage 0's own rule
(CAPM + SAR against the background threshold). A class is named when its score
reaches a threshold set without labels: by default Otsu's split of the
log-scores of every (image, class) pair the class won at least one pixel of,
over the whole split (a dataset-level statistic), or a fixed fraction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from stableseg_pp.runtime.errors import ConfigError


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of ``values``: the cut that maximises the between-class variance of the histogram (the
    middle of the empty bins when several cuts tie)."""
    values = np.asarray(values, np.float64)
    if values.size == 0 or values.min() == values.max():
        return float(values.min()) if values.size else 0.0
    counts, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centers)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = (w0 * w1 * (mean0 - mean1) ** 2)[:-1]
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))  # a gap between the groups: every cut in it ties
    return float((edges[best[0] + 1] + edges[best[-1] + 1]) / 2)  # the middle of the gap


class MapAreaLabeler:
    """Names the classes that win enough of an image in stage 0's all-class masks.

    Args:
        threshold: ``otsu`` (Otsu's split of the split's log-scores, no labels) or a fraction of the image in (0, 1).
        min_pixels: a class must win at least this many pixels of an image to count as evidence at all.
    """

    name = "diffusion"

    def __init__(self, threshold: str | float = "otsu", min_pixels: int = 1):
        if threshold != "otsu" and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                    or not 0 < threshold < 1):  # fmt: skip
            raise ConfigError(f"labeler.threshold={threshold}: use otsu or a fraction of the image in (0, 1)")
        if isinstance(min_pixels, bool) or not isinstance(min_pixels, int) or min_pixels < 1:
            raise ConfigError(f"labeler.min_pixels={min_pixels}: give a whole number of pixels >= 1")
        self.threshold = threshold
        self.min_pixels = min_pixels

    def scores(self, mask: np.ndarray, candidates: Sequence[int]) -> dict[int, float]:
        """Each candidate class's fraction of the image in ``mask`` (stage 0's all-class mask; 0 below
        ``min_pixels``)."""
        counts = np.bincount(mask.ravel(), minlength=256)
        total = max(1, int(mask.size))
        return {int(c): (float(counts[c]) / total if counts[c] >= self.min_pixels else 0.0) for c in candidates}

    def fit_threshold(self, scores: Sequence[Mapping[int, float]]) -> float:
        """The split's threshold: the fixed fraction, or Otsu's over the log of every positive score."""
        if self.threshold != "otsu":
            return float(self.threshold)
        positive = np.array([v for s in scores for v in s.values() if v > 0])
        if positive.size == 0:
            return 1.0  # no evidence anywhere: nothing is named
        return float(np.exp(otsu_threshold(np.log(positive))))

    @staticmethod
    def decide(scores: Mapping[int, float], threshold: float, has_background: bool) -> list[int]:
        """The classes named for one image: every score at or above ``threshold``; none named and no background
        class to fall back on: the top-scoring class (an image always shows something)."""
        named = sorted(c for c, v in scores.items() if v >= threshold)
        if not named and not has_background and scores:
            named = [max(scores, key=lambda c: (scores[c], -c))]
        return named
