"""Class name -> token positions, for single- and multi-token names, and prompts that do not fit."""

from __future__ import annotations

import pytest

from stableseg_pp.backbones.prompts import PromptTooLongError, build_prompt, map_class_tokens


@pytest.fixture(scope="module")
def tokenizer(random_backbone):
    return random_backbone.tokenizer


def test_single_and_multi_token_names(tokenizer):
    m = map_class_tokens(tokenizer, ["circle", "half moon", "star"], "a photo of a {}", " and ")
    assert m.prompt == "a photo of a circle and half moon and star"
    ids = m.input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    words = [tokenizer.convert_ids_to_tokens(ids[p]) for p in sum(m.positions, [])]
    assert words == ["circle</w>", "half</w>", "moon</w>", "star</w>"]
    assert [len(p) for p in m.positions] == [1, 2, 1]
    w = m.weight_matrix(77)
    assert w.shape == (77, 3)
    assert w[m.positions[1], 1].tolist() == [0.5, 0.5] and w.sum(0).tolist() == [1.0, 1.0, 1.0]


def test_name_split_into_subwords(tokenizer):
    # "hexagon" is not in the miniature vocabulary: it becomes several byte-level tokens
    m = map_class_tokens(tokenizer, ["hexagon", "circle"])
    assert len(m.positions[0]) > 1
    decoded = "".join(tokenizer.convert_ids_to_tokens([m.input_ids[p] for p in m.positions[0]]))
    assert decoded.replace("</w>", "") == "hexagon"
    assert m.positions[1][0] == m.positions[0][-1] + 2  # "and" between them


def test_repeated_word_maps_to_the_right_occurrence(tokenizer):
    m = map_class_tokens(tokenizer, ["moon", "half moon"])
    assert m.positions[0] != m.positions[1][1:]
    assert tokenizer.convert_ids_to_tokens(m.input_ids[m.positions[1][0]]) == "half</w>"


def test_prompt_too_long_fails_clearly(tokenizer):
    names = [f"star {i}" for i in range(40)]
    with pytest.raises(PromptTooLongError, match=r"tokens but the text encoder takes 77"):
        map_class_tokens(tokenizer, names)


def test_template_needs_placeholder():
    with pytest.raises(ValueError, match="no '\\{\\}'"):
        build_prompt(["circle"], template="a photo")
