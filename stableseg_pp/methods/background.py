"""The background policy: how a pixel becomes background in stage 0, and so in everything that scores its maps.

StableSeg (stage 0), the map weights of stage 2 and the layer analysis all turn
normalised class maps into scores with a background channel first; they share
this one rule so that stage 2 fits and the analysis scores exactly what stage 0
applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stableseg_pp.runtime.errors import ConfigError

RULES = ("threshold", "word", "none")


def check_background_rule(rule: object) -> None:
    if rule not in RULES:
        raise ConfigError(f"zero_shot.background={rule}: use threshold, word or none (datasets without a background get none)")


def background_rule(zero_shot: Mapping[str, Any], has_background: bool) -> BackgroundRule:
    """The rule of a run's ``zero_shot`` settings; a dataset without a background class never predicts one."""
    return BackgroundRule.for_dataset(
        zero_shot["background"], zero_shot["background_threshold"], zero_shot["background_word"], has_background
    )


@dataclass(frozen=True)
class BackgroundRule:
    """How the background channel is made.

    Args:
        kind: ``threshold`` (a constant channel: a pixel is background unless a class beats ``threshold``), ``word``
            (the prompt names ``word`` too and its map is the background channel) or ``none`` (no background class:
            the channel is there but never wins).
        threshold: the constant of ``threshold``.
        word: the prompt word of ``word``.
    """

    kind: str = "threshold"
    threshold: float = 0.55
    word: str = "background"

    def __post_init__(self) -> None:
        check_background_rule(self.kind)

    @classmethod
    def for_dataset(cls, kind: str, threshold: float, word: str, has_background: bool) -> BackgroundRule:
        """The configured rule; a dataset without a background class never predicts one."""
        return cls(kind if has_background else "none", float(threshold), str(word))

    @property
    def constant(self) -> float | None:
        """The constant channel's value (``threshold``), else None: what a content key records of the rule."""
        return self.threshold if self.kind == "threshold" else None

    def require_constant(self, user: str, instead: str = "") -> None:
        """``user`` scores stored class maps against the constant channel: refused (one line) for ``word``."""
        if self.kind == "word":
            raise ConfigError(
                f"zero_shot.background=word: {user} against stage 0's background threshold, which background=word "
                f"does not use; run it with zero_shot.background=threshold{instead}"
            )

    def prompt_names(self, names: Sequence[str]) -> list[str]:
        """The names a prompt carries: ``word`` adds the background word last."""
        return [*names, self.word] if self.kind == "word" else list(names)

    def prepend(self, norm: torch.Tensor, temperature: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, h, w) normalised class maps -> (B, 1 + C, h, w) scores, channel 0 the constant background
        (``none``: -inf, so it never wins), all divided by ``temperature`` where given (stage 2's fit). ``word`` has
        no constant channel: its map is a class map that the caller moves to channel 0."""
        if self.kind == "word":
            raise ValueError("background=word has no constant channel: the word's map is the background")
        if self.kind == "none":
            # -inf added after the temperature (dividing -inf by it would make its gradient 0 * inf = NaN)
            scaled = norm if temperature is None else norm / temperature
            return torch.cat([torch.full_like(norm[:, :1], float("-inf")), scaled], dim=1)
        scores = torch.cat([torch.full_like(norm[:, :1], self.threshold), norm], dim=1)
        return scores if temperature is None else scores / temperature
