"""Prompts and the mapping from class names to text-token positions.

A class name may span several tokens ("half moon", "potted plant"); its map
is the mean over those tokens. For CLIP position 0 is BOS, so token positions start at 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stableseg_pp.runtime.errors import ConfigError, UserError


class PromptTooLongError(UserError, ValueError):
    """The prompt does not fit the text encoder's context."""


@dataclass(frozen=True)
class ClassTokens:
    """A prompt and, for each class it names, the positions of that class's tokens."""

    prompt: str
    input_ids: list[int]  # with BOS/EOS, unpadded
    positions: list[list[int]]  # one list per class, in the order given

    def weight_matrix(self, length: int) -> torch.Tensor:
        """(length, n_classes) matrix averaging each class's token columns."""
        w = torch.zeros(length, len(self.positions))
        for c, pos in enumerate(self.positions):
            w[pos, c] = 1.0 / len(pos)
        return w


def build_prompt(names: Sequence[str], template: str = "a photo of a {}", joiner: str = " and ") -> str:
    """Fill ``template`` with the class names joined by ``joiner``."""
    if "{}" not in template:
        raise ConfigError(f"prompt template {template!r} has no '{{}}' for the class names")
    return template.format(joiner.join(names))


def _find(haystack: list[int], needle: list[int], start: int) -> int:
    for i in range(start, len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return -1


def map_class_tokens(
    tokenizer,
    names: Sequence[str],
    template: str = "a photo of a {}",
    joiner: str = " and ",
    max_length: int | None = None,
) -> ClassTokens:
    """Build the prompt naming ``names`` and locate each name's tokens in it.

    Raises ``PromptTooLongError`` when the prompt (with BOS and EOS) is longer
    than the tokenizer's ``model_max_length``: it would be truncated and the
    last classes would have no tokens (``max_length`` overrides that limit, e.g. T5's sequence length).
    """
    if not names:
        raise ConfigError("no class names to build a prompt from")
    prompt = build_prompt(names, template, joiner)
    ids = tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids
    limit = tokenizer.model_max_length if max_length is None else max_length
    if len(ids) > limit:
        raise PromptTooLongError(
            f"prompt {prompt!r} has {len(ids)} tokens but the text encoder takes {limit}: "
            "name fewer classes per image (image-level labels), shorten prompt_template, "
            "or use shorter class synonyms"
        )
    positions: list[list[int]] = []
    cursor = 1 if ids and ids[0] == tokenizer.bos_token_id else 0  # CLIP starts with BOS, T5 does not
    for name in names:
        piece = tokenizer(name, add_special_tokens=False).input_ids
        if not piece:
            raise ConfigError(f"class name {name!r} produces no tokens")
        at = _find(ids, piece, cursor)
        if at < 0:
            # A name written differently inside the prompt (e.g. merged with punctuation):
            # tokenize the prompt prefix up to the name instead.
            prefix = build_prompt(list(names[: names.index(name)]) + ["\0"], template, joiner).split("\0")[0]
            pre = tokenizer(prefix, add_special_tokens=True).input_ids[:-1]
            at = len(pre)
            if ids[at : at + len(piece)] != piece:
                raise ValueError(f"cannot locate the tokens of class {name!r} in prompt {prompt!r}")
        positions.append(list(range(at, at + len(piece))))
        cursor = at + len(piece)
    return ClassTokens(prompt=prompt, input_ids=ids, positions=positions)
