"""`prophet_focus` when the question's anchors are spread over many chunks: plain ProphetKV (no move, the question's
attention in the retrieval layout picks the tokens); when they single out a few chunks, its focus plan."""

from __future__ import annotations

import pytest
import torch
from focus_plans import planned

from prophet_rag.config import SelectionConfig
from prophet_rag.selection.request import Selection
from prophet_rag.selection.signals import FOCUS_SHARE, FOCUS_SPREAD
from tiny import CHUNKS, FILLERS, QUERY


def _selection(relevance: list[float]) -> Selection:
    """A request of one-token chunks whose anchored relevance is `relevance` (no model needed for the signals)."""
    chunks = [torch.tensor([i]) for i in range(len(relevance))]
    request = Selection(None, SelectionConfig(method="prophet_focus", ratio=0.2), chunks, torch.tensor([0]))
    request.__dict__["anchored"] = torch.tensor(relevance)
    return request


@pytest.mark.parametrize("relevance,spread", [
    ([1.0] + [0.0] * 9, False),  # one chunk singled out
    ([1.0, 0.5, 0.3, 0.2] + [0.1] * 6, False),  # four of ten: a multi-value answer
    ([1.0, 0.5, 0.3, 0.2, 0.2] + [0.1] * 5, True),  # half the chunks
    ([1.0] * 10, True),
    ([0.0] * 10, False),  # no question word in any chunk: no focus at all
    ([1.0, 0.0], False),  # a single focus chunk is never spread
    ([1.0, 0.9], True),
])
def test_spread_is_at_least_half_the_chunks_in_focus_and_more_than_one(relevance, spread):
    request = _selection(relevance)
    assert request.spread is spread
    assert FOCUS_SPREAD == 0.5 and FOCUS_SHARE == 0.2  # the cases above are written for these thresholds


def _anchors(engine, chunks, anchored):
    """Per-token anchored weights with one anchor, of weight `anchored[i]`, on the first token of chunk i."""
    sizes = [int(ids.numel()) for ids in engine.builder.layout(list(chunks), QUERY).chunk_ids]
    weights = torch.zeros(sum(sizes))
    for i, weight in enumerate(anchored):
        weights[sum(sizes[:i])] = weight
    return weights


def test_spread_anchors_give_plain_prophet_with_no_chunk_moved(make_engine):
    engine = make_engine("llama")
    anchored = _anchors(engine, CHUNKS, [0.9, 1.0, 0.8])
    order, cache, chosen, prophet = planned(engine, CHUNKS, 0.3, anchored_tokens=anchored)
    assert order == [0, 1, 2]
    assert list(cache.order) == [0, 1, 2]
    assert torch.equal(chosen, prophet)


def test_spread_plan_is_not_whole_chunks_by_relevance(make_engine):
    engine = make_engine("llama")
    layout_chunks = [int(ids.numel()) for ids in engine.builder.layout(list(CHUNKS), QUERY).chunk_ids]
    ratio = layout_chunks[1] / sum(layout_chunks)  # exactly the best chunk's size: the focus plan takes it whole
    anchored = _anchors(engine, CHUNKS, [0.9, 1.0, 0.8])
    _, cache, chosen, prophet = planned(engine, CHUNKS, ratio, anchored_tokens=anchored)
    start, end = cache.chunk_spans[list(cache.order).index(1)]
    whole = torch.arange(start, end)
    assert torch.equal(chosen, prophet)
    assert not torch.equal(chosen, whole)


def test_anchors_on_a_few_chunks_keep_the_focus_plan(make_engine):
    engine = make_engine("llama")
    chunks = (*CHUNKS, *FILLERS)
    anchored = [0.0, 1.0, 0.0] + [0.0] * len(FILLERS)  # one chunk of seven singled out
    order, cache, chosen, _ = planned(engine, chunks, 0.3, anchored_tokens=_anchors(engine, chunks, anchored))
    assert order[-1] == 1  # moved next to the question
    start, end = cache.chunk_spans[-1]
    assert set(range(start, end)) <= set(chosen.tolist())  # and recomputed whole


def test_three_of_seven_focus_chunks_are_not_spread(make_engine):
    engine = make_engine("llama")
    chunks = (*CHUNKS, *FILLERS)
    anchored = [0.9, 1.0, 0.8] + [0.0] * len(FILLERS)
    order, _, _, _ = planned(engine, chunks, 0.3, anchored_tokens=_anchors(engine, chunks, anchored))
    assert order[-3:] == [0, 1, 2]  # the three focus chunks moved last, in retrieval order
