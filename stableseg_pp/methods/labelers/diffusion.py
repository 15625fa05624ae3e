"""The diffusion labelers: which classes an image holds, from the backbone itself (no extra weights, no labels).

Two readings of the same model (docs/labels.md compares them):

* :class:`DenoisingLabeler` (``labeler=diffusion``, the default): the diffusion
  model as a zero-shot classifier ("Your Diffusion Model is Secretly a
  Zero-Shot Classifier", 2023). The image is noised at a few times; the
  denoising error with each class's prompt is compared with the other
  classes' and, with ``leave_one_out``, the error of the prompt naming every
  class with the one naming every class but this one (relative to the empty
  prompt's error, so images and times of different difficulty compare): a
  class whose prompt explains the image better than the average class's, and
  without which the full prompt explains it worse, scores above 0.
* :class:`MapAreaLabeler` (``labeler=diffusion_maps``): stage 0 with every class
  in the prompt; a class's score is the fraction of the image it wins there.

Both name a class when its score reaches a threshold set without labels
(:mod:`.thresholds`): the denoising labeler by default each class's own Otsu
split of its scores over the split's images (classes score at different levels
when present: docs/labels.md), the maps labeler one split of all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from stableseg_pp.backbones.base import NoisingBackbone, image_generators
from stableseg_pp.backbones.prompts import PromptTooLongError, build_prompt
from stableseg_pp.methods.labelers.thresholds import (
    Threshold,
    check_threshold,
    decide,
    relative_confidence,
    split_threshold,
)
from stableseg_pp.runtime.errors import ConfigError

JOINER = " and "  # between the class names of a leave-one-out prompt


class DenoisingLabeler:
    """The diffusion model as a zero-shot multi-label classifier: per class, how much better its prompt denoises the
    image than the average class's prompt, relative to the empty prompt's error.

    Args:
        times: the noise levels (training-schedule times) the error is averaged over.
        prompt_template: each class's prompt (one ``{}`` for its name).
        threshold: ``otsu_per_class`` (each class's own Otsu split over the split's images, the default), ``otsu``
            (one split of all scores), ``otsu_centred`` or a fixed score in (-1, 1).
        seed: with each image's id, seeds its noise (the same scores whatever the batch).
        leave_one_out: add to each class's score how much worse the prompt naming every class but this one
            denoises than the prompt naming every class (K + 1 more prompts per noise level): a class's prompt
            alone is judged against classes that are absent too, the leave-one-out term with the image's other
            classes named, so a class the single prompts cannot tell from a neighbour in a busy image still shows.
        weigh_maps: stage 0 lets each named class's score, relative to the class's usual scores where it is absent
            and where it is named (:meth:`confidence`), decide between named classes that claim the same pixel
            (:func:`~stableseg_pp.methods.stableseg.weigh_classes`): a class named barely over its threshold no
            longer takes the object of a class the labeler is sure of; which pixels are background does not change.
    """

    name = "diffusion"
    evidence = None  # scores the pictures
    second_opinion = False  # decides from its own scores alone
    needs_backbone = True  # with the diffusion backbone itself

    def __init__(
        self,
        times: Sequence[int] = (50, 150, 250, 350, 450, 550, 650, 750),
        prompt_template: str = "a photo of a {}",
        threshold: str | float = "otsu_per_class",
        seed: int = 0,
        leave_one_out: bool = False,
        weigh_maps: bool = True,
    ):
        if not times or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < 1000 for t in times):
            raise ConfigError(f"labeler.times={list(times)}: give training-schedule times in [0, 1000), e.g. [250, 500]")
        if not isinstance(prompt_template, str) or prompt_template.count("{}") != 1:
            raise ConfigError(f"labeler.prompt_template={prompt_template!r}: give a text with one {{}} for the class name")
        check_threshold(threshold, -1.0, 1.0)
        self.times = [int(t) for t in times]
        self.prompt_template = prompt_template
        self.threshold = threshold
        self.seed = int(seed)
        if not isinstance(leave_one_out, bool):
            raise ConfigError(f"labeler.leave_one_out={leave_one_out!r}: use true or false")
        self.leave_one_out = leave_one_out
        if not isinstance(weigh_maps, bool):
            raise ConfigError(f"labeler.weigh_maps={weigh_maps!r}: use true or false")
        self.confidences = weigh_maps  # the labels carry each named class's confidence for stage 0

    def require(self, backbone) -> None:
        """The backbone must noise clean latents to a time (a :class:`NoisingBackbone`)."""
        if not isinstance(backbone, NoisingBackbone):
            raise ConfigError(
                f"labeler=diffusion: {type(backbone).__name__} cannot noise an image to a chosen time yet (it does not "
                "implement NoisingBackbone); use labeler=diffusion_maps (stage 0's own maps) with this backbone"
            )

    def check_prompts(self, backbone, names: Sequence[str]) -> None:
        """Each class's prompt, and with ``leave_one_out`` the prompt naming every class, fit the backbone's text
        encoder (read from its tokenizer, before any weights): a clear one-line error otherwise."""
        for name in names:
            backbone.check_prompt([name], self.prompt_template, JOINER)
        if self.leave_one_out:
            try:
                backbone.check_prompt(list(names), self.prompt_template, JOINER)
            except PromptTooLongError as error:
                raise ConfigError(
                    f"labeler.leave_one_out: the prompt naming all {len(names)} classes does not fit the text encoder "
                    f"({error}); use labeler.leave_one_out=false (each class's prompt alone)"
                ) from None

    def load(self, device: torch.device) -> None:
        """Nothing of its own to load: it reads the backbone the labels step loads."""

    def identity(self) -> dict:
        return {}  # the backbone's identity is in the step's key

    def score_pictures(
        self, pixels: torch.Tensor, ids: Sequence[str], names: Sequence[str], backbone: NoisingBackbone
    ) -> torch.Tensor:
        """(B, 3, R, R) pictures in [-1, 1] -> (B, K) scores of the K class ``names``."""
        return self.scores(backbone, backbone.encode_images(pixels), ids, names)

    @torch.no_grad()
    def scores(self, backbone: NoisingBackbone, latents: torch.Tensor, ids: Sequence[str], names: Sequence[str]) -> torch.Tensor:
        """(B, ...) clean latents of images ``ids`` -> (B, K) scores of the K class ``names``."""
        k = len(names)
        captions = ["", *(build_prompt([n], self.prompt_template) for n in names)]
        if self.leave_one_out:  # every class, then every class but each one
            others = ([m for j, m in enumerate(names) if j != i] for i in range(k))
            captions += [build_prompt(names, self.prompt_template, JOINER),
                         *(build_prompt(o, self.prompt_template, JOINER) for o in others)]  # fmt: skip
        text = backbone.encode_captions(captions)
        prompts = len(captions)
        errors = latents.new_zeros(len(ids), prompts, dtype=torch.float32)
        for i, gen in enumerate(image_generators(self.seed, ids)):
            clean = latents[i : i + 1]
            for t in self.times:
                noise = torch.randn(clean.shape, generator=gen).to(clean)
                noisy = backbone.noise_to(clean, t, noise).expand(prompts, *clean.shape[1:])
                target = backbone.prediction_target(clean, noise, t)
                pred = backbone.denoise(noisy, backbone.time_input(t, prompts, noisy.device), text)
                errors[i] += ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
        empty, alone = errors[:, :1], errors[:, 1 : k + 1]
        gain = alone.mean(1, keepdim=True) - alone  # c's prompt against the average class's
        if self.leave_one_out:  # the prompt of every class but c against the prompt of every class
            gain = gain + errors[:, k + 2 :] - errors[:, k + 1 : k + 2]
        return gain / empty.clamp_min(1e-12)

    def fit_threshold(self, scores: Sequence[Mapping[int, float]]) -> Threshold:
        return split_threshold(self.threshold, scores)

    def confidence(
        self, scores: Mapping[str, Mapping[int, float]], labels: Mapping[str, Sequence[int]]
    ) -> dict[str, dict[int, float]]:
        """Each named class's confidence in each image: where its score lies between the class's median over the
        images the split does not name it in and its median over those it does, in [0, 1]
        (:func:`~.thresholds.relative_confidence`). The scores are differences of errors, with no natural zero:
        a class's level where it is absent is read from the split, as its threshold is."""
        return relative_confidence(scores, labels)

    decide = staticmethod(decide)


