"""The chunk cache over its tiers: lookup order, write-back, compute on a miss, and a new tier as one class."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from prophet_rag.cache.chunk_cache import ChunkCache, build_tiers
from prophet_rag.cache.codec import EntryMeta
from prophet_rag.cache.hot_cache import HotCache
from prophet_rag.cache.store import KVStore
from prophet_rag.cache.tier import ChunkRef, KVTier, one_request, request_state
from prophet_rag.compute.chunk_kv import ChunkKV
from prophet_rag.compute.stitched import StitchedCache
from prophet_rag.config import GenerationConfig, StoreConfig
from prophet_rag.errors import CacheCorruptionError
from prophet_rag.layout import RequestLayout
from tiny import CHUNKS, QUERY

GEN = GenerationConfig(max_new_tokens=4, eos_token_ids=(10**6,))
META = EntryMeta("model", "tokenizer", torch.float32, num_layers=2, num_kv_heads=1, head_dim=4)


@dataclass(frozen=True)
class DictStats:
    gets: int
    puts: int


class DictTier:
    """A minimal tier: what a third tier (pinned host memory, a remote server) has to provide."""

    def __init__(self, name: str = "dict") -> None:
        self.name = name
        self.entries: dict[str, ChunkKV] = {}
        self.gets = self.puts = 0

    def get(self, ref, meta, out=None):
        self.gets += 1
        return self.entries.get(ref.key)

    def put(self, ref, chunk, meta):
        self.puts += 1
        self.entries[ref.key] = chunk
        return True

    def contains(self, key):
        return key in self.entries

    def stats(self):
        return DictStats(self.gets, self.puts)

    def close(self):
        self.entries.clear()


def _kv(ids: torch.Tensor, start: int = 1) -> ChunkKV:
    n = int(ids.numel())
    return ChunkKV(ids, torch.arange(start, start + n), torch.full((2, 2, n, 1, 4), float(ids.sum())))


class Computer:
    def __init__(self) -> None:
        self.calls: list[list[list[int]]] = []

    def __call__(self, sink, chunks):
        self.calls.append([c.tolist() for c in chunks])
        return [_kv(c, int(sink.numel())) for c in chunks]


def _layout(*chunks: list[int], prefix=(7, 8)) -> RequestLayout:
    return RequestLayout(torch.tensor(prefix), tuple(torch.tensor(c) for c in chunks), torch.tensor([9]))


def _cache(tiers, compute=None):
    return ChunkCache(tiers, META, torch.tensor([1]), compute or Computer())


def _load(cache: ChunkCache, layout: RequestLayout):
    """Fill a stand-in stitched cache (2 layers, 1 KV head, head_dim 4) and return it with the load counts."""
    stitched = StitchedCache(torch.full((2, 2, layout.total_tokens, 1, 4), float("nan")),
                             torch.zeros(layout.total_tokens, dtype=torch.long), torch.arange(layout.total_tokens),
                             0, 0, ())
    stitched.append_tokens(layout.prefix_ids)
    stitched.prefix_len = int(layout.prefix_ids.numel())
    spans = []
    for ids in layout.chunk_ids:
        slots = stitched.append_tokens(ids)
        spans.append((int(slots[0]), int(slots[-1]) + 1))
    stitched.chunk_spans, stitched.order = tuple(spans), tuple(range(len(spans)))
    return stitched, cache.load(layout, stitched)


def test_memory_host_and_disk_tiers_follow_the_protocol(tmp_path):
    tiers = build_tiers(StoreConfig(directory=tmp_path / "s"), 1024, 2048)
    assert [tier.name for tier in tiers] == ["memory", "host", "disk"]
    assert all(isinstance(tier, KVTier) for tier in tiers)
    assert isinstance(tiers[0], HotCache) and isinstance(tiers[2], KVStore)
    assert (tiers[0].limit_bytes, tiers[1].limit_bytes) == (1024, 2048)
    assert isinstance(DictTier(), KVTier)
    tiers[2].close()


def test_an_open_store_is_used_as_the_disk_tier(tmp_path):
    store = KVStore(StoreConfig(directory=tmp_path / "s"))
    assert build_tiers(store)[-1] is store
    store.close()


def test_misses_are_computed_once_per_sink_group_and_written_to_every_tier():
    fast, slow, compute = DictTier("fast"), DictTier("slow"), Computer()
    cache = _cache([fast, slow], compute)
    stitched, loaded = _load(cache, _layout([2, 3], [4, 5, 6], [2, 3]))
    assert (loaded.hits, loaded.misses) == (0, 2)  # the repeated chunk counts once; the prefix never counts
    assert compute.calls == [[[7, 8]], [[2, 3], [4, 5, 6]]]  # the prefix behind nothing, then the chunks
    assert len(fast.entries) == len(slow.entries) == 3
    # Every slot is filled with its block: prefix (sum 15), chunks (5, 15, 5), nothing left unset.
    assert stitched.kv[0, 0, :9, 0, 0].tolist() == [15, 15, 5, 5, 15, 15, 15, 5, 5]


def test_a_hit_in_a_slower_tier_is_written_back_to_the_faster_ones():
    fast, slow, compute = DictTier("fast"), DictTier("slow"), Computer()
    layout = _layout([2, 3])
    _load(_cache([slow], compute), layout)
    cache = _cache([fast, slow], compute)
    _, loaded = _load(cache, layout)
    assert (loaded.hits, loaded.misses) == (1, 0)
    assert len(compute.calls) == 2  # only the first load computed
    assert set(fast.entries) == set(slow.entries)
    fast_gets, slow_gets = fast.gets, slow.gets
    _load(cache, layout)
    assert (fast.gets - fast_gets, slow.gets - slow_gets) == (2, 0)  # served by the fast tier alone


class OutTier(DictTier):
    """A tier that writes into the caller's slots, as the disk store does."""

    def get(self, ref, meta, out=None):
        chunk = super().get(ref, meta)
        if chunk is None or out is None:
            return chunk
        out.copy_(chunk.kv)
        return ChunkKV(chunk.token_ids, chunk.positions, out)


