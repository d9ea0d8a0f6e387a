"""Task generators: deterministic by seed, answers only in the evidence chunks, chunk sizes near the target."""

from __future__ import annotations

import json

import pytest

from prophet_rag.bench.tasks import TASKS, load_jsonl, parse_span
from prophet_rag.errors import InvalidRequestError
from tiny import tiny_tokenizer


@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_same_cases_other_seed_other_cases(task):
    a = TASKS[task](3, 7, 5, 60, None)
    assert a == TASKS[task](3, 7, 5, 60, None)
    assert a != TASKS[task](3, 8, 5, 60, None)


@pytest.mark.parametrize("task", list(TASKS))
def test_answers_appear_in_exactly_the_intended_chunks(task):
    for case in TASKS[task](6, 0, 5, 60, None):
        assert case.evidence_chunks
        for answer in case.answers:
            holders = {i for i, chunk in enumerate(case.chunks) if answer in chunk}
            assert holders and holders <= set(case.evidence_chunks), (case.case_id, answer, holders)
        assert not any(answer in case.query for answer in case.answers)


def test_two_hop_needs_two_different_chunks():
    for case in TASKS["two_hop"](6, 0, 5, 60, None):
        assert len(case.evidence_chunks) == 2
        person = case.query.split(" works at")[0]
        with_person = {i for i, chunk in enumerate(case.chunks) if f"{person} works at" in chunk}
        with_answer = {i for i, chunk in enumerate(case.chunks) if case.answers[0] in chunk}
        assert len(with_person) == len(with_answer) == 1 and with_person != with_answer
        assert with_person | with_answer == set(case.evidence_chunks)


@pytest.mark.parametrize("task", ["single_needle", "two_hop"])
def test_chunk_token_counts_are_near_the_target(task):
    tok = tiny_tokenizer()
    for case in TASKS[task](2, 0, 4, 80, tok):
        for chunk in case.chunks:
            n = len(tok(chunk, add_special_tokens=False)["input_ids"])
            assert 80 <= n <= 80 + 120  # one filler sentence plus the needles of overshoot at most


def test_too_few_chunks_is_a_clear_error():
    with pytest.raises(InvalidRequestError, match="variable_tracking needs between 3"):
        TASKS["variable_tracking"](1, 0, 2, 60, None)


def test_jsonl_loader_reads_cases(tmp_path):
    path = tmp_path / "cases.jsonl"
    rows = [
        {"chunks": ["a b", "c d"], "query": "q?", "answers": ["b"]},
        {"chunks": ["x"], "query": "y", "answers": [1]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cases = load_jsonl(path)
    assert [c.chunks for c in cases] == [("a b", "c d"), ("x",)]
    assert cases[1].answers == ("1",)


@pytest.mark.parametrize(
    "line, message",
    [('{"chunks": [], "query": "q", "answers": ["a"]}', "line 1: field 'chunks'"),
     ('{"chunks": ["c"], "answers": ["a"]}', "line 1: field 'query'"),
     ("not json", "line 1: not valid JSON")],
)
def test_jsonl_loader_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InvalidRequestError, match=message):
        load_jsonl(path)


@pytest.mark.parametrize("task", list(TASKS))
def test_a_one_value_range_gives_the_fixed_size_cases(task):
    assert TASKS[task](3, 7, (5, 5), (60, 60), None) == TASKS[task](3, 7, 5, 60, None)


@pytest.mark.parametrize("task", ["multi_key", "two_hop", "variable_tracking"])
def test_ranges_draw_chunk_counts_and_lengths_inside_them(task):
    tok = tiny_tokenizer()
    cases = TASKS[task](8, 0, (8, 10), (150, 300), tok)
    counts = {len(case.chunks) for case in cases}
    assert counts <= {8, 9, 10} and len(counts) > 1
    lengths = [len(tok(chunk, add_special_tokens=False)["input_ids"]) for case in cases for chunk in case.chunks]
    assert min(lengths) >= 150 and max(lengths) <= 300 + 120
    assert max(lengths) - min(lengths) > 75  # drawn per chunk, not one length for all
    for case in cases:
        assert all(0 <= i < len(case.chunks) for i in case.evidence_chunks)


@pytest.mark.parametrize("text, span", [("150", 150), ("150-300", (150, 300)), (" 8-10 ", (8, 10)), ("7-7", (7, 7))])
def test_parse_span(text, span):
    assert parse_span(text) == span


@pytest.mark.parametrize("text, message", [("300-150", "runs backwards"), ("ten", "whole number"), ("1-x", "range")])
def test_parse_span_rejects_bad_text(text, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_span(text)


def test_jsonl_optional_fields(tmp_path):
    path = tmp_path / "cases.jsonl"
    row = {"id": "q1", "task": "hotpot", "chunks": ["a", "b"], "query": "q", "answers": ["a"],
           "scores": [0.9, 0.1], "evidence_chunks": [0]}
    path.write_text(json.dumps(row) + "\n")
    (case,) = load_jsonl(path)
    assert (case.task, case.case_id, case.chunk_scores, case.evidence_chunks) == ("hotpot", "q1", (0.9, 0.1), (0,))


@pytest.mark.parametrize("scores", [[1.0], [1.0, "x"], [1.0, float("nan")], 3])
def test_jsonl_scores_must_match_the_chunks(tmp_path, scores):
    path = tmp_path / "cases.jsonl"
    path.write_text(json.dumps({"chunks": ["a", "b"], "query": "q", "answers": ["a"], "scores": scores}) + "\n")
    with pytest.raises(InvalidRequestError, match="line 1: field 'scores'"):
        load_jsonl(path)
