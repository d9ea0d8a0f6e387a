"""The chunk cache: every segment's KV for a request, from an ordered list of tiers, computed on a miss.

A tier is one class behind the `KVTier` protocol; `build_tiers` is the one list of them, fastest first: the
in-memory tier (`hot_cache.HotCache`, on the model's device) and the persistent disk store (`store.KVStore`). A
lookup walks the tiers in order and the tier that holds the chunk writes it straight into its slots of the request's
stitched cache (or hands its tensors over to be copied there); the faster tiers that missed it get a copy; a chunk no
tier holds is computed (isolated prefill), copied into its slots and written to every tier. The cache owns the key
derivation and the entry metadata, so a tier only stores and checks what it is handed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from prophet_rag.chunk_kv import ChunkKV
from prophet_rag.codec import EntryMeta
from prophet_rag.config import StoreConfig
from prophet_rag.keys import chunk_key
from prophet_rag.layout import RequestLayout
from prophet_rag.stitched import StitchedCache


@dataclass(frozen=True)
class ChunkRef:
    """One segment's KV as a tier is asked for it: the store key and what the key was derived from."""

    key: str
    token_ids: torch.Tensor
    """`[T]` int64 on the CPU: the segment's tokens."""
    sink_ids: torch.Tensor
    """`[s]` int64 on the CPU: the tokens it was computed behind (empty for the exact prefix)."""

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    @property
    def positions(self) -> torch.Tensor:
        """`[T]` the positions its keys were computed at: right after the sink."""
        start = int(self.sink_ids.numel())
        return torch.arange(start, start + self.num_tokens)


@runtime_checkable
class KVTier(Protocol):
    """One place chunk KV can live. Content problems never raise out of `get`/`put`: they are counted in `stats`
    and mean a miss (the chunk is then recomputed), never a wrong answer."""

    name: str

    def get(self, ref: ChunkRef, meta: EntryMeta, out: torch.Tensor | None = None) -> ChunkKV | None:
        """The chunk `ref` names, checked against `ref` and `meta` (model, layout, shapes), or None.

        `out` is where the caller will put the KV, `[L, 2, T, H_kv, D]` in `meta`'s dtype on the model's device,
        typically a view of the request's stitched cache. A tier that reads or converts the KV anyway writes it
        there and returns a `ChunkKV` whose `kv` is `out`; a tier that holds the KV ready returns its own tensors.
        """

    def put(self, ref: ChunkRef, chunk: ChunkKV, meta: EntryMeta) -> bool:
        """Keep `chunk` under `ref.key`; True when the key now holds an entry. `chunk` stays the caller's: a tier
        that keeps tensors keeps copies of views it does not own."""

    def contains(self, key: str) -> bool: ...

    def stats(self) -> object:
        """A frozen dataclass of this tier's counters."""

    def close(self) -> None: ...


Compute = Callable[[torch.Tensor, list[torch.Tensor]], list[ChunkKV]]
"""`compute(sink_ids, chunks)`: the isolated KV of each chunk `[n_i]` behind `sink_ids` (see prefill.py)."""


def build_tiers(store: StoreConfig | KVTier | None, hot_cache_bytes: int = 0, host_cache_bytes: int = 0
                ) -> list[KVTier]:
    """The tier list, fastest first: device memory, host memory, the disk store. `store` is a `StoreConfig` (None:
    the default directory) or an open store."""
    from prophet_rag.hot_cache import HotCache
    from prophet_rag.store import KVStore

    memory, host = HotCache(hot_cache_bytes), HotCache(host_cache_bytes, host=True)
    disk = store if isinstance(store, KVTier) else KVStore(store or StoreConfig())
    return [memory, host, disk]


@dataclass(frozen=True)
class LoadStats:
    hits: int
    misses: int
    """Distinct chunks found in a tier / computed (the prefix does not count)."""