def test_write_back_from_a_tier_that_filled_the_slots_is_a_copy():
    fast, slow = DictTier("fast"), OutTier("slow")
    layout = _layout([2, 3])
    _load(_cache([slow]), layout)
    stitched, _ = _load(_cache([fast, slow]), layout)
    kept = next(iter(fast.entries.values()))
    stitched.kv.fill_(-1.0)  # the request goes on to change its cache (re-rotation)
    assert bool((kept.kv >= 0).all())


def test_refs_carry_what_the_key_was_derived_from():
    cache = _cache([DictTier()])
    ref = cache.ref(torch.tensor([4, 5, 6]), torch.tensor([1]))
    assert isinstance(ref, ChunkRef) and ref.positions.tolist() == [1, 2, 3] and ref.num_tokens == 3
    assert ref.key != cache.ref(torch.tensor([4, 5, 6]), torch.tensor([], dtype=torch.long)).key
    assert ref.key != cache.ref(torch.tensor([6, 5, 4]), torch.tensor([1])).key


def test_ingest_computes_only_what_no_tier_holds_in_bounded_batches():
    tier, compute = DictTier(), Computer()
    cache = _cache([tier], compute)
    assert cache.ingest([torch.tensor([2, 3]), torch.tensor([4, 5]), torch.tensor([2, 3])], batch_tokens=2) == 2
    assert compute.calls == [[[2, 3]], [[4, 5]]]
    assert cache.ingest([torch.tensor([2, 3]), torch.tensor([6])]) == 1


def test_stats_and_close_reach_every_tier():
    first, second = DictTier("a"), DictTier("b")
    cache = _cache([first, second])
    _load(cache, _layout([2]))
    assert set(cache.stats()) == {"a", "b"}
    assert cache.stats()["b"].puts == 2
    cache.close()
    assert not first.entries and not second.entries


def test_tier_names_must_be_unique():
    with pytest.raises(AssertionError):
        _cache([DictTier("x"), DictTier("x")])


def test_engine_with_a_third_tier_answers_identically(make_engine):
    plain = make_engine("llama")
    engine = make_engine("llama")
    extra = DictTier()
    engine.cache.tiers.insert(1, extra)
    first = engine.answer(CHUNKS, QUERY, generation=GEN, return_logits=True)
    assert len(extra.entries) == len(CHUNKS) + 1
    engine.cache.tiers[0].clear()
    second = engine.answer(CHUNKS, QUERY, generation=GEN, return_logits=True)
    reference = plain.answer(CHUNKS, QUERY, generation=GEN, return_logits=True)
    assert second.stats.cache_hits == len(CHUNKS)
    assert first.token_ids == second.token_ids == reference.token_ids
    torch.testing.assert_close(second.first_token_logits, reference.first_token_logits, rtol=0, atol=0)


