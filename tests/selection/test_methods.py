"""Selection invariants: sorted, unique, inside the chunk range, exactly floor(ratio * eligible)."""

from __future__ import annotations

import pytest
import torch

from prophet_rag import methods
from prophet_rag.config import SelectionConfig
from prophet_rag.selection.request import Selection, budget_for, plan, top_slots
from prophet_rag.selection.signals import FOCUS_SHARE, default_infoflow_layers, lexical_relevance
from tiny import CHUNKS, FILLERS, QUERY

METHODS = ("reuse", "random", "epic", "prophet", "infoflow", "cacheblend", "prophet_plus", "prophet_focus",
           "prophet_anchor")
SEVEN = (*CHUNKS, *FILLERS)
"""Three chunks the question may anchor on among seven: a focus of three or fewer is not spread."""


def _stitched(engine):
    layout = engine.builder.layout(CHUNKS, QUERY)
    cache, _ = engine.prefiller.assemble(layout, [0, 1, 2], layout.total_tokens)
    suffix = cache.append_tokens(layout.suffix_ids)
    return cache, suffix


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.2, 0.37, 1.0])
def test_selection_is_sorted_unique_in_range_and_exact(make_engine, method, ratio):
    engine = make_engine("llama")
    answer = engine.answer(CHUNKS, QUERY, method=method, ratio=ratio)
    positions = answer.recomputed_positions
    stats = answer.stats
    expected = 0 if method == "reuse" else int(ratio * stats.context_tokens)
    assert positions.numel() == stats.recomputed_tokens == expected
    assert torch.equal(positions, torch.unique(positions))  # unique and sorted
    if positions.numel():
        assert positions.min() >= stats.prefix_tokens
        assert positions.max() < stats.prefix_tokens + stats.context_tokens


def test_plan_rows_end_with_the_whole_suffix(make_engine):
    engine = make_engine("llama")
    cache, suffix = _stitched(engine)
    result = plan(engine.adapter, cache, suffix, SelectionConfig(method="prophet", ratio=0.2))
    assert torch.equal(result.rows[-suffix.numel():], suffix)
    assert result.selected.numel() == budget_for(0.2, int(cache.eligible_slots().numel()))


def test_budget_is_floor_of_ratio_times_eligible():
    assert budget_for(0.2, 99) == 19
    assert budget_for(0.2, 100) == 20
    assert budget_for(0.0, 1000) == 0
    assert budget_for(1.0, 7) == 7


def test_top_slots_breaks_ties_by_position():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0])
    assert top_slots(scores, 2, 10).tolist() == [11, 12]


def test_epic_takes_the_first_tokens_of_every_chunk(make_engine):
    engine = make_engine("llama")
    cache, suffix = _stitched(engine)
    chosen = plan(engine.adapter, cache, suffix, SelectionConfig(method="epic", ratio=0.3)).selected
    for start, end in cache.chunk_spans:
        mine = chosen[(chosen >= start) & (chosen < end)]
        assert mine.numel() > 0
        assert torch.equal(mine, torch.arange(start, start + mine.numel()))


def test_random_selection_depends_on_seed_only(make_engine):
    engine = make_engine("llama")
    a = engine.answer(CHUNKS, QUERY, selection=SelectionConfig(method="random", ratio=0.3, seed=1))
    b = engine.answer(CHUNKS, QUERY, selection=SelectionConfig(method="random", ratio=0.3, seed=1))
    c = engine.answer(CHUNKS, QUERY, selection=SelectionConfig(method="random", ratio=0.3, seed=2))
    assert torch.equal(a.recomputed_positions, b.recomputed_positions)
    assert not torch.equal(a.recomputed_positions, c.recomputed_positions)


def test_prophet_scores_are_bounded_attention_mass(make_engine):
    from prophet_rag.compute.scoring import query_relevance

    engine = make_engine("llama")
    cache, suffix = _stitched(engine)
    scores = query_relevance(engine.adapter, cache, suffix, "prophet", None)
    assert scores.shape == (int(cache.eligible_slots().numel()),)
    assert torch.all(scores >= 0)
    # Each layer contributes softmax mass summed over heads and query rows: at most heads * rows per layer.
    layers, heads = engine.adapter.spec.num_layers, engine.adapter.spec.num_heads
    assert scores.sum() <= layers * heads * suffix.numel() + 1e-3


def test_default_infoflow_layers_fit_the_model():
    assert default_infoflow_layers(32) == (22, 23, 24, 25)
    assert default_infoflow_layers(30) == (21, 22, 23, 24)
    assert default_infoflow_layers(2) == (0, 1)


def test_lexical_relevance_weights_rare_query_tokens():
    chunks = [torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]), torch.tensor([1, 5, 6])]
    relevance = lexical_relevance(chunks, torch.tensor([1, 4, 9]))
    assert relevance.argmax() == 1  # token 4 is in one chunk only; token 1 is everywhere and barely counts
    assert relevance[0] == relevance[2]