class MapAreaLabeler:
    """Names the classes that win enough of an image in a mask set (stage 0's all-class masks).

    Args:
        threshold: ``otsu`` (Otsu's split of the split's log-scores, no labels), ``otsu_per_class`` (each class's
            own split) or a fraction of the image in (0, 1).
        min_pixels: a class must win at least this many pixels of an image to count as evidence at all.
    """

    name = "diffusion_maps"
    evidence = "stage0"  # scores stage 0's masks with every class in the prompt (its own step folder)
    reads = "mask"  # each image's (H, W) class ids there
    confidences = False  # its scores are areas, not probabilities
    second_opinion = False  # decides from its own scores alone

    def __init__(self, threshold: str | float = "otsu", min_pixels: int = 1):
        check_threshold(threshold)
        if isinstance(min_pixels, bool) or not isinstance(min_pixels, int) or min_pixels < 1:
            raise ConfigError(f"labeler.min_pixels={min_pixels}: give a whole number of pixels >= 1")
        self.threshold = threshold
        self.min_pixels = min_pixels

    def scores(self, mask: np.ndarray, candidates: Sequence[int]) -> dict[int, float]:
        """Each candidate class's fraction of the image in ``mask`` (0 below ``min_pixels``)."""
        counts = np.bincount(mask.ravel(), minlength=256)
        total = max(1, int(mask.size))
        return {int(c): (float(counts[c]) / total if counts[c] >= self.min_pixels else 0.0) for c in candidates}

    def fit_threshold(self, scores: Sequence[Mapping[int, float]]) -> Threshold:
        """The split's threshold: the fixed fraction, or Otsu's over the log of the positive scores (no evidence
        anywhere: 1, nothing is named)."""
        with np.errstate(divide="ignore"):
            log = (lambda v: np.where(v > 0, np.log(np.where(v > 0, v, 1.0)), np.nan), np.exp)
            return split_threshold(self.threshold, scores, transform=log, empty=1.0)

    decide = staticmethod(decide)
