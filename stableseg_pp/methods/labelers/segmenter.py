"""The segmenter labeler: round k's DeepLabV3+ names the classes round k+1 prompts for (self-training refines the
labels too).

Round 1 has no segmenter yet: its labels come from ``first_round`` (the
diffusion labeler by default). From round 2 on, a class is named in an image
when the previous round's DeepLabV3+ is sure enough that it is somewhere in it:
its peak probability over the image (``score=peak``, the default) or the
fraction of the image it predicts (``score=area``), against a threshold set
without labels (Otsu's split of the split's scores) or given. With peaks, the
labels carry each named class's confidence, and stage 0 lets it decide between
named classes that claim the same pixel (``weigh_maps``). docs/labels.md
compares them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from stableseg_pp.methods.labelers.diffusion import MapAreaLabeler
from stableseg_pp.methods.labelers.thresholds import Threshold, split_threshold
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

    def scores(self, evidence: np.ndarray, candidates: Sequence[int]) -> dict[int, float]:
        """Each candidate class's score from one image's evidence (its peaks by class id, or its predicted mask)."""
        if self.score == "area":
            return super().scores(evidence, candidates)
        return {int(c): float(evidence[c]) for c in candidates}

    def confidence(
        self, scores: Mapping[str, Mapping[int, float]], labels: Mapping[str, Sequence[int]]
    ) -> dict[str, dict[int, float]]:
        """Each named class's confidence in each image: its peak over the class's median peak where the split names
        it, at most 1. Relative to the class, because segmenters are surer of some classes than of others (the
        miniature U-Net's DeepLabV3+ peaks at about 0.5 on the triangles it finds, 0.9 on circles): a class named at
        its usual level counts fully, one named with half its usual certainty half."""
        named: dict[int, list[float]] = {}
        for sid, classes in labels.items():
            for c in classes:
                named.setdefault(c, []).append(scores[sid][c])
        usual = {c: max(float(np.median(v)), 1e-6) for c, v in named.items()}
        return {sid: {c: round(min(1.0, scores[sid][c] / usual[c]), 6) for c in classes} for sid, classes in labels.items()}

    def fit_threshold(self, scores: Sequence[Mapping[int, float]]) -> Threshold:
        if self.score == "area":
            return super().fit_threshold(scores)
        return split_threshold(self.threshold, scores, empty=1.0)  # peaks are probabilities: split as they are