class _Counted:
    """A tier's per-request state (`tier.request_state`): the calls it saw, and whether its request ended."""

    def __init__(self) -> None:
        self.calls, self.finished = 0, False

    def finish(self) -> None:
        self.finished = True


class RequestTier(DictTier):
    """A DictTier that records its per-request state on every call."""

    def __init__(self) -> None:
        super().__init__("per-request")
        self.states: list[_Counted] = []

    def _state(self) -> None:
        state = request_state(self, _Counted)
        state.calls += 1
        if state not in self.states:
            self.states.append(state)

    def get(self, ref, meta, out=None):
        self._state()
        return super().get(ref, meta, out)

    def put(self, ref, chunk, meta):
        self._state()
        return super().put(ref, chunk, meta)


def test_one_load_is_one_request_for_every_tier_call(make_engine):
    engine = make_engine("llama")
    tier = RequestTier()
    engine.cache.tiers.append(tier)
    engine.answer(CHUNKS, QUERY, generation=GEN)
    engine.answer([CHUNKS[0] + " One more line."], QUERY, generation=GEN)  # a chunk no tier holds yet
    # Each answer's gets and puts share one state, finished when its load ended.
    assert len(tier.states) == 2 and all(state.finished for state in tier.states)
    assert tier.states[0].calls == 2 * (len(CHUNKS) + 1)  # a get, then a put, for the prefix and every chunk


def test_nested_requests_belong_to_the_outer_one():
    owner = object()
    with one_request():
        outer = request_state(owner, _Counted)
        with one_request():
            assert request_state(owner, _Counted) is outer
        assert not outer.finished
    assert outer.finished


def test_engine_exposes_its_context_window(make_engine):
    engine = make_engine("llama")
    assert engine.context_window == engine.adapter.spec.max_positions == 512


# ---- layer-by-layer loading (pipelined store reads) ----------------------------------------------------------------


class LayeredDictTier(DictTier):
    """A tier read layer by layer, as the disk store is; `fail_at` makes one layer's check fail."""

    def __init__(self, name: str = "layered", fail_at: int | None = None) -> None:
        super().__init__(name)
        self.fail_at, self.opened, self.discarded, self.layers_read = fail_at, 0, [], []

    def open(self, ref, meta):
        chunk = self.entries.get(ref.key)
        if chunk is None:
            return None
        self.opened += 1
        tier = self

        class Entry:
            num_layers = chunk.kv.shape[0]

            def read_layers(self, start, stop, out):
                for layer in range(start, stop):
                    if layer == tier.fail_at:
                        tier.discarded.append(ref.key)
                        del tier.entries[ref.key]
                        raise CacheCorruptionError("planted failure")
                    out[layer].copy_(chunk.kv[layer])
                    tier.layers_read.append(layer)

            def close(self):
                pass

        return Entry()


def test_a_pipelined_load_fills_each_layer_in_the_background():
    tier = LayeredDictTier()
    layout = _layout([2, 3], [4, 5], [2, 3])
    reference, _ = _load(_cache([tier]), layout)
    cache = _cache([tier])
    stitched, loaded = _load_pipelined(cache, layout)
    assert loaded.pending is not None and (loaded.hits, loaded.misses) == (2, 0)
    for layer in range(2):
        loaded.pending.wait(layer)
    assert torch.equal(stitched.kv[:, :, :8], reference.kv[:, :, :8])  # repeated chunk copied too


def test_a_failing_layer_makes_the_request_start_over():
    from prophet_rag.cache.chunk_cache import StaleBlocksError

    tier = LayeredDictTier()
    layout = _layout([2, 3])
    _load(_cache([tier]), layout)
    tier.fail_at = 1
    _, loaded = _load_pipelined(_cache([tier]), layout)
    with pytest.raises(StaleBlocksError):  # at layer 1, or already at layer 0 if the thread got there first
        for layer in range(2):
            loaded.pending.wait(layer)
    assert tier.discarded  # the tier dropped the entry: the next assembly recomputes it