def test_prophet_plus_puts_the_matching_chunk_last_and_recomputes_it_whole(make_engine):
    engine = make_engine("llama")
    chunks = [CHUNKS[1], CHUNKS[0], CHUNKS[2]]
    answer = engine.answer(chunks, "What is the vault code of Alpha?", method="prophet_plus", ratio=0.9)
    assert answer.chunk_order[-1] == 1
    layout = engine.builder.layout(chunks, QUERY)
    prefix, alpha = int(layout.prefix_ids.numel()), int(layout.chunk_ids[1].numel())
    end = prefix + answer.stats.context_tokens
    assert set(range(end - alpha, end)) <= set(answer.recomputed_positions.tolist())


def test_prophet_focus_moves_the_anchored_chunk_last_and_recomputes_it_whole(make_engine):
    engine = make_engine("llama")
    layout = engine.builder.layout(SEVEN, QUERY)
    request = Selection(engine.adapter, SelectionConfig(method="prophet_focus", ratio=0.9),
                                  layout.chunk_ids, layout.suffix_ids)
    order = methods.get("prophet_focus").order(
        request, lambda order, global_positions: engine.prefiller.assemble(layout, order, layout.total_tokens,
                                                                  global_positions)[0])
    relevance = request.anchored.tolist()
    assert max(relevance) > 0  # the question shares "Alpha" and "vault" with the first chunk only
    assert not request.spread
    assert relevance.index(max(relevance)) == 0
    moved = [i for i in range(len(SEVEN)) if relevance[i] >= FOCUS_SHARE * relevance[0]]
    assert order == [i for i in range(len(SEVEN)) if i not in moved] + moved
    answer = engine.answer(SEVEN, QUERY, method="prophet_focus", ratio=0.9)
    assert list(answer.chunk_order) == order
    prefix = int(layout.prefix_ids.numel())
    end = prefix + answer.stats.context_tokens
    alpha = int(layout.chunk_ids[0].numel())
    assert set(range(end - alpha, end)) <= set(answer.recomputed_positions.tolist())


@pytest.mark.parametrize("relevance,order", [([1.0, 0.1, 0.6], [1, 3, 4, 5, 6, 0, 2]),
                                             ([0.1, 0.0, 1.0], [0, 1, 3, 4, 5, 6, 2]),
                                             ([0.2, 0.0, 1.0], [1, 3, 4, 5, 6, 0, 2]),
                                             ([0.5, 1.0, 0.19], [2, 3, 4, 5, 6, 0, 1]),
                                             ([0.0, 0.0, 0.0], [0, 1, 2, 3, 4, 5, 6])])
def test_prophet_focus_moves_every_chunk_anchored_at_a_fifth_of_the_best_in_order(make_engine, relevance, order):
    engine = make_engine("llama")
    layout = engine.builder.layout(SEVEN, QUERY)
    request = Selection(engine.adapter, SelectionConfig(method="prophet_focus"), layout.chunk_ids,
                                  layout.suffix_ids)
    # the cached property, set as the request's signal; the fillers anchor nothing and never move
    request.__dict__["anchored"] = torch.tensor(relevance + [0.0] * len(FILLERS))
    got = methods.get("prophet_focus").order(
        request, lambda order, global_positions: engine.prefiller.assemble(layout, order, layout.total_tokens,
                                                                  global_positions)[0])
    assert got == order


def test_anchored_relevance_counts_attention_on_rare_question_words_only():
    from prophet_rag.selection.signals import anchored_relevance

    chunks = [torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]), torch.tensor([1, 5, 6]), torch.tensor([1, 7, 8])]
    mass = torch.tensor([9.0, 0, 0, 0, 0, 0.5, 5, 5, 5, 5, 5, 5])  # heavy on the shared token 1 and on others
    relevance = anchored_relevance(chunks, torch.tensor([1, 4, 9]), mass)
    # token 1 is in every chunk and weighs nothing; token 4 is only in chunk 1, and only its mass counts
    assert relevance.tolist() == pytest.approx([0.0, 0.5 * float(torch.log(torch.tensor(5 / 1.5))), 0.0, 0.0])


def test_prophet_focus_keeps_the_order_when_the_question_shares_no_word(make_engine):
    engine = make_engine("llama")
    answer = engine.answer(CHUNKS, "zzz qqq", method="prophet_focus", ratio=0.2)
    assert list(answer.chunk_order) == [0, 1, 2]


def _focus_request(engine, ratio, anchored_tokens=None):
    """A prophet_focus request over the seven tiny chunks, ordered and planned as the engine does; `anchored_tokens`
    (`[C]`, request order) replaces the measured per-token anchored weights."""

    layout = engine.builder.layout(SEVEN, QUERY)
    request = Selection(engine.adapter, SelectionConfig(method="prophet_focus", ratio=ratio),
                                  layout.chunk_ids, layout.suffix_ids)
    if anchored_tokens is not None:
        request.__dict__["anchored_tokens"] = anchored_tokens
    method = methods.get("prophet_focus")
    order = method.order(request, lambda order, global_positions: engine.prefiller.assemble(
        layout, order, layout.total_tokens, global_positions)[0])
    cache, _ = engine.prefiller.assemble(layout, order, layout.total_tokens)
    suffix = cache.append_tokens(layout.suffix_ids)
    total = sum(int(ids.numel()) for ids in layout.chunk_ids)
    chosen = method.plan(request, cache, suffix, budget_for(ratio, total)).selected
    return request, cache, chosen