class ChunkCache:
    """Chunk KV for the segments of request layouts, over `tiers` (fastest first)."""

    def __init__(self, tiers: Sequence[KVTier], meta: EntryMeta, sink_ids: torch.Tensor, compute: Compute) -> None:
        names = [tier.name for tier in tiers]
        assert len(set(names)) == len(names), f"tier names must be unique, got {names}"
        self.tiers = list(tiers)
        self.meta = meta
        self.sink_ids = sink_ids
        self._compute = compute

    def tier(self, name: str) -> KVTier:
        return next(tier for tier in self.tiers if tier.name == name)

    def ref(self, token_ids: torch.Tensor, sink_ids: torch.Tensor) -> ChunkRef:
        key = chunk_key(self.meta.model_fp, self.meta.tokenizer_fp, self.meta.kv_spec, token_ids.tolist(),
                        sink_ids.tolist())
        return ChunkRef(key, token_ids.cpu(), sink_ids.cpu())

    def load(self, layout: RequestLayout, cache: StitchedCache) -> LoadStats:
        """Fill `cache`'s prefix and chunk slots (laid out by `stitched_layout` for `layout`) with the prefix's
        exact KV and each chunk's isolated KV: from the tiers, else computed and stored (unless the layout marks
        it transient)."""
        empty = self.sink_ids[:0]
        slot_of = {i: span for span, i in zip(cache.chunk_spans, cache.order, strict=True)}
        wanted = [(self.ref(layout.prefix_ids, empty), (0, cache.prefix_len), not layout.transient_prefix)]
        wanted += [(self.ref(ids, self.sink_ids), slot_of[i], not layout.is_transient(i))
                   for i, ids in enumerate(layout.chunk_ids)]
        filled: dict[str, torch.Tensor] = {}
        keep: set[str] = set()
        missing: dict[str, tuple[ChunkRef, list[torch.Tensor]]] = {}
        for ref, (start, end), store in wanted:
            out = cache.kv[:, :, start:end]
            if store:
                keep.add(ref.key)  # a key that also appears as stored text is stored
            if ref.key in filled:
                out.copy_(filled[ref.key])
            elif ref.key in missing:
                missing[ref.key][1].append(out)
            elif (kv := self._lookup(ref, out)) is not None:
                if kv.kv is not out:
                    out.copy_(kv.kv)
                filled[ref.key] = out
            else:
                missing[ref.key] = (ref, [out])
        prefix_key = wanted[0][0].key
        for sink in (empty, self.sink_ids):
            group = [(ref, outs) for ref, outs in missing.values() if ref.sink_ids.numel() == sink.numel()]
            if not group:
                continue
            computed = self._compute(sink, [ref.token_ids for ref, _ in group])
            for (ref, outs), chunk in zip(group, computed, strict=True):
                for out in outs:
                    out.copy_(chunk.kv)
                if ref.key in keep:
                    for tier in reversed(self.tiers):
                        tier.put(ref, chunk, self.meta)
        chunk_keys = {ref.key for ref, _, _ in wanted[1:]}
        misses = len(chunk_keys & (set(missing) - {prefix_key}))
        return LoadStats(len(chunk_keys) - misses, misses)

    def ingest(self, chunk_ids: Sequence[torch.Tensor], batch_tokens: int = 32768) -> int:
        """Compute and store every chunk no tier holds, `batch_tokens` tokens of chunks at a time (so a corpus
        never sits in memory at once); returns how many were computed."""
        refs = {ref.key: ref for ref in (self.ref(ids, self.sink_ids) for ids in chunk_ids)}
        missing = [ref for ref in refs.values() if not any(tier.contains(ref.key) for tier in self.tiers)]
        start = 0
        while start < len(missing):
            end, tokens = start, 0
            while end < len(missing) and (end == start or tokens + missing[end].num_tokens <= batch_tokens):
                tokens += missing[end].num_tokens
                end += 1
            batch = missing[start:end]
            for ref, chunk in zip(batch, self._compute(self.sink_ids, [r.token_ids for r in batch]), strict=True):
                for tier in reversed(self.tiers):
                    tier.put(ref, chunk, self.meta)
            start = end
        return len(missing)

    def _lookup(self, ref: ChunkRef, out: torch.Tensor) -> ChunkKV | None:
        for depth, tier in enumerate(self.tiers):
            kv = tier.get(ref, self.meta, out)
            if kv is None:
                continue
            if depth:
                # The faster tiers keep what they are given: never a view of the request's cache.
                kept = kv if kv.kv is not out else ChunkKV(kv.token_ids, kv.positions, out.clone())
                for faster in self.tiers[:depth]:
                    faster.put(ref, kept, self.meta)
            return kv
        return None

    def stats(self) -> dict[str, object]:
        """Each tier's counters, by tier name."""
        return {tier.name: tier.stats() for tier in self.tiers}

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()
