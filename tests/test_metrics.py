"""Metrics against hand-computed values (and against a reference BLEU where one is installed)."""

from __future__ import annotations

import math

import pytest
import torch

from bigmodel.metrics import (
    accuracy,
    activation_sparsity,
    bleu,
    character_error_rate,
    edit_distance,
    exact_match,
)

HYPS = ["the cat sat on the mat", "a dog runs"]
REFS = ["the cat sat on a mat", "the dog runs fast"]


def test_bleu_equals_the_hand_computed_corpus_score() -> None:
    # clipped matches / candidates over both sentences, n = 1..4:
    #   1-grams 5/6 + 2/3 -> 7/9; 2-grams 3/5 + 1/2 -> 4/7; 3-grams 2/4 + 0/1 -> 2/5; 4-grams 1/3 + 0/0 -> 1/3
    # output 9 words, references 10 -> brevity penalty exp(1 - 10/9)
    expected = 100 * math.exp(1 - 10 / 9) * (7 / 9 * 4 / 7 * 2 / 5 * 1 / 3) ** 0.25
    assert bleu(HYPS, REFS) == pytest.approx(expected, rel=1e-12)
    assert bleu(REFS, REFS) == pytest.approx(100.0)
    assert bleu(["a b c"], ["d e f g"]) == 0.0  # no matching unigram


def test_bleu_clips_repeated_words() -> None:
    # "the" appears once in the reference, so 1 of the 4 output words counts; 4 words > 2: no brevity penalty
    assert bleu(["the the the the"], ["the cat"], max_n=1) == pytest.approx(25.0)


def test_bleu_against_sacrebleu() -> None:
    import sacrebleu  # the standard implementation (a dev dependency); unsmoothed, whitespace tokens as ours

    for hyps, refs in [(HYPS, REFS), (["the cat the cat", "on the mat today"], ["the cat", "on the mat"])]:
        ref = sacrebleu.corpus_bleu(hyps, [refs], smooth_method="none", tokenize="none", force=True).score
        assert bleu(hyps, refs) == pytest.approx(ref, rel=1e-9)


def test_character_error_rate_and_edit_distance() -> None:
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert edit_distance("flaw", "lawn") == 2
    # (3 + 0) edits over 7 + 3 reference characters
    assert character_error_rate(["kitten", "abc"], ["sitting", "abc"]) == pytest.approx(3 / 10)
    with pytest.raises(ValueError, match="equal"):
        character_error_rate(["a"], ["a", "b"])


def test_exact_match_and_accuracy() -> None:
    assert exact_match(["342", " 1998-03-05 ", "7"], ["342", "1998-03-05", "8"]) == pytest.approx(2 / 3)
    assert accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == 0.75
    with pytest.raises(ValueError):
        accuracy(torch.tensor([1, 2]), torch.tensor([1, 2, 3]))


def test_activation_sparsity() -> None:
    codes = torch.tensor([[0.0, 0.5, 0.001], [2.0, 0.0, -0.3]])
    assert activation_sparsity(codes) == pytest.approx(3 / 6)
