"""`prophet_focus` scoring the question in both layouts in one forward when ProphetKV's plan is likely
(`Selection.plain_likely`): the same order, plan and answer as scoring the retrieval layout afterwards, only sooner."""

from __future__ import annotations

import pytest
import torch
from focus_plans import planned

from prophet_rag.config import GenerationConfig, SelectionConfig
from prophet_rag.selection.request import Selection
from tiny import CHUNKS, FILLERS, QUERY


def _request(chunks: list[list[int]], query: list[int]) -> Selection:
    return Selection(None, SelectionConfig(method="prophet_focus", ratio=0.2), [torch.tensor(c) for c in chunks],
                     torch.tensor(query))


@pytest.mark.parametrize("chunks,plain_likely", [
    ([[1, 5], [2, 5], [3], [4]], True),  # the question's word 5 in half the chunks: spread is possible
    ([[1, 5], [2, 5], [3], [4], [6]], False),  # in two of five
    ([[1, 5], [2], [3]], False),  # in one chunk: never spread
    ([[1, 5], [2, 5], [3, 5], [5, 4]], True),  # in every chunk, so in over three quarters: no anchor, lift 0
    ([[5, 1], [5, 2], [3], [4]], True),  # only as a chunk's first token, which is no anchor
    ([[1], [2], [3]], True),  # no question word anywhere
])
def test_plain_likely_counts_the_chunks_holding_an_anchor(chunks, plain_likely):
    assert _request(chunks, [7, 5]).plain_likely is plain_likely


def test_without_anchors_the_plan_is_plain_prophet():
    """What `plain_likely` relies on when no chunk holds an anchor: the lift is 0, so the plan is ProphetKV's."""
    request = _request([[1, 2, 3], [4, 6, 8], [9, 10, 11]], [7, 5])
    request.parallel = torch.rand(9)
    assert request.plain_likely and request.lift == 0.0 and request.plain


def _always(monkeypatch, value: bool) -> None:
    monkeypatch.setattr(Selection, "plain_likely", property(lambda self: value))


@pytest.mark.parametrize("chunks,anchored,last", [
    pytest.param(CHUNKS, [0.9, 1.0, 0.8], 2, id="spread-plain-prophet"),
    pytest.param((*CHUNKS, *FILLERS), [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], 1, id="one-chunk-moves"),
])
def test_both_layouts_at_once_plan_as_one_after_the_other(make_engine, monkeypatch, chunks, anchored, last):
    engine = make_engine("llama")
    sizes = [int(ids.numel()) for ids in engine.builder.layout(list(chunks), QUERY).chunk_ids]
    weights = torch.zeros(sum(sizes))
    for i, weight in enumerate(anchored):
        weights[sum(sizes[:i]) + 1] = weight
    runs = {}
    for value in (False, True):
        _always(monkeypatch, value)
        runs[value] = planned(engine, chunks, 0.3, anchored_tokens=weights)
    (order, _, chosen, _), (order_twice, _, chosen_twice, _) = runs[False], runs[True]
    assert order == order_twice and order[-1] == last
    assert torch.equal(chosen, chosen_twice)


@pytest.mark.parametrize("chunks", [CHUNKS, (*CHUNKS, *FILLERS)], ids=["three-chunks", "seven-chunks"])
def test_the_engine_answers_the_same_either_way(make_engine, monkeypatch, chunks):
    """Through the pipeline (the ordering step's cache laid out in place, `reorder` leaving it or moving chunks):
    the same rows recomputed, the same greedy tokens."""
    engine = make_engine("llama")
    engine.ingest(list(chunks))
    answers = {}
    for value in (False, True):
        _always(monkeypatch, value)
        answers[value] = engine.answer(list(chunks), QUERY, selection=SelectionConfig(method="prophet_focus",
                                                                                      ratio=0.3),
                                       generation=GenerationConfig(max_new_tokens=6))
    assert answers[True].token_ids == answers[False].token_ids
    assert answers[True].stats.recomputed_tokens == answers[False].stats.recomputed_tokens
