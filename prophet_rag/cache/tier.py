"""The tier protocol: one place chunk KV can live (`KVTier`), and `ChunkRef`, the segment a tier is asked for.

Every tier (`hot_cache.HotCache`, `store.KVStore`, `remote.RedisTier`) implements `KVTier`; the chunk cache
(`chunk_cache.ChunkCache`) walks a list of them. The cache and the tiers import this module; no tier imports the
cache or another tier (what the checking tiers share, such as `refusal_counter`, is here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from prophet_rag.cache.codec import EntryMeta
from prophet_rag.compute.chunk_kv import ChunkKV
from prophet_rag.errors import CacheCorruptionError, IncompatibleCacheError, UnauthenticatedEntryError


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


class LayeredEntry(Protocol):
    """A stored chunk opened for reading layer by layer (`store.StoredEntry`)."""

    num_layers: int

    def read_layers(self, start: int, stop: int, out: torch.Tensor) -> None:
        """Read and check layers `[start, stop)` into `out[start:stop]`; raises CacheCorruptionError (the entry is
        then discarded and counted by its tier)."""

    def close(self) -> None: ...


@runtime_checkable
class LayeredTier(KVTier, Protocol):
    """A tier that can also hand out an entry to be read layer by layer, so a request can start on layer 0 while
    later layers are still being read (the disk store)."""

    def open(self, ref: ChunkRef, meta: EntryMeta) -> LayeredEntry | None: ...


class RequestState(Protocol):
    """What a tier keeps for one request (`request_state`); `finish` runs when the request's tier calls are done."""

    def finish(self) -> None: ...


_REQUEST: ContextVar[dict[object, RequestState] | None] = ContextVar("prophet_rag_request", default=None)


@contextmanager
def one_request() -> Iterator[None]:
    """Marks the tier calls made inside (in this thread or task) as one request's, so a tier can keep per-request
    state (`request_state`): the shared tier's time budget. Nested scopes belong to the outermost one."""
    if _REQUEST.get() is not None:
        yield
        return
    scope: dict[object, RequestState] = {}
    token = _REQUEST.set(scope)
    try:
        yield
    finally:
        _REQUEST.reset(token)
        for state in scope.values():
            state.finish()


def request_state(owner: object, make: Callable[[], RequestState]) -> RequestState:
    """`owner`'s state for the current request, made by `make()` on its first call in the request. Only inside
    `one_request` (a tier wraps its own methods in one, so a call outside any request is a request of its own)."""
    scope = _REQUEST.get()
    assert scope is not None, "request_state is called inside one_request"
    if owner not in scope:
        scope[owner] = make()
    return scope[owner]


_COUNTER_OF = ((UnauthenticatedEntryError, "unauthenticated"), (CacheCorruptionError, "corrupt"),
               (IncompatibleCacheError, "incompatible"))


def refusal_counter(error: Exception) -> str:
    """The stats counter that a refused entry's error counts in: unauthenticated, corrupt or incompatible."""
    return next(name for cls, name in _COUNTER_OF if isinstance(error, cls))
