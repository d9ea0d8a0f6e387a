"""`stitched.reorder`: a cache assembled in the parallel geometry, laid out again in place in another order, equals
the same request assembled in that order from the store (stitched_layout, load, reposition), bit for bit."""

from __future__ import annotations

import pytest
import torch

from prophet_rag.compute.stitched import lay_out_by_layer, reorder, reposition, stitched_layout
from tiny import CHUNKS, QUERY

DOCS = (*CHUNKS, "A fourth document about harbours and ledgers.", "The fifth one names room 121.")


def parallel(engine, layout, order):
    """The request in `order` with its blocks as stored (as `prophet_focus`'s ordering step assembles it), and the
    suffix appended as its scoring pass appends it."""
    cache = stitched_layout(engine.adapter, layout.prefix_ids, layout.chunk_ids, order, layout.total_tokens,
                            engine.kv_dtype)
    engine.cache.load(layout, cache)
    reposition(engine.adapter, cache, int(engine.sink_ids.numel()), False)
    cache.append_tokens(layout.suffix_ids)
    return cache


def placed(engine, layout, order):
    """The request assembled directly in `order` at global positions: what `reorder` must give."""
    cache = stitched_layout(engine.adapter, layout.prefix_ids, layout.chunk_ids, order, layout.total_tokens,
                            engine.kv_dtype)
    engine.cache.load(layout, cache)
    reposition(engine.adapter, cache, int(engine.sink_ids.numel()))
    return cache


def stored_in_request_order(make_engine):
    """`(engine, layout, cache)`: the request assembled in its own order with its blocks as stored."""
    engine = make_engine("llama")
    layout = engine.builder.layout(DOCS, QUERY)
    engine.ingest(DOCS)
    return engine, layout, parallel(engine, layout, [0, 1, 2, 3, 4])


@pytest.mark.parametrize("start,order", [
    pytest.param([0, 1, 2, 3, 4], [0, 2, 3, 4, 1], id="one-moves-last"),
    pytest.param([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], id="reversed"),
    pytest.param([0, 1, 2, 3, 4], [0, 1, 2, 3, 4], id="nothing-moves"),
    pytest.param([3, 0, 4, 1, 2], [0, 1, 3, 2, 4], id="from-another-order"),
])
@torch.no_grad()
def test_reorder_equals_assembling_in_that_order(make_engine, start, order):
    engine = make_engine("llama")
    layout = engine.builder.layout(DOCS, QUERY)
    engine.ingest(DOCS)
    cache = parallel(engine, layout, start)
    expected = placed(engine, layout, order)

    reorder(engine.adapter, cache, order, int(engine.sink_ids.numel()))

    assert cache.order == tuple(order) and cache.chunk_spans == expected.chunk_spans
    assert cache.length == expected.length == expected.context_end
    n = expected.length
    assert torch.equal(cache.token_ids[:n], expected.token_ids[:n])
    assert torch.equal(cache.positions[:n], expected.positions[:n])
    assert torch.equal(cache.kv[:, :, :n], expected.kv[:, :, :n])


@torch.no_grad()
def test_reorder_keeps_the_buffers_of_the_cache(make_engine):
    engine, layout, cache = stored_in_request_order(make_engine)
    kv = cache.kv

    reorder(engine.adapter, cache, [1, 0, 2, 3, 4], int(engine.sink_ids.numel()))

    assert cache.kv is kv and cache.layer_ready is None


@torch.no_grad()
def test_a_long_block_moved_forward_by_a_short_one_moves_piece_by_piece(make_engine):
    """The short first chunk goes last, the long one moves forward by less than its own length: it is copied in
    several pieces inside its own overlapping slots, and must still come out whole."""
    engine = make_engine("llama")
    docs = ("fox dog " * 5, "Paris is the capital of France. " * 4, QUERY)
    layout = engine.builder.layout(docs, QUERY)
    short, long = (int(ids.numel()) for ids in layout.chunk_ids[:2])
    assert short < long <= 4 * short  # moved forward by `short`: ceil(long / short) > 1 pieces
    engine.ingest(docs)
    cache = parallel(engine, layout, [0, 1, 2])
    expected = placed(engine, layout, [1, 2, 0])

    reorder(engine.adapter, cache, [1, 2, 0], int(engine.sink_ids.numel()))

    n = expected.length
    assert torch.equal(cache.token_ids[:n], expected.token_ids[:n])
    assert torch.equal(cache.kv[:, :, :n], expected.kv[:, :, :n])


@pytest.mark.parametrize("order", [
    pytest.param([0, 1, 2, 3, 4], id="nothing-moves"),
    pytest.param([0, 2, 3, 4, 1], id="one-moves-last"),
    pytest.param([4, 3, 2, 1, 0], id="reversed"),
])
@torch.no_grad()
def test_laid_out_by_layer_then_reordered_equals_assembling_in_that_order(make_engine, order):
    """`prophet_focus`'s two Stage I passes leave the cache laid out in request order; `reorder` then gives the
    request in the method's order as if it had been assembled so: bit for bit where nothing moves, to fp32 rounding
    where a moved chunk's keys are rotated twice (to the retrieval layout, then to their new slots)."""
    engine, layout, cache = stored_in_request_order(make_engine)
    before = cache.positions.clone()
    stored, place = lay_out_by_layer(engine.adapter, cache)
    assert torch.equal(stored, before)
    for layer in range(engine.adapter.spec.num_layers):
        place(layer)
    expected = placed(engine, layout, order)

    reorder(engine.adapter, cache, order, int(engine.sink_ids.numel()))

    n = expected.length
    assert cache.order == tuple(order) and cache.length == n
    assert torch.equal(cache.token_ids[:n], expected.token_ids[:n])
    assert torch.equal(cache.positions[:n], expected.positions[:n])
    if order == sorted(order):
        assert torch.equal(cache.kv[:, :, :n], expected.kv[:, :, :n])
    else:
        torch.testing.assert_close(cache.kv[:, :, :n], expected.kv[:, :, :n], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_lay_out_by_layer_places_only_the_layers_asked_for(make_engine):
    engine, layout, cache = stored_in_request_order(make_engine)
    untouched = cache.kv.clone()
    expected = placed(engine, layout, [0, 1, 2, 3, 4])
    _, place = lay_out_by_layer(engine.adapter, cache)
    place(1)
    context = slice(cache.prefix_len, cache.context_end)
    assert torch.equal(cache.kv[1, :, context], expected.kv[1, :, context])
    assert torch.equal(cache.kv[0], untouched[0]) and torch.equal(cache.kv[2:], untouched[2:])
    assert torch.equal(cache.positions[: cache.context_end], expected.positions[: cache.context_end])


def test_lay_out_by_layer_needs_the_request_order(make_engine):
    engine = make_engine("llama")
    layout = engine.builder.layout(DOCS, QUERY)
    engine.ingest(DOCS)
    with pytest.raises(AssertionError, match="request order"):
        lay_out_by_layer(engine.adapter, parallel(engine, layout, [1, 0, 2, 3, 4]))
