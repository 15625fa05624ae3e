"""How a labeler turns a split's scores into each image's classes, without labels: a threshold from the split's own
scores (Otsu's split, for all classes or per class) or a fixed value, and the rule for an image nothing reaches."""

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


#: a threshold set from the split's scores without labels: one for all classes, or one per class
SPLIT_RULES = ("otsu", "otsu_per_class", "otsu_centred")
#: ``otsu_centred``: the quantile of a class's scores over the split's images taken as its level where it is absent
ABSENT_QUANTILE = 0.25
#: a class with fewer scores than this in a split takes the split's threshold (too few for a split of its own)
MIN_PER_CLASS = 20
#: a class takes a threshold of its own only where the split's threshold already names it in this share of the images
#: (evidence that it is there at all: a class absent from every image would otherwise be split in two)
MIN_NAMED_SHARE = 0.05

Threshold = float | dict[int, float]  # one for every class, or class id -> its own


def check_threshold(threshold: object, low: float = 0.0, high: float = 1.0) -> None:
    if threshold not in SPLIT_RULES and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                         or not low < threshold < high):  # fmt: skip
        raise ConfigError(f"labeler.threshold={threshold}: use {' or '.join(SPLIT_RULES)} or a number in ({low}, {high})")


def split_threshold(
    threshold: str | float, scores: Sequence[Mapping[int, float]], transform=None, empty: float = 0.0
) -> Threshold:
    """A split's threshold of score rows: the fixed value; ``otsu``: Otsu's split of every score; ``otsu_per_class``:
    each class's own split of its scores over the split's images (classes differ in how high they score when
    present); ``otsu_centred``: each class's scores less its lower quartile over the images (its level where absent,
    for a class absent from at least a quarter of them), then one Otsu split of all: per class, that quartile plus
    the split. A class with fewer than :data:`MIN_PER_CLASS` scores, or that the split's threshold names in fewer than
    :data:`MIN_NAMED_SHARE` of them, takes the split's threshold.
    ``transform``: (values -> values, its inverse) to split on, e.g. logarithms; values it maps to nan are left out.
    ``empty``: the threshold without any score."""
    if threshold not in SPLIT_RULES:
        return float(threshold)
    forward, inverse = transform or (np.asarray, np.asarray)

    def values_of(rows: list[float]) -> np.ndarray:
        values = forward(np.array(rows, np.float64))
        return values[~np.isnan(values)]

    def split(values: np.ndarray) -> float | None:
        return otsu_threshold(values) if values.size else None

    overall = split(values_of([v for s in scores for v in s.values()]))
    if threshold == "otsu" or overall is None:
        return float(inverse(overall)) if overall is not None else empty
    by_class: dict[int, np.ndarray] = {}
    for c in sorted({int(c) for row in scores for c in row}):
        by_class[c] = values_of([row[c] for row in scores if c in row])
    enough = {c: v for c, v in by_class.items() if v.size >= MIN_PER_CLASS and np.mean(v >= overall) >= MIN_NAMED_SHARE}
    if threshold == "otsu_per_class":
        own = {c: split(v) for c, v in enough.items()}
    else:
        absent = {c: float(np.quantile(v, ABSENT_QUANTILE)) for c, v in enough.items()}
        cut = split(np.concatenate([v - absent[c] for c, v in enough.items()])) if enough else None
        own = {c: a + cut for c, a in absent.items()} if cut is not None else {}
    return {c: float(inverse(own.get(c, overall))) for c in by_class}


def threshold_of(threshold: Threshold, c: int) -> float:
    return threshold.get(int(c), float("inf")) if isinstance(threshold, dict) else threshold


def describe_threshold(threshold: Threshold) -> str:
    if isinstance(threshold, dict):
        return "per class " + ", ".join(f"{c}: {t:.4g}" for c, t in threshold.items())
    return f"{threshold:.4g}"


def decide(scores: Mapping[int, float], threshold: Threshold, has_background: bool) -> list[int]:
    """The classes named for one image: every score at or above its class's ``threshold``; none named and no
    background class to fall back on: the top-scoring class (an image always shows something)."""
    named = sorted(c for c, v in scores.items() if v >= threshold_of(threshold, c))
    if not named and not has_background and scores:
        named = [max(scores, key=lambda c: (scores[c], -c))]
    return named


def separating_cut(present: np.ndarray, absent: np.ndarray) -> float:
    """The score that best separates ``present`` scores (at or above it) from ``absent`` ones (below): the highest
    balanced accuracy (recall of each group, averaged, so the larger group does not decide alone), at the middle of
    the range of cuts that tie (the middle of the gap when the groups do not overlap)."""
    values = np.unique(np.concatenate([present, absent]).astype(np.float64))
    if values.size == 1:
        return float(values[0])
    cuts = (values[:-1] + values[1:]) / 2
    balanced = (present[None, :] >= cuts[:, None]).mean(1) + (absent[None, :] < cuts[:, None]).mean(1)
    best = np.flatnonzero(balanced >= balanced.max() - 1e-12)
    return float((cuts[best[0]] + cuts[best[-1]]) / 2)


def relative_confidence(
    scores: Mapping[str, Mapping[int, float]],
    labels: Mapping[str, Sequence[int]],
    absent_at_zero: bool = False,
    power: float = 1.0,
) -> dict[str, dict[int, float]]:
    """Each named class's confidence in each image, in [0, 1]: where its score lies between the class's usual level
    where the split does not name it (``absent_at_zero``: 0, for scores with a natural zero such as probabilities;
    else the median of those scores) and its usual level where it is named (the median of those), capped at 1.
    Relative to the class, because models score some classes higher than others: a class named at its usual level
    counts fully, one named barely above where it usually is when absent, hardly at all. A class named in every image
    (no absent level to read) counts fully wherever it is named. ``power``: the position raised to it (below 1, a
    class a little less sure than usual loses less of its weight)."""
    out: dict[str, dict[int, float]] = {sid: {} for sid in labels}
    for c in sorted({int(c) for named in labels.values() for c in named}):
        usual = float(np.median([scores[sid][c] for sid, row in labels.items() if c in row]))
        if absent_at_zero:
            low: float | None = 0.0
        else:
            absent = [row[c] for sid, row in scores.items() if c in row and c not in labels.get(sid, ())]
            low = float(np.median(absent)) if absent else None  # named everywhere: no absent level to read
        for sid, row in labels.items():
            if c in row:
                value = 1.0 if low is None else (scores[sid][c] - low) / max(usual - low, 1e-6)
                out[sid][c] = round(float(np.clip(value, 0.0, 1.0)) ** power, 6)
    return out
