"""stage1_forward (the fused Stage I) against today's path: query_relevance's scores and forward_rows' hidden states."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from prophet_rag.kernels import use_backend
from prophet_rag.selectors import default_infoflow_layers, query_relevance
from prophet_rag.stage1 import stage1_forward
from prophet_rag.stitched import forward_rows
from tiny import CHUNKS, FAMILIES, QUERY

# The interpreter evaluates masked-off lanes too (log2(0) for an empty split, 0 / 0 for padding rows), and numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@torch.no_grad()
def stitched(engine):
    layout = engine.builder.layout(CHUNKS, QUERY)
    cache, _ = engine._assemble(layout, [2, 0, 1], layout.total_tokens)
    return cache, cache.append_tokens(layout.suffix_ids)


def clone(cache):
    return replace(cache, kv=cache.kv.clone(), token_ids=cache.token_ids.clone(), positions=cache.positions.clone())


def todays_stage1(adapter, cache, suffix, kind, layers):
    """query_relevance's scores; the suffix's hidden states and the cache after forward_rows up to the last scoring
    layer."""
    scores = query_relevance(adapter, clone(cache), suffix, kind, layers)
    after = clone(cache)
    last = adapter.spec.num_layers - 1 if layers is None else max(layers)
    hidden, _ = forward_rows(adapter, after, suffix, last_layer=last)
    return scores, hidden, after


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["prophet", "infoflow"])
def test_torch_backend_is_bit_identical(make_engine, family, kind):
    engine = make_engine(family)
    cache, suffix = stitched(engine)
    layers = None if kind == "prophet" else (0,)  # infoflow: stop after layer 0 of 2, as query_relevance does
    expected_scores, expected_hidden, expected_cache = todays_stage1(engine.adapter, cache, suffix, kind, layers)

    scores, hidden = stage1_forward(engine.adapter, cache, suffix, kind, layers)

    assert torch.equal(scores, expected_scores)
    assert torch.equal(hidden, expected_hidden)
    assert torch.equal(cache.kv[:, :, : cache.length], expected_cache.kv[:, :, : cache.length])


@pytest.mark.parametrize("kind", ["prophet", "infoflow"])
def test_triton_backend_matches(make_engine, kind):
    """The fused Triton kernel (interpreted on CPU) through a whole tiny model: same scores and hidden states."""
    engine = make_engine("llama", model_overrides=dict(num_hidden_layers=3))
    cache, suffix = stitched(engine)
    layers = None if kind == "prophet" else default_infoflow_layers(3)[:2]
    expected_scores, expected_hidden, _ = todays_stage1(engine.adapter, cache, suffix, kind, layers)
    with use_backend("triton"):
        scores, hidden = stage1_forward(engine.adapter, cache, suffix, kind, layers)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-4, atol=1e-4)
