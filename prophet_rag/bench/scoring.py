"""Scores of one answer: RULER substring match, SQuAD token F1, and agreement with full prefill's first token."""

from __future__ import annotations

import re
import string
from collections import Counter

import torch


def substring_score(text: str, answers: tuple[str, ...]) -> float:
    """RULER scoring: the fraction of gold answers found in the output, case-insensitive (partial credit)."""
    lowered = text.lower()
    return sum(answer.lower() in lowered for answer in answers) / len(answers)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _normalize(text: str) -> list[str]:
    return normalize_answer(text).split()


def token_f1(text: str, answers: tuple[str, ...]) -> float:
    """SQuAD-normalised token F1 against the best-matching gold answer."""
    prediction = _normalize(text)
    best = 0.0
    for answer in answers:
        gold = _normalize(answer)
        common = sum((Counter(prediction) & Counter(gold)).values())
        if common:
            precision, recall = common / len(prediction), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def exact_match(text: str, answers: tuple[str, ...]) -> float:
    return float(any(_normalize(text) == _normalize(answer) for answer in answers))


def first_token_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    return float(int(reference_logits.argmax()) == int(logits.argmax()))


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(reference || method) of the first-token distributions, in nats."""
    p_log = torch.log_softmax(reference_logits.to(torch.float64), dim=-1)
    q_log = torch.log_softmax(logits.to(torch.float64), dim=-1)
    return float((p_log.exp() * (p_log - q_log)).sum().clamp_min(0.0))