def test_pipelined_write_back_keeps_the_stored_values():
    fast, slow = DictTier("fast"), LayeredDictTier()
    layout = _layout([2, 3])
    _load(_cache([slow]), layout)
    stitched, loaded = _load_pipelined(_cache([fast, slow]), layout)
    loaded.pending.wait(1)
    stitched.kv.fill_(-1.0)  # the request re-rotates its slots as layers arrive
    loaded.pending._thread.join()
    assert all(bool((chunk.kv >= 0).all()) for chunk in fast.entries.values()) and len(fast.entries) == 2


def _load_pipelined(cache: ChunkCache, layout: RequestLayout):
    stitched = StitchedCache(torch.full((2, 2, layout.total_tokens, 1, 4), float("nan")),
                             torch.zeros(layout.total_tokens, dtype=torch.long), torch.arange(layout.total_tokens),
                             0, 0, ())
    stitched.append_tokens(layout.prefix_ids)
    stitched.prefix_len = int(layout.prefix_ids.numel())
    spans = []
    for ids in layout.chunk_ids:
        slots = stitched.append_tokens(ids)
        spans.append((int(slots[0]), int(slots[-1]) + 1))
    stitched.chunk_spans, stitched.order = tuple(spans), tuple(range(len(spans)))
    return stitched, cache.load(layout, stitched, pipeline=True)


@pytest.mark.parametrize("method", ["reuse", "prophet", "cacheblend", "epic", "prophet_plus", "prophet_focus"])
def test_engine_answers_identically_with_blocks_arriving_layer_by_layer(make_engine, method):
    plain, piped = make_engine("qwen2"), make_engine("qwen2")
    layered = LayeredDictTier()
    piped.cache.tiers.insert(0, layered)
    piped.answer(CHUNKS, QUERY, method=method, ratio=0.3, generation=GEN)  # computes and stores everywhere
    expected = plain.answer(CHUNKS, QUERY, method=method, ratio=0.3, generation=GEN, return_logits=True)
    got = piped.answer(CHUNKS, QUERY, method=method, ratio=0.3, generation=GEN, return_logits=True)
    assert layered.opened == len(CHUNKS) + 1
    assert got.token_ids == expected.token_ids
    torch.testing.assert_close(got.first_token_logits, expected.first_token_logits, rtol=0, atol=0)


def test_engine_recomputes_a_block_that_fails_mid_request(make_engine):
    plain, piped = make_engine("llama"), make_engine("llama")
    layered = LayeredDictTier()
    piped.cache.tiers.insert(0, layered)
    piped.answer(CHUNKS, QUERY, generation=GEN)
    for tier in piped.cache.tiers[1:]:
        tier.clear() if hasattr(tier, "clear") else None
    layered.fail_at = 1
    got = piped.answer(CHUNKS, QUERY, generation=GEN, return_logits=True)
    expected = plain.answer(CHUNKS, QUERY, generation=GEN, return_logits=True)
    assert layered.discarded
    assert got.token_ids == expected.token_ids
    torch.testing.assert_close(got.first_token_logits, expected.first_token_logits, rtol=0, atol=0)


def test_a_pipelined_load_copies_nothing_for_tiers_that_are_off(monkeypatch):
    """In-memory tiers of 0 bytes (the default) would refuse every block: the loader keeps no copy for them."""
    slow = LayeredDictTier()
    layout = _layout([2, 3], [4, 5])
    _load(_cache([slow]), layout)
    allocated = []
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: allocated.append(1) or real(*a, **k))
    stitched, loaded = _load_pipelined(_cache([HotCache(0), HotCache(0, host=True), slow]), layout)
    loaded.pending._thread.join()
    assert allocated == []
    assert not stitched.kv[:, :, 2:6].isnan().any()


def test_a_tier_too_small_for_a_block_gets_no_write_back():
    small, slow = HotCache(8), DictTier("slow")
    layout = _layout([2, 3])
    _load(_cache([slow]), layout)
    _load(_cache([small, slow]), layout)
    assert len(small) == 0 and small.stats().misses == 2  # asked first, never handed a copy


def test_hot_cache_keeps_what_fits_its_limit():
    assert HotCache(64).keeps(64) and not HotCache(64).keeps(65) and not HotCache(0).keeps(1)
