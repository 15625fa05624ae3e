"""The segmenter labeler: round k's DeepLabV3+ names the classes round k+1 prompts for (self-training refines the
labels too).

Round 1 has no segmenter yet: its labels come from ``first_round`` (the
diffusion labeler by default). From round 2 on, a class is named in an image
when the previous round's DeepLabV3+ predicts it over enough of the image: a
fraction set without labels (Otsu's split of the split's log-fractions, as the
maps labeler) or given.
"""

from __future__ import annotations

from stableseg_pp.methods.labelers.diffusion import MapAreaLabeler
from stableseg_pp.runtime.errors import ConfigError


class SegmenterLabeler(MapAreaLabeler):
    """Names the classes the previous round's DeepLabV3+ predicts over enough of an image.

    Args:
        first_round: the labeler of round 1, before any segmenter is trained (a built labeler that does not itself
            read a segmenter).
        threshold: ``otsu`` (Otsu's split of the split's log-fractions, no labels) or a fraction of the image in (0, 1).
        min_pixels: a class must be predicted on at least this many pixels of an image to count at all.
    """

    name = "segmenter"
    evidence = "segmenter"  # reads the masks the previous round's DeepLabV3+ predicted

    def __init__(self, first_round, threshold: str | float = "otsu", min_pixels: int = 1):
        super().__init__(threshold, min_pixels)
        if not hasattr(first_round, "evidence") or first_round.evidence == "segmenter":
            raise ConfigError(
                "labeler.first_round: give a labeler that labels round 1 without a trained segmenter, e.g. "
                "labeler.first_round=diffusion's node (configs/labeler/segmenter.yaml)"
            )
        self.first_round = first_round
