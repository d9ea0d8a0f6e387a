"""Recompute-everything equals full prefill; recompute-nothing equals reuse; the mask is exact."""

from __future__ import annotations

import pytest
import torch

from prophet_rag.config import GenerationConfig
from tiny import CHUNKS, FAMILIES, FILLERS, QUERY

GREEDY = GenerationConfig(max_new_tokens=6, eos_token_ids=(10**6,))
SCORED = ("prophet", "infoflow", "cacheblend", "epic", "random")


def _hf_reference(engine, chunks=CHUNKS, query=QUERY, new_tokens=6):
    ids = engine.builder.layout(chunks, query).joined_ids()[None]
    model = engine.adapter.model
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
        tokens = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, ids.shape[1]:]
    return logits, tokens.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_full_method_matches_transformers_forward_and_generate(make_engine, family):
    engine = make_engine(family)
    logits, tokens = _hf_reference(engine)
    answer = engine.answer(CHUNKS, QUERY, method="full", generation=GREEDY, return_logits=True)
    torch.testing.assert_close(answer.first_token_logits, logits, atol=1e-5, rtol=1e-5)
    assert list(answer.token_ids) == tokens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", SCORED)
def test_ratio_one_reproduces_full_prefill(make_engine, family, method):
    engine = make_engine(family)
    logits, tokens = _hf_reference(engine)
    answer = engine.answer(CHUNKS, QUERY, method=method, ratio=1.0, generation=GREEDY, return_logits=True)
    torch.testing.assert_close(answer.first_token_logits, logits, atol=1e-5, rtol=1e-5)
    assert list(answer.token_ids) == tokens
    assert answer.stats.recomputed_tokens == answer.stats.context_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_reuse_differs_from_full_prefill(make_engine, family):
    # Guards the two tests above: if isolated caches already matched full prefill they would prove nothing.
    engine = make_engine(family)
    logits, _ = _hf_reference(engine)
    answer = engine.answer(CHUNKS, QUERY, method="reuse", generation=GREEDY, return_logits=True)
    assert (answer.first_token_logits - logits).abs().max() > 1e-3


@pytest.mark.parametrize("method", SCORED)
def test_ratio_zero_equals_reuse(make_engine, method):
    engine = make_engine("llama")
    reuse = engine.answer(CHUNKS, QUERY, method="reuse", generation=GREEDY, return_logits=True)
    answer = engine.answer(CHUNKS, QUERY, method=method, ratio=0.0, generation=GREEDY, return_logits=True)
    assert answer.stats.recomputed_tokens == 0
    torch.testing.assert_close(answer.first_token_logits, reuse.first_token_logits, atol=0, rtol=0)
    assert answer.token_ids == reuse.token_ids


def test_prophet_partial_recompute_moves_towards_full(make_engine):
    engine = make_engine("llama")
    logits, _ = _hf_reference(engine)
    reuse = engine.answer(CHUNKS, QUERY, method="reuse", generation=GREEDY, return_logits=True)
    half = engine.answer(CHUNKS, QUERY, method="prophet", ratio=0.5, generation=GREEDY, return_logits=True)
    assert (half.first_token_logits - logits).norm() < (reuse.first_token_logits - logits).norm()


def test_recomputed_token_ignores_later_tokens(make_engine):
    """A recomputed token's K/V must not depend on anything after it (exact position mask)."""
    from prophet_rag.compute.stitched import forward_rows

    engine = make_engine("llama")

    def first_chunk_kv(last_chunk: str) -> torch.Tensor:
        layout = engine.builder.layout([CHUNKS[0], CHUNKS[1], last_chunk], QUERY)
        cache, _ = engine.prefiller.assemble(layout, [0, 1, 2], layout.total_tokens)
        cache.append_tokens(layout.suffix_ids)
        start, end = cache.chunk_spans[0]
        rows = torch.arange(start, end)  # recompute the first chunk only; later chunks stay in the cache
        forward_rows(engine.adapter, cache, rows)
        return cache.kv[:, :, start:end].clone()

    torch.testing.assert_close(first_chunk_kv(CHUNKS[2]), first_chunk_kv("Completely different text here."),
                               atol=0, rtol=0)


def test_rows_need_not_be_the_whole_suffix_to_be_exact(make_engine):
    """Recomputing every row of a prompt in two passes (prefix of rows, then the rest) equals one pass."""
    from prophet_rag.compute.stitched import StitchedCache, forward_rows

    engine = make_engine("qwen3")
    ids = engine.builder.layout(CHUNKS, QUERY).joined_ids()
    one = StitchedCache.empty(engine.adapter, ids.numel(), torch.float32)
    rows = one.append_tokens(ids)
    hidden_one, _ = forward_rows(engine.adapter, one, rows)
    two = StitchedCache.empty(engine.adapter, ids.numel(), torch.float32)
    rows = two.append_tokens(ids)
    split = ids.numel() // 2
    two.length = split
    forward_rows(engine.adapter, two, rows[:split])
    two.length = ids.numel()
    hidden_two, _ = forward_rows(engine.adapter, two, rows[split:])
    torch.testing.assert_close(hidden_two, hidden_one[split:], atol=1e-5, rtol=1e-5)


def test_reordering_keeps_every_chunk_and_reports_order(make_engine):
    from prophet_rag.config import SelectionConfig

    engine = make_engine("llama")
    answer = engine.answer(CHUNKS, QUERY, selection=SelectionConfig(method="infoflow", ratio=0.3,
                                                                     reorder_chunks=True), generation=GREEDY)
    assert sorted(answer.chunk_order) == [0, 1, 2]
    assert answer.stats.recomputed_tokens == int(0.3 * answer.stats.context_tokens)


def test_reordered_ratio_one_matches_full_prefill_of_reordered_prompt(make_engine):
    from prophet_rag.config import SelectionConfig

    engine = make_engine("llama")
    answer = engine.answer(CHUNKS, QUERY, selection=SelectionConfig(method="prophet", ratio=1.0, reorder_chunks=True),
                           generation=GREEDY, return_logits=True)
    layout = engine.builder.layout(CHUNKS, QUERY)
    ids = layout.joined_ids(answer.chunk_order)[None]
    with torch.no_grad():
        logits = engine.adapter.model(ids).logits[0, -1].float()
    torch.testing.assert_close(answer.first_token_logits, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prophet_focus_at_ratio_one_matches_full_prefill_of_its_order(make_engine, family):
    engine = make_engine(family)
    chunks = (*CHUNKS, *FILLERS)  # a few anchored chunks among seven: not spread, so they may move
    answer = engine.answer(chunks, QUERY, method="prophet_focus", ratio=1.0, generation=GREEDY, return_logits=True)
    ids = engine.builder.layout(chunks, QUERY).joined_ids(answer.chunk_order)[None]
    with torch.no_grad():
        logits = engine.adapter.model(ids).logits[0, -1].float()
    torch.testing.assert_close(answer.first_token_logits, logits, atol=1e-5, rtol=1e-5)
