"""The chunk cache: every segment's KV for a request, from an ordered list of tiers, computed on a miss.

A tier is one class behind the `KVTier` protocol; `build_tiers` is the one list of them, fastest first: the
in-memory tiers (`hot_cache.HotCache`, on the model's device and in host memory), the persistent disk store
(`store.KVStore`) and, when configured, a server shared by replicas (`remote.RedisTier`). A
lookup walks the tiers in order and the tier that holds the chunk writes it straight into its slots of the request's
stitched cache (or hands its tensors over to be copied there); the faster tiers that missed it get a copy; a chunk no
tier holds is computed (isolated prefill), copied into its slots and written to every tier. The cache owns the key
derivation and the entry metadata, so a tier only stores and checks what it is handed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from prophet_rag.cache.codec import EntryMeta
from prophet_rag.cache.hot_cache import HotCache
from prophet_rag.cache.keys import chunk_key
from prophet_rag.cache.remote import RedisTier
from prophet_rag.cache.store import KVStore
from prophet_rag.cache.tier import ChunkRef, KVTier, LayeredEntry, LayeredTier, one_request
from prophet_rag.compute.chunk_kv import ChunkKV
from prophet_rag.compute.stitched import StitchedCache
from prophet_rag.config import StoreConfig
from prophet_rag.errors import CacheCorruptionError, InvalidRequestError
from prophet_rag.layout import RequestLayout


class StaleBlocksError(Exception):
    """A block being read layer by layer failed its check after the request started using it: the request is
    assembled again (its tier has dropped the entry, so the chunk is recomputed). Never leaves the engine."""


@dataclass
class _Read:
    entry: LayeredEntry
    out: torch.Tensor
    """The block's slots `[L, 2, T, H_kv, D]`."""
    ref: ChunkRef
    faster: list[KVTier]
    """Tiers in front of the one the entry came from: they get a copy once every layer is read."""
    copies: list[torch.Tensor]
    """Other slots of the same chunk in the request."""


class PendingLayers:
    """Stored blocks arriving in a request's cache: a thread reads them layer by layer, in layer order.

    `wait(layer)` returns once that layer of every block is in; it raises `StaleBlocksError` when any read failed.
    The faster tiers' copies are taken per layer before the request changes the slots (re-rotation), and put once
    the last layer is in.
    """

    def __init__(self, reads: list[_Read], meta: EntryMeta, num_layers: int) -> None:
        self._reads, self._meta = reads, meta
        self._events = [threading.Event() for _ in range(num_layers)]
        self._failed: list[str] = []
        self._thread = threading.Thread(target=self._run, name="prophet-rag-layer-loader", daemon=True)
        self._thread.start()

    def wait(self, layer: int) -> None:
        self._events[layer].wait()
        if self._failed:
            raise StaleBlocksError(f"stored blocks {self._failed} failed their check while being read")

    @torch.inference_mode()  # thread-local: the request's cache is an inference tensor
    def _run(self) -> None:
        kept = [torch.empty_like(read.out) if read.faster else None for read in self._reads]
        try:
            for layer, ready in enumerate(self._events):
                for read, copy in zip(self._reads, kept, strict=True):
                    try:
                        read.entry.read_layers(layer, layer + 1, read.out)
                    except CacheCorruptionError:
                        self._failed.append(read.ref.key)
                        continue
                    for other in read.copies:
                        other[layer].copy_(read.out[layer])
                    if copy is not None:
                        copy[layer].copy_(read.out[layer])
                if self._failed:
                    break
                ready.set()
            if not self._failed:
                for read, copy in zip(self._reads, kept, strict=True):
                    for tier in read.faster:
                        tier.put(read.ref, ChunkKV(read.ref.token_ids, read.ref.positions, copy), self._meta)
        finally:
            for read in self._reads:
                read.entry.close()
            for event in self._events:
                event.set()


Compute = Callable[[torch.Tensor, list[torch.Tensor]], list[ChunkKV]]
"""`compute(sink_ids, chunks)`: the isolated KV of each chunk `[n_i]` behind `sink_ids` (see compute/prefill.py)."""


def build_tiers(store: StoreConfig | KVTier | None, hot_cache_bytes: int = 0, host_cache_bytes: int = 0,
                meta: EntryMeta | None = None) -> list[KVTier]:
    """The tier list, fastest first: device memory, host memory, the disk store, and with `StoreConfig.remote_url`
    the shared server (for `meta`'s model, whose fingerprint names its namespace there). `store` is a `StoreConfig`
    (None: the default directory) or an open store."""
    memory, host = HotCache(hot_cache_bytes), HotCache(host_cache_bytes, host=True)
    disk = store if isinstance(store, KVTier) else KVStore(store or StoreConfig())
    config = getattr(disk, "config", None)
    remote = config.remote_url if isinstance(config, StoreConfig) else None
    if remote is not None and meta is None:
        raise InvalidRequestError("a store with remote_url needs the model's EntryMeta: build_tiers(..., meta=meta).")
    return [memory, host, disk, *([RedisTier(config, meta.model_fp)] if remote else [])]


