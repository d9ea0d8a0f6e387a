"""In-memory tiers in front of the disk store: recently used chunk KV kept on the engine's device, or in host memory.

Reading a chunk from the disk store costs a file read, a checksum over every byte and, on a GPU, a host-to-device
copy. On a GPU that can cost more than recomputing the chunk (an 8B model's 8K-token context is ~1 GB of KV), so a
serving process keeps its hot documents in device memory (`hot_cache_bytes`) and its warm ones in pinned host memory
(`host_cache_bytes`), from which a chunk reaches its slots with one asynchronous host-to-device copy. Entries are only
ever made by this process's engine (computed, or read from a slower tier that checked them) and are never mutated:
assembly copies them into the stitched cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from prophet_rag.cache.codec import EntryMeta
from prophet_rag.cache.tier import ChunkRef
from prophet_rag.compute.chunk_kv import ChunkKV
from prophet_rag.errors import InvalidRequestError


@dataclass(frozen=True)
class HotCacheStats:
    hits: int
    misses: int
    entries: int
    nbytes: int
    limit_bytes: int


class HotCache:
    """Least-recently-used chunk KV, keyed by store key, bounded by `limit_bytes` of KV (0 disables it); with
    `host`, kept in host memory (pinned when CUDA is available) rather than on the device it arrives from.

    A `tier.KVTier`: its entries only ever come from this process's engine (computed, or read from a slower
    tier that checked them), so `get` does not check them again.
    """

    def __init__(self, limit_bytes: int, *, host: bool = False) -> None:
        option = "host_cache_bytes" if host else "hot_cache_bytes"
        if type(limit_bytes) is not int or limit_bytes < 0:
            raise InvalidRequestError(f"{option} must be an integer >= 0 (0 turns the tier off), got {limit_bytes!r}.")
        self.name = "host" if host else "memory"
        self.host = host
        self.limit_bytes = limit_bytes
        self._entries: OrderedDict[str, ChunkKV] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self._hits = self._misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def get(self, ref: ChunkRef, meta: EntryMeta | None = None, out: torch.Tensor | None = None) -> ChunkKV | None:
        """The entry itself (the caller copies it where it needs it), or None. A host entry asked for on another
        device is copied into `out` (asynchronously from pinned memory: later work on the stream waits for it)."""
        with self._lock:
            kv = self._entries.get(ref.key)
            if kv is None:
                self._misses += 1
                return None
            self._hits += 1
            self._entries.move_to_end(ref.key)
        if out is not None and out.device != kv.kv.device:
            out.copy_(kv.kv, non_blocking=kv.kv.is_pinned())
            return ChunkKV(kv.token_ids, kv.positions, out)
        return kv

    def keeps(self, nbytes: int) -> bool:
        """Whether `put` would keep an entry of `nbytes` bytes (never, with the tier off)."""
        return nbytes <= self.limit_bytes

    def put(self, ref: ChunkRef, kv: ChunkKV, meta: EntryMeta | None = None) -> bool:
        """Keep `kv`, evicting the least recently used entries to stay within the limit; an entry larger than the
        whole limit is not kept."""
        if not self.keeps(kv.nbytes):
            return False
        if self.host and kv.kv.device.type != "cpu":
            kv = _to_host(kv)
        with self._lock:
            old = self._entries.pop(ref.key, None)
            if old is not None:
                self._nbytes -= old.nbytes
            self._entries[ref.key] = kv
            self._nbytes += kv.nbytes
            while self._nbytes > self.limit_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._nbytes -= evicted.nbytes
        return True

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> HotCacheStats:
        with self._lock:
            return HotCacheStats(self._hits, self._misses, len(self._entries), self._nbytes, self.limit_bytes)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    def close(self) -> None:
        self.clear()


def _to_host(kv: ChunkKV) -> ChunkKV:
    """A host copy of `kv`, in pinned memory so that copying it back to the device can overlap other work."""
    host = torch.empty(kv.kv.shape, dtype=kv.kv.dtype, pin_memory=True)
    host.copy_(kv.kv)
    return ChunkKV(kv.token_ids.cpu(), kv.positions.cpu(), host)
