"""The in-memory tier in front of the disk store: LRU within a byte bound, and the same answers as without it."""

from __future__ import annotations

import pytest
import torch

from prophet_rag.cache.hot_cache import HotCache
from prophet_rag.cache.tier import ChunkRef
from prophet_rag.compute.chunk_kv import ChunkKV
from prophet_rag.config import GenerationConfig
from prophet_rag.errors import InvalidRequestError
from tiny import CHUNKS, QUERY

GEN = GenerationConfig(max_new_tokens=4, eos_token_ids=(10**6,))


def _ref(key: str) -> ChunkRef:
    return ChunkRef(key, torch.arange(1), torch.arange(0))


def _kv(tokens: int) -> ChunkKV:
    """A chunk whose KV takes 100 bytes per token: 1 layer x (K, V) x 1 head x 25 dims x 2 bytes (fp16)."""
    return ChunkKV(torch.arange(tokens), torch.arange(tokens), torch.zeros(1, 2, tokens, 1, 25, dtype=torch.float16))


def test_entry_size_is_what_the_bound_counts():
    assert _kv(3).nbytes == 300


def test_get_returns_what_was_put():
    cache = HotCache(1000)
    kv = _kv(2)
    cache.put(_ref("a"), kv)
    assert cache.get(_ref("a")) is kv
    assert cache.get(_ref("b")) is None


def test_least_recently_used_entry_is_evicted_first():
    cache = HotCache(500)
    cache.put(_ref("a"), _kv(2))
    cache.put(_ref("b"), _kv(2))
    cache.get(_ref("a"))  # "b" is now the least recently used
    cache.put(_ref("c"), _kv(2))
    assert cache.get(_ref("b")) is None
    assert cache.get(_ref("a")) is not None and cache.get(_ref("c")) is not None
    assert cache.nbytes == 400 and len(cache) == 2


def test_bytes_never_exceed_the_limit():
    cache = HotCache(1000)
    for i in range(20):
        cache.put(_ref(str(i)), _kv(1 + i % 4))
        assert cache.nbytes <= 1000
    assert cache.nbytes == sum(cache.get(_ref(k)).nbytes for k in list(cache._entries))


def test_an_entry_larger_than_the_limit_is_not_kept():
    cache = HotCache(250)
    cache.put(_ref("small"), _kv(1))
    cache.put(_ref("big"), _kv(3))
    assert cache.get(_ref("big")) is None
    assert cache.get(_ref("small")) is not None


def test_putting_a_key_again_replaces_it_without_double_counting():
    cache = HotCache(1000)
    cache.put(_ref("a"), _kv(2))
    cache.put(_ref("a"), _kv(3))
    assert cache.nbytes == 300 and len(cache) == 1


def test_zero_limit_keeps_nothing():
    cache = HotCache(0)
    cache.put(_ref("a"), _kv(1))
    assert len(cache) == 0 and cache.get(_ref("a")) is None


@pytest.mark.parametrize("bad", [-1, 1.5, "1GB"])
def test_bad_limit_is_refused_with_the_fix(bad):
    with pytest.raises(InvalidRequestError, match="hot_cache_bytes must be an integer >= 0"):
        HotCache(bad)


def test_engine_refuses_a_negative_hot_cache(make_engine):
    with pytest.raises(InvalidRequestError, match="hot_cache_bytes"):
        make_engine("llama", hot_cache_bytes=-5)


def test_warm_request_is_served_from_memory_without_reading_the_store(make_engine, monkeypatch):
    engine = make_engine("llama", hot_cache_bytes=2**30)
    first = engine.answer(CHUNKS, QUERY, generation=GEN, return_logits=True)
    reads = []
    original = engine.store.get
    monkeypatch.setattr(engine.store, "get", lambda *a, **k: reads.append(a) or original(*a, **k))
    second = engine.answer(CHUNKS, QUERY, generation=GEN, return_logits=True)
    assert reads == []
    assert second.stats.cache_hits == len(CHUNKS) and second.stats.cache_misses == 0
    assert second.token_ids == first.token_ids
    torch.testing.assert_close(second.first_token_logits, first.first_token_logits, rtol=0, atol=0)


def test_answers_match_an_engine_without_the_memory_tier(make_engine):
    cold = make_engine("llama")
    hot = make_engine("llama", hot_cache_bytes=2**30)
    for _ in range(2):
        a = cold.answer(CHUNKS, QUERY, generation=GEN, return_logits=True)
        b = hot.answer(CHUNKS, QUERY, generation=GEN, return_logits=True)
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.first_token_logits, b.first_token_logits, rtol=0, atol=0)


def test_memory_tier_entries_are_not_changed_by_requests(make_engine):
    engine = make_engine("llama", hot_cache_bytes=2**30)
    engine.answer(CHUNKS, QUERY, generation=GEN)
    before = {key: kv.kv.clone() for key, kv in engine.hot._entries.items()}
    engine.answer(list(reversed(CHUNKS)), QUERY, generation=GEN)  # other positions: keys are re-rotated
    for key, kv in before.items():
        assert torch.equal(engine.hot.get(_ref(key)).kv, kv)


def test_host_tier_keeps_a_host_copy_and_fills_the_slots():
    """The host tier stores device entries in host memory and copies them into `out` on a get (on CPU-only
    machines the device is the host, so this checks the bookkeeping; the pinned copy needs CUDA)."""
    tier = HotCache(1000, host=True)
    assert tier.name == "host"
    kv = _kv(2)
    tier.put(_ref("a"), kv)
    out = torch.empty_like(kv.kv)
    got = tier.get(_ref("a"), None, out)
    assert torch.equal(got.kv, kv.kv)


def test_host_tier_error_names_its_option():
    with pytest.raises(InvalidRequestError, match="host_cache_bytes must be an integer >= 0"):
        HotCache(-1, host=True)


def test_engine_has_memory_host_and_disk_tiers(make_engine):
    engine = make_engine("llama", hot_cache_bytes=2**20, host_cache_bytes=2**20)
    assert [tier.name for tier in engine.cache.tiers] == ["memory", "host", "disk"]
    first = engine.answer(CHUNKS, QUERY, generation=GEN, return_logits=True)
    engine.hot.clear()
    second = engine.answer(CHUNKS, QUERY, generation=GEN, return_logits=True)
    assert engine.cache.tier("host").stats().hits == len(CHUNKS) + 1  # the chunks and the prefix
    torch.testing.assert_close(second.first_token_logits, first.first_token_logits, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_tier_pins_device_entries_and_copies_back_to_the_device():
    tier = HotCache(2**20, host=True)
    kv = ChunkKV(torch.arange(2), torch.arange(2), torch.randn(1, 2, 2, 1, 8, device="cuda"))
    tier.put(_ref("a"), kv)
    stored = tier._entries["a"].kv
    assert stored.device.type == "cpu" and stored.is_pinned()
    out = torch.empty_like(kv.kv)
    assert tier.get(_ref("a"), None, out).kv is out
    torch.cuda.synchronize()
    assert torch.equal(out, kv.kv)