@dataclass(frozen=True)
class LoadStats:
    hits: int
    misses: int
    """Distinct chunks found in a tier / computed (the prefix does not count)."""
    pending: PendingLayers | None = None
    """Blocks still arriving layer by layer (a pipelined load), or None when every slot is filled."""
    found: frozenset[int] = frozenset()
    """Request indices of the chunks whose KV came from a tier."""
    prefix_found: bool = False
    """True when the prefix's KV came from a tier."""

    def cached_tokens(self, cache: StitchedCache, recomputed: torch.Tensor) -> int:
        """How many of `cache`'s prompt tokens kept the KV a tier gave them: the prefix and the found chunks, less
        the `recomputed` slots among them (a computed chunk never counts; layer 0, which the engine recomputes for
        every chunk token from its id and position alone, does not make a token computed)."""
        from_tier = torch.zeros(cache.context_end, dtype=torch.bool)
        from_tier[: cache.prefix_len] = self.prefix_found
        for (start, end), i in zip(cache.chunk_spans, cache.order, strict=True):
            from_tier[start:end] = i in self.found
        recomputed = recomputed.cpu()
        from_tier[recomputed[recomputed < cache.context_end]] = False
        return int(from_tier.sum())


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

    def load(self, layout: RequestLayout, cache: StitchedCache, pipeline: bool = False,
             prefix: torch.Tensor | None = None) -> LoadStats:
        """Fill `cache`'s prefix and chunk slots (laid out by `stitched_layout` for `layout`) with the prefix's
        exact KV and each chunk's isolated KV: from the tiers, else computed and stored (unless the layout marks
        it transient). `prefix` is the prefix's KV `[L, 2, P, H_kv, D]` when the caller has it (a conversation's
        history, from the prefix cache): it is copied in, and no tier is asked for the prefix.

        With `pipeline`, blocks held by a layered tier (the disk store) are opened here and read layer by layer in
        the background: `LoadStats.pending` then says when each layer is in. Every tier call made here belongs to
        one request (`tier.one_request`: the shared tier's time budget is per request).
        """
        with one_request():
            return self._load(layout, cache, pipeline, prefix)

    def _load(self, layout: RequestLayout, cache: StitchedCache, pipeline: bool,
              prefix: torch.Tensor | None) -> LoadStats:
        empty = self.sink_ids[:0]
        slot_of = {i: span for span, i in zip(cache.chunk_spans, cache.order, strict=True)}
        chunks = [(self.ref(ids, self.sink_ids), slot_of[i], not layout.is_transient(i))
                  for i, ids in enumerate(layout.chunk_ids)]
        head = []
        if prefix is None:
            head = [(self.ref(layout.prefix_ids, empty), (0, cache.prefix_len), not layout.transient_prefix)]
        else:
            cache.kv[:, :, : cache.prefix_len] = prefix
        wanted = head + chunks
        filled: dict[str, torch.Tensor] = {}
        reads: dict[str, _Read] = {}
        keep: set[str] = set()
        missing: dict[str, tuple[ChunkRef, list[torch.Tensor]]] = {}
        for ref, (start, end), store in wanted:
            out = cache.kv[:, :, start:end]
            if store:
                keep.add(ref.key)  # a key that also appears as stored text is stored
            if ref.key in filled:
                out.copy_(filled[ref.key])
            elif ref.key in reads:
                reads[ref.key].copies.append(out)
            elif ref.key in missing:
                missing[ref.key][1].append(out)
            elif isinstance(found := self._lookup(ref, out, pipeline), _Read):
                reads[ref.key] = found
            elif found is not None:
                if found.kv is not out:
                    out.copy_(found.kv)
                filled[ref.key] = out
            else:
                missing[ref.key] = (ref, [out])
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
        chunk_keys = {ref.key for ref, _, _ in chunks}
        misses = len(chunk_keys & set(missing))
        pending = PendingLayers(list(reads.values()), self.meta, int(cache.kv.shape[0])) if reads else None
        found = frozenset(i for i, (ref, _, _) in enumerate(chunks) if ref.key not in missing)
        return LoadStats(len(chunk_keys) - misses, misses, pending, found, bool(head) and head[0][0].key not in missing)

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

    def _lookup(self, ref: ChunkRef, out: torch.Tensor, pipeline: bool) -> ChunkKV | _Read | None:
        for depth, tier in enumerate(self.tiers):
            faster = self._keepers(self.tiers[:depth], out.nbytes)
            if pipeline and isinstance(tier, LayeredTier):
                entry = tier.open(ref, self.meta)
                if entry is not None:
                    return _Read(entry, out, ref, faster, [])
                continue
            kv = tier.get(ref, self.meta, out)
            if kv is None:
                continue
            if faster:
                # The faster tiers keep what they are given: never a view of the request's cache.
                kept = kv if kv.kv is not out else ChunkKV(kv.token_ids, kv.positions, out.clone())
                for keeper in faster:
                    keeper.put(ref, kept, self.meta)
            return kv
        return None

    @staticmethod
    def _keepers(tiers: Sequence[KVTier], nbytes: int) -> list[KVTier]:
        """The `tiers` that may keep a block of `nbytes` bytes: an in-memory tier that is off (0 bytes, the default)
        or too small would refuse it, after the caller had copied the whole block for it (a fresh 200 MB per 4K-token
        request from the disk store alone)."""
        return [tier for tier in tiers if not isinstance(tier, HotCache) or tier.keeps(nbytes)]

    def stats(self) -> dict[str, object]:
        """Each tier's counters, by tier name."""
        return {tier.name: tier.stats() for tier in self.tiers}

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()
