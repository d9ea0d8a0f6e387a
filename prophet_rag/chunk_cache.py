"""The chunk cache: every segment's KV for a request, from an ordered list of tiers, computed on a miss.

A tier is one class behind the `KVTier` protocol; `build_tiers` is the one list of them, fastest first: the
in-memory tier (`hot_cache.HotCache`, on the model's device) and the persistent disk store (`store.KVStore`). A
lookup walks the tiers in order; a hit is copied to the model's device and written back into the faster tiers
that missed it; a chunk no tier holds is computed (isolated prefill) and written to every tier. The cache owns the
key derivation and the entry metadata, so a tier only stores and checks what it is handed.
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


@runtime_checkable
class KVTier(Protocol):
    """One place chunk KV can live. Content problems never raise out of `get`/`put`: they are counted in `stats`
    and mean a miss (the chunk is then recomputed), never a wrong answer."""

    name: str

    def get(self, key: str, meta: EntryMeta, token_ids: torch.Tensor) -> ChunkKV | None:
        """The chunk stored under `key`, checked against `meta` and `token_ids`, or None."""

    def put(self, key: str, chunk: ChunkKV, meta: EntryMeta) -> bool:
        """Keep `chunk` under `key`; True when the key now holds an entry."""

    def contains(self, key: str) -> bool: ...

    def stats(self) -> object:
        """A frozen dataclass of this tier's counters."""

    def close(self) -> None: ...


Compute = Callable[[torch.Tensor, list[torch.Tensor]], list[ChunkKV]]
"""`compute(sink_ids, chunks)`: the isolated KV of each chunk `[n_i]` behind `sink_ids` (see prefill.py)."""


def build_tiers(store: StoreConfig | KVTier | None, hot_cache_bytes: int) -> list[KVTier]:
    """The tier list, fastest first. `store` is a `StoreConfig` (None: the default directory) or an open store."""
    from prophet_rag.hot_cache import HotCache
    from prophet_rag.store import KVStore

    hot = HotCache(hot_cache_bytes)
    disk = store if isinstance(store, KVTier) else KVStore(store or StoreConfig())
    return [hot, disk]


@dataclass
class Blocks:
    """The KV of a request's segments, on the model's device."""

    prefix: ChunkKV
    """The exact prefix, computed behind nothing."""
    chunks: list[ChunkKV]
    """Each chunk's isolated KV, in request order."""
    hits: int
    misses: int
    """Distinct chunks found in a tier / computed (the prefix does not count)."""


class ChunkCache:
    """Chunk KV for the segments of request layouts, over `tiers` (fastest first)."""

    def __init__(self, tiers: Sequence[KVTier], meta: EntryMeta, sink_ids: torch.Tensor, compute: Compute,
                 device: torch.device) -> None:
        names = [tier.name for tier in tiers]
        assert len(set(names)) == len(names), f"tier names must be unique, got {names}"
        self.tiers = list(tiers)
        self.meta = meta
        self.sink_ids = sink_ids
        self._compute = compute
        self._device = device

    def tier(self, name: str) -> KVTier:
        return next(tier for tier in self.tiers if tier.name == name)

    def key(self, token_ids: torch.Tensor, sink_ids: torch.Tensor) -> str:
        return chunk_key(self.meta.model_fp, self.meta.tokenizer_fp, self.meta.kv_spec, token_ids.tolist(),
                         sink_ids.tolist())

    def load(self, layout: RequestLayout) -> Blocks:
        """The prefix's exact KV and each chunk's isolated KV: from the tiers, else computed and stored (unless the
        layout marks it transient)."""
        empty = self.sink_ids[:0]
        wanted = [(layout.prefix_ids, empty)] + [(ids, self.sink_ids) for ids in layout.chunk_ids]
        keys = [self.key(ids, sink) for ids, sink in wanted]
        # One-off text is computed but never stored; a key that also appears as stored text is stored.
        keep = {key for i, key in enumerate(keys)
                if not (layout.transient_prefix if i == 0 else layout.is_transient(i - 1))}
        found: dict[str, ChunkKV] = {}
        for key, (ids, _) in zip(keys, wanted, strict=True):
            if key not in found and (kv := self._lookup(key, ids)) is not None:
                found[key] = kv
        misses = 0
        for sink in (empty, self.sink_ids):
            missing = {key: ids for key, (ids, s) in zip(keys, wanted, strict=True)
                       if key not in found and s.numel() == sink.numel()}
            if missing:
                computed = self._compute(sink, list(missing.values()))
                for key, kv in zip(missing, computed, strict=True):
                    found[key] = kv
                    if key in keep:
                        for tier in reversed(self.tiers):
                            tier.put(key, kv, self.meta)
                misses += sum(1 for key in missing if key != keys[0])
        chunks = [found[key] for key in keys[1:]]
        return Blocks(found[keys[0]], chunks, len(set(keys[1:])) - misses, misses)

    def _lookup(self, key: str, token_ids: torch.Tensor) -> ChunkKV | None:
        for depth, tier in enumerate(self.tiers):
            kv = tier.get(key, self.meta, token_ids)
            if kv is None:
                continue
            kv = kv.to(self._device)
            for faster in self.tiers[:depth]:
                faster.put(key, kv, self.meta)
            return kv
        return None

    def stats(self) -> dict[str, object]:
        """Each tier's counters, by tier name."""
        return {tier.name: tier.stats() for tier in self.tiers}

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()
