"""Scoring functions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from prophet_rag.bench import scoring


def test_substring_score_gives_partial_credit():
    assert scoring.substring_score("The numbers are 123 and 456.", ("123", "456")) == 1.0
    assert scoring.substring_score("Only 123.", ("123", "456")) == 0.5
    assert scoring.substring_score("LISBON", ("Lisbon",)) == 1.0
    assert scoring.substring_score("nothing", ("x",)) == 0.0


def test_token_f1_and_exact_match():
    assert scoring.token_f1("The Eiffel Tower", ("eiffel tower",)) == 1.0
    precision, recall = 1 / 3, 1 / 2
    assert scoring.token_f1("tower in paris", ("eiffel tower",)) == pytest.approx(
        2 * precision * recall / (precision + recall)
    )
    assert scoring.token_f1("nothing", ("eiffel tower",)) == 0.0
    assert scoring.exact_match("An apple.", ("apple",)) == 1.0
    assert scoring.exact_match("apple pie", ("apple",)) == 0.0


def test_kl_is_zero_for_identical_and_matches_the_formula():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert scoring.kl_divergence(a, a) == pytest.approx(0.0, abs=1e-12)
    b = torch.tensor([3.0, 2.0, 1.0])
    p, q = torch.softmax(a.double(), 0), torch.softmax(b.double(), 0)
    assert scoring.kl_divergence(a, b) == pytest.approx(float((p * (p / q).log()).sum()))
    assert math.isfinite(scoring.kl_divergence(torch.tensor([0.0, -1e9]), torch.tensor([-1e9, 0.0])))


def test_first_token_agreement():
    assert scoring.first_token_agreement(torch.tensor([0.0, 5.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert scoring.first_token_agreement(torch.tensor([0.0, 5.0]), torch.tensor([3.0, 2.0])) == 0.0
