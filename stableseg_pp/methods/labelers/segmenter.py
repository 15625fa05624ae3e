"""The segmenter labeler: round k's DeepLabV3+ names the classes round k+1 prompts for (self-training refines the
labels too).

Round 1 has no segmenter yet: its labels come from ``first_round`` (the
diffusion labeler by default). From round 2 on, a class is named in an image
when the previous round's DeepLabV3+ is sure enough that it is somewhere in it:
its peak probability over the image (``score=peak``, the default) or the
fraction of the image it predicts (``score=area``), against a threshold set
without labels (Otsu's split of the split's scores) or given. A class the
segmenter half sees (a peak in the ``doubt`` band below the threshold) is named
when round 1's labeler, a second opinion from other evidence, says so
(:meth:`SegmenterLabeler.reconsider`). With peaks, the labels carry each named
class's confidence, and stage 0 lets it decide between named classes that
claim the same pixel (``weigh_maps``). docs/labels.md compares them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from stableseg_pp.methods.labelers.diffusion import MapAreaLabeler
from stableseg_pp.methods.labelers.thresholds import (
    Threshold,
    relative_confidence,
    separating_cut,
    split_threshold,
    threshold_of,
)
from stableseg_pp.runtime.errors import ConfigError

SCORES = ("peak", "area")


class SegmenterLabeler(MapAreaLabeler):
    """Names the classes the previous round's DeepLabV3+ finds in an image.

    Args:
        first_round: the labeler of round 1, before any segmenter is trained (a built labeler that does not itself
            read a segmenter).
        score: ``peak``: a class's highest probability over the image (how sure the segmenter is that it is
            anywhere; DeepLabV3+ predicts at 1/4 of the input and upsamples, so a peak spans a patch, not one noisy
            pixel); ``area``: the fraction of the image it predicts (its argmax).
        threshold: ``otsu`` (Otsu's split of the split's scores: peaks as they are, areas' logarithms; no labels),
            ``otsu_per_class`` / ``otsu_centred`` (:mod:`.thresholds`), or a value in (0, 1).
        min_pixels: ``score=area``: a class must be predicted on at least this many pixels of an image to count.
        weigh_maps: ``score=peak``: stage 0 lets the peaks (relative to each class's usual peak, :meth:`confidence`)
            decide between named classes that claim the same pixel (:func:`~stableseg_pp.methods.stableseg.weigh_classes`):
            a class named wrongly, with a lower peak than usual, no longer takes a present class's object; which
            pixels are background does not change.
        doubt: ``score=peak``: a class whose peak lies in [``doubt`` x threshold, threshold) is in doubt, and named
            where round 1's labeler scores it at or above a cut set on this round's sure cases (:meth:`reconsider`);
            ``null``: the peaks alone decide. A segmenter trained on masks that missed a class's objects misses them
            in turn, with a low peak, and would teach them as background again; round 1's labeler read the picture
            another way.
        weight_power: ``weigh_maps``: a named class's weight is its relative peak raised to this power (above 0): 1
            weighs by the relative peak itself; 0.5 (the default) by its square root, so a class found a little less
            surely than usual keeps most of its weight while one named on a faint peak still loses contests
            (docs/labels.md measures both).
    """

    name = "segmenter"
    evidence = "segmenter"  # reads what the previous round's DeepLabV3+ predicted

    def __init__(
        self,
        first_round,
        score: str = "peak",
        threshold: str | float = "otsu",
        min_pixels: int = 1,
        weigh_maps: bool = True,
        doubt: float | None = 0.5,
        weight_power: float = 0.5,
    ):
        super().__init__(threshold, min_pixels)
        if not hasattr(first_round, "evidence") or first_round.evidence == "segmenter":
            raise ConfigError(
                "labeler.first_round: give a labeler that labels round 1 without a trained segmenter, e.g. "
                "labeler.first_round=diffusion's node (configs/labeler/segmenter.yaml)"
            )
        if score not in SCORES:
            raise ConfigError(f"labeler.score={score!r}: use {' or '.join(SCORES)}")
        self.first_round = first_round
        self.score = score
        if not isinstance(weigh_maps, bool):
            raise ConfigError(f"labeler.weigh_maps={weigh_maps!r}: use true or false")
        self.reads = "class_peaks" if score == "peak" else "mask"  # (K,) peaks by class id, or (H, W) class ids
        self.confidences = weigh_maps and score == "peak"  # peaks are probabilities: stage 0 may weigh by them
        if doubt is not None and (isinstance(doubt, bool) or not isinstance(doubt, int | float) or not 0 < doubt < 1):
            raise ConfigError(f"labeler.doubt={doubt!r}: use a fraction of the threshold in (0, 1), or null for none")
        self.doubt = float(doubt) if doubt is not None and score == "peak" else None
        self.second_opinion = self.doubt is not None  # the labels step reads round 1's scores for the classes in doubt
        if isinstance(weight_power, bool) or not isinstance(weight_power, int | float) or weight_power <= 0:
            raise ConfigError(f"labeler.weight_power={weight_power!r}: use a power above 0 (1: the relative peak itself)")
        self.weight_power = float(weight_power)

    def scores(self, evidence: np.ndarray, candidates: Sequence[int]) -> dict[int, float]:
        """Each candidate class's score from one image's evidence (its peaks by class id, or its predicted mask)."""
        if self.score == "area":
            return super().scores(evidence, candidates)
        return {int(c): float(evidence[c]) for c in candidates}

    def confidence(
        self, scores: Mapping[str, Mapping[int, float]], labels: Mapping[str, Sequence[int]]
    ) -> dict[str, dict[int, float]]:
        """Each named class's confidence in each image: its peak over the class's median peak where the split names
        it, at most 1, raised to ``weight_power`` (:func:`~.thresholds.relative_confidence`, absent at 0). Relative
        to the class, because segmenters are surer of some classes than of others (the miniature U-Net's DeepLabV3+
        peaks at about 0.5 on the triangles it finds, 0.9 on circles)."""
        return relative_confidence(scores, labels, absent_at_zero=True, power=self.weight_power)

    def fit_threshold(self, scores: Sequence[Mapping[int, float]]) -> Threshold:
        if self.score == "area":
            return super().fit_threshold(scores)
        return split_threshold(self.threshold, scores, empty=1.0)  # peaks are probabilities: split as they are

    def reconsider(
        self,
        scores: Mapping[str, Mapping[int, float]],
        threshold: Threshold,
        labels: Mapping[str, Sequence[int]],
        first_scores: Mapping[str, Mapping[int, float]],
    ) -> tuple[dict[str, list[int]], dict[int, float]]:
        """The labels with the classes in doubt settled by round 1's scores (``first_scores``: image -> class ->
        score, higher = more likely there); returns them and each class's cut on those scores.

        Per class, the cut is the one that best separates round 1's scores of the images this round is sure of
        (peak at or above the threshold: there; below ``doubt`` x threshold: not; :func:`~.thresholds.separating_cut`). No labels:
        the segmenter's sure answers calibrate the other labeler, which then decides only where the segmenter
        hesitates. A class with no sure case of either kind keeps its labels."""
        cuts: dict[int, float] = {}
        out = {sid: list(named) for sid, named in labels.items()}
        for c in sorted({int(c) for row in scores.values() for c in row}):
            high = threshold_of(threshold, c)
            low = self.doubt * high
            ids = [sid for sid in scores if sid in first_scores and c in first_scores[sid]]
            peak = np.array([scores[sid][c] for sid in ids])
            other = np.array([first_scores[sid][c] for sid in ids])
            sure, absent = other[peak >= high], other[peak < low]
            if not sure.size or not absent.size:
                continue
            cuts[c] = separating_cut(sure, absent)
            for sid, p, o in zip(ids, peak, other, strict=True):
                if low <= p < high and o >= cuts[c] and c not in out[sid]:
                    out[sid] = sorted([*out[sid], c])
        return out, cuts
