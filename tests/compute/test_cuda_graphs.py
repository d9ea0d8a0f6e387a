"""Bucketed passes for CUDA graphs: the bucketing logic, the padded steps (run eagerly on CPU) against the unpadded
passes, and, on a GPU only, capture and replay."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from prophet_rag.compute.cuda_graphs import GraphedPasses, bucket, pad_rows, round_up
from prophet_rag.compute.scoring import query_relevance
from prophet_rag.compute.stitched import forward_rows
from prophet_rag.kernels import use_backend
from tiny import CHUNKS, QUERY

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# The interpreter evaluates masked-off lanes too (log2(0) for an empty split, 0 / 0 for padding rows), and numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_bucket_is_the_smallest_that_fits():
    assert bucket(1, (8, 16, 32)) == 8
    assert bucket(8, (8, 16, 32)) == 8
    assert bucket(9, (32, 8, 16)) == 16
    assert bucket(33, (8, 16, 32)) is None


def test_round_up_stops_at_the_limit():
    assert round_up(1, 1024, 10**6) == 1024
    assert round_up(1024, 1024, 10**6) == 1024
    assert round_up(1025, 1024, 10**6) == 2048
    assert round_up(1025, 1024, 1500) == 1500


def test_pad_rows_repeats_the_last_row():
    assert pad_rows(torch.tensor([4, 5, 9]), 6).tolist() == [4, 5, 9, 9, 9, 9]
    assert pad_rows(torch.tensor([4]), 1).tolist() == [4]


@torch.no_grad()
def stitched(engine, device, spare=40):
    """A request's cache with `spare` free slots past its end (NaN K/V there: they must never be read)."""
    layout = engine.builder.layout(CHUNKS, QUERY)
    capacity = layout.total_tokens + spare
    cache, _ = engine.prefiller.assemble(layout, [1, 2, 0], capacity)
    suffix = cache.append_tokens(layout.suffix_ids)
    cache.kv[:, :, cache.length :] = float("nan")
    return move(cache, device), suffix.to(device)


def move(cache, device):
    return replace(cache, kv=cache.kv.to(device).clone(), token_ids=cache.token_ids.to(device).clone(),
                   positions=cache.positions.to(device).clone())


def on_cuda(engine):
    engine.adapter.model.to("cuda")
    engine.adapter.inv_freq = engine.adapter.inv_freq.to("cuda")  # a copy taken at construction
    return engine


def check_stage1(passes, cache, suffix, kind, layers, adapter):
    scores = passes.stage1(suffix, kind, layers)
    expected = query_relevance(adapter, move(cache, cache.kv.device), suffix, kind, layers)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["prophet", "infoflow"])
def test_padded_stage1_equals_query_relevance(make_engine, backend, kind):
    """Rows padded to a bucket; keys and context rounded up (by the 1024-slot granule, to the cache's capacity, 40
    slots past the request): same scores."""
    engine = make_engine("llama")
    cache, suffix = stitched(engine, "cpu")
    passes = GraphedPasses(engine.adapter, cache, row_buckets=(4, 64))
    layers = None if kind == "prophet" else (1,)
    with use_backend(backend):
        check_stage1(passes, cache, suffix, kind, layers, engine.adapter)
        # A shorter question in the same buckets reuses the same pass.
        cache.length -= 3
        check_stage1(passes, cache, suffix[:-3], kind, layers, engine.adapter)
    assert len(passes.passes) == 1


def test_stage1_beyond_the_buckets_runs_eagerly(make_engine):
    engine = make_engine("llama")
    cache, suffix = stitched(engine, "cpu")
    passes = GraphedPasses(engine.adapter, cache, row_buckets=(4,))
    check_stage1(passes, cache, suffix, "prophet", None, engine.adapter)
    assert not passes.passes


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_forward_equals_forward_rows(make_engine, backend):
    """The question alone (18 rows padded to 32), then two decode steps (1 row padded to 8)."""
    engine = make_engine("llama")
    cache, suffix = stitched(engine, "cpu")
    passes = GraphedPasses(engine.adapter, cache, row_buckets=(8, 32), key_granule=32)
    with use_backend(backend):
        expected, _ = forward_rows(engine.adapter, move(cache, "cpu"), suffix)
        torch.testing.assert_close(passes.forward(suffix), expected, rtol=1e-4, atol=1e-4)
        for token in (7, 11):
            row = cache.append_tokens(torch.tensor([token]))
            expected, _ = forward_rows(engine.adapter, move(cache, "cpu"), row)
            torch.testing.assert_close(passes.forward(row), expected, rtol=1e-4, atol=1e-4)
    assert {key[1] for key in passes.passes} == {8, 32}


def test_forward_beyond_the_buckets_runs_eagerly(make_engine):
    engine = make_engine("llama")
    cache, suffix = stitched(engine, "cpu")
    passes = GraphedPasses(engine.adapter, cache, row_buckets=(8,))
    expected, _ = forward_rows(engine.adapter, move(cache, "cpu"), suffix)
    torch.testing.assert_close(passes.forward(suffix), expected, rtol=1e-4, atol=1e-4)
    assert not passes.passes


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("kind", ["prophet", "infoflow"])
def test_captured_stage1_replays_for_a_new_request(make_engine, kind):
    """Captured once, replayed for a shorter question in the same buckets: both match the eager pass."""
    engine = on_cuda(make_engine("llama"))
    cache, suffix = stitched(engine, "cuda")
    passes = GraphedPasses(engine.adapter, cache, row_buckets=(64,))
    layers = None if kind == "prophet" else (1,)
    check_stage1(passes, cache, suffix, kind, layers, engine.adapter)
    assert passes.passes[next(iter(passes.passes))].graph is not None
    cache.length -= 3
    check_stage1(passes, cache, suffix[:-3], kind, layers, engine.adapter)
    assert len(passes.passes) == 1


@pytest.mark.gpu
@NEEDS_CUDA
def test_captured_decode_matches_forward_rows(make_engine):
    engine = on_cuda(make_engine("llama"))
    cache, suffix = stitched(engine, "cuda")
    forward_rows(engine.adapter, cache, suffix)
    passes = GraphedPasses(engine.adapter, cache, key_granule=32)
    for token in range(3):
        row = cache.append_tokens(torch.tensor([token + 5], device="cuda"))
        expected, _ = forward_rows(engine.adapter, move(cache, "cuda"), row)
        torch.testing.assert_close(passes.forward(row), expected, rtol=1e-4, atol=1e-4)
        assert next(iter(passes.passes.values())).graph is not None