def _span_of(cache, chunk):
    return cache.chunk_spans[list(cache.order).index(chunk)]


@pytest.mark.parametrize("weights,size,window", [([0, 0, 5, 0, 0, 0], 3, (1, 4)), ([9, 0, 0, 0, 0, 0], 3, (0, 3)),
                                                 ([0, 0, 0, 0, 0, 9], 4, (2, 6)), ([0, 1, 0], 7, (0, 3)),
                                                 ([0, 0, 2, 0, 0, 3], 2, (4, 6)), ([1, 2, 3], 0, (2, 2))])
def test_anchor_window_is_centred_on_the_strongest_anchor_inside_the_chunk(weights, size, window):
    from prophet_rag.selection.prophet_focus import anchor_window

    assert anchor_window(torch.tensor(weights, dtype=torch.float32), size) == window


def test_anchored_weights_are_attention_on_rare_question_words_per_token():
    from prophet_rag.selection.signals import anchored_weights

    chunks = [torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]), torch.tensor([1, 5, 6]), torch.tensor([1, 7, 8])]
    mass = torch.tensor([9.0, 0, 0, 0, 0, 0.5, 5, 5, 5, 5, 5, 5])
    weights = anchored_weights(chunks, torch.tensor([1, 4, 9]), mass)
    idf = float(torch.log(torch.tensor(5 / 1.5)))
    assert weights.tolist() == pytest.approx([0.0] * 5 + [0.5 * idf] + [0.0] * 6)


def test_prophet_focus_recomputes_windows_of_the_focus_chunks_when_none_fits(make_engine):
    engine = make_engine("llama")
    request, cache, chosen = _focus_request(engine, ratio=0.1)  # fewer tokens than any chunk has
    assert chosen.numel() == budget_for(0.1, sum(int(ids.numel()) for ids in request.chunk_ids)) > 0
    relevance = request.anchored
    focus = [i for i in range(len(SEVEN)) if relevance[i] >= FOCUS_SHARE * relevance.max()]
    sizes = [int(ids.numel()) for ids in request.chunk_ids]
    share = chosen.numel() // len(focus)
    inside = 0
    for i in focus:
        start, end = _span_of(cache, i)
        mine = chosen[(chosen >= start) & (chosen < end)]
        assert torch.equal(mine, torch.arange(start, end)[mine[0] - start :][:share])  # one window of its share
        offset = sum(sizes[:i])
        strongest = start + int(torch.argmax(request.anchored_tokens[offset : offset + sizes[i]]))
        assert int(mine[0]) <= strongest <= int(mine[-1])
        inside += mine.numel()
    assert inside == chosen.numel()  # nothing outside the focus chunks: the windows took the whole budget


def test_prophet_focus_splits_what_whole_chunks_leave_among_the_other_focus_chunks(make_engine):
    engine = make_engine("llama")
    layout = engine.builder.layout(SEVEN, QUERY)
    sizes = [int(ids.numel()) for ids in layout.chunk_ids]
    anchors = torch.zeros(sum(sizes))
    anchors[2] = 1.0  # chunk 0 is the best: recomputed whole
    anchors[sizes[0] + 3] = 0.9  # chunks 1 and 2 are focus chunks too (>= FOCUS_SHARE of the best)
    anchors[sizes[0] + sizes[1] + sizes[2] - 1] = 0.8
    ratio = (sizes[0] + 8) / sum(sizes)  # the best one whole and 4 tokens for each of the others
    request, cache, chosen = _focus_request(engine, ratio, anchors)
    assert list(cache.order)[-3:] == [0, 1, 2]  # all three moved, in retrieval order
    picked = set(chosen.tolist())
    first, second, third = (set(range(*_span_of(cache, i))) for i in range(3))
    assert first <= picked
    second_start, third_end = _span_of(cache, 1)[0], _span_of(cache, 2)[1]
    assert picked & second == set(range(second_start + 1, second_start + 5))  # centred on its anchor, token 3
    assert picked & third == set(range(third_end - 4, third_end))  # its anchor is its last token


def test_prophet_anchor_selects_like_focus_but_moves_no_chunk(make_engine):
    engine = make_engine("llama")
    focus = engine.answer(SEVEN, QUERY, method="prophet_focus", ratio=0.3)
    anchor = engine.answer(SEVEN, QUERY, method="prophet_anchor", ratio=0.3)
    assert list(focus.chunk_order) != list(range(len(SEVEN)))  # here the default moves a chunk
    assert list(anchor.chunk_order) == list(range(len(SEVEN)))
    assert anchor.stats.recomputed_tokens == int(0.3 * anchor.stats.context_tokens)
