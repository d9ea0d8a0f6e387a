"""ProphetKV's Stage I through a whole model: the fused stage1_attention (Triton, interpreted on CPU) gives the
scores and the suffix's K/V of the torch path, which runs the reference ops."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from prophet_rag.compute.scoring import query_relevance, query_relevance_twice
from prophet_rag.compute.stitched import reorder, reposition, stitched_layout
from prophet_rag.kernels import use_backend
from prophet_rag.selection.signals import default_infoflow_layers
from tiny import CHUNKS, QUERY

# The interpreter evaluates masked-off lanes too (log2(0) for an empty split, 0 / 0 for padding rows), and numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@torch.no_grad()
def stitched(engine):
    layout = engine.builder.layout(CHUNKS, QUERY)
    cache, _ = engine.prefiller.assemble(layout, [2, 0, 1], layout.total_tokens)
    return cache, cache.append_tokens(layout.suffix_ids)


def clone(cache):
    return replace(cache, kv=cache.kv.clone(), token_ids=cache.token_ids.clone(), positions=cache.positions.clone())


@pytest.mark.parametrize("kind", ["prophet", "infoflow"])
def test_triton_backend_matches_the_torch_path(make_engine, kind):
    engine = make_engine("llama", model_overrides=dict(num_hidden_layers=3))
    cache, suffix = stitched(engine)
    layers = None if kind == "prophet" else default_infoflow_layers(3)[:2]
    torch_cache, triton_cache = clone(cache), clone(cache)
    expected = query_relevance(engine.adapter, torch_cache, suffix, kind, layers)
    with use_backend("triton"):
        scores = query_relevance(engine.adapter, triton_cache, suffix, kind, layers)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    last = max(layers) if layers else 2
    torch.testing.assert_close(triton_cache.kv[: last + 1, :, suffix], torch_cache.kv[: last + 1, :, suffix],
                               rtol=1e-4, atol=1e-4)


@torch.no_grad()
def _parallel(engine, layout):
    """The request in its own order with its blocks as stored, the suffix appended (`prophet_focus`'s ordering)."""
    cache = stitched_layout(engine.adapter, layout.prefix_ids, layout.chunk_ids, range(len(layout.chunk_ids)),
                            layout.total_tokens, engine.kv_dtype)
    engine.cache.load(layout, cache)
    reposition(engine.adapter, cache, int(engine.sink_ids.numel()), False)
    return cache, cache.append_tokens(layout.suffix_ids)


@torch.no_grad()
def test_scoring_twice_equals_each_layout_scored_alone(make_engine):
    """One forward of both passes: the parallel geometry's scores, then the retrieval layout's, as two separate
    Stage I passes give them (the second over the cache `reorder` lays out), and the cache left in that layout."""
    engine = make_engine("llama")
    layout = engine.builder.layout(CHUNKS, QUERY)
    engine.ingest(CHUNKS)
    cache, suffix = _parallel(engine, layout)
    alone, alone_suffix = _parallel(engine, layout)
    expected_parallel = query_relevance(engine.adapter, alone, alone_suffix, "prophet", None)
    reorder(engine.adapter, alone, range(len(CHUNKS)), int(engine.sink_ids.numel()))
    alone_suffix = alone.append_tokens(layout.suffix_ids)
    expected_laid_out = query_relevance(engine.adapter, alone, alone_suffix, "prophet", None)

    parallel, laid_out = query_relevance_twice(engine.adapter, cache, suffix)

    torch.testing.assert_close(parallel, expected_parallel, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(laid_out, expected_laid_out, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(parallel, laid_out)  # two geometries, two sets of scores
    n = alone.length
    assert torch.equal(cache.positions[:n], alone.positions[:n])
    torch.testing.assert_close(cache.kv[:, :, :n], alone.kv[:, :, :n], rtol=1e-6, atol=1e-6)
