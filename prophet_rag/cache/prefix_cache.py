"""The conversation prefix cache: the KV a finished request used, kept so that a request starting with the same tokens
computes only what follows.

Turn N of a conversation renders every earlier turn again: the system prompt, the messages, the documents earlier
turns placed (`layout.PlacedDocuments`) and the answers. After a request the engine puts here the token ids and the
KV of everything the model attended to (prompt and generated tokens, at positions 0..n-1); turn N looks up its
prompt's longest stored prefix and computes only the rest. As in vLLM's automatic prefix caching, the KV is kept in
blocks of `block_tokens` tokens, each under a hash chained over every token before it (a block's key names its whole
prefix): conversations that share a start share its blocks, and a lookup walks the prompt's blocks until one is
missing. Only whole blocks are kept.

The KV kept is what the model used: a turn that reused chunk KV at a ratio below 1 leaves that KV in its history,
and later turns attend to it exactly as that turn did.

At most `max_bytes` of KV is kept, least recently used blocks evicted first. A lookup or a put touches a chain's
blocks from its end back to its start, so every block is more recently used than the blocks after it: eviction
takes the ends of chains first and never leaves a block that no lookup can reach.

Thread-safe: a lock guards the index (and a put's copies, a few milliseconds). Blocks are never changed once kept,
so a caller copies from the blocks a lookup returned while other threads may evict them (eviction only drops the
index's reference).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from prophet_rag.config import PrefixCacheConfig


@dataclass(frozen=True)
class PrefixCacheStats:
    hits: int
    """Lookups that found at least one block."""
    misses: int
    hit_tokens: int
    """Tokens whose KV lookups served."""
    blocks: int
    nbytes: int
    limit_bytes: int


class PrefixCache:
    """Token-id-keyed KV blocks of finished requests, bounded by `config.max_bytes` (0: off)."""

    def __init__(self, config: PrefixCacheConfig) -> None:
        self.config = config
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._hit_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.config.max_bytes > 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _keys(self, ids: torch.Tensor, blocks: int) -> list[bytes]:
        """The chained keys of the first `blocks` whole blocks of `ids`."""
        width = self.config.block_tokens
        data = ids[: blocks * width].to(device="cpu", dtype=torch.int64).numpy().tobytes()
        keys, key = [], b""
        for start in range(0, blocks * width * 8, width * 8):
            key = hashlib.blake2b(key + data[start : start + width * 8], digest_size=16).digest()
            keys.append(key)
        return keys

    def _touch(self, keys: list[bytes]) -> None:
        # From the end back to the start: a chain's first block ends up the most recently used (module docstring).
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def lookup(self, ids: torch.Tensor, limit: int) -> list[torch.Tensor]:
        """The KV blocks, in order, of the longest stored prefix of `ids[:limit]` (`[n]` token ids): each
        `[L, 2, block_tokens, H_kv, D]`, together the first `len(result) * block_tokens` tokens. Not to be changed:
        copy them."""
        if not self.enabled:
            return []
        keys = self._keys(ids, max(0, min(limit, int(ids.numel()))) // self.config.block_tokens)
        with self._lock:
            found = []
            for key in keys:
                block = self._blocks.get(key)
                if block is None:
                    break
                found.append(block)
            self._touch(keys[: len(found)])
            self._hits += bool(found)
            self._misses += not found
            self._hit_tokens += len(found) * self.config.block_tokens
        return found

    def put(self, ids: torch.Tensor, kv: torch.Tensor) -> int:
        """Keep the KV `kv` `[L, 2, >= n, H_kv, D]` of `ids` `[n]` (computed at positions 0..n-1) in whole blocks,
        copied; returns how many blocks were new."""
        if not self.enabled:
            return 0
        width = self.config.block_tokens
        block_bytes = kv[:, :, :width].numel() * kv.element_size()
        # Blocks past what the whole budget holds would be evicted at once.
        keys = self._keys(ids, min(int(ids.numel()) // width, self.config.max_bytes // block_bytes))
        added = 0
        with self._lock:  # copies under the lock too: a block seen here stays until this put has touched it
            for i, key in enumerate(keys):
                if key not in self._blocks:
                    self._blocks[key] = kv[:, :, i * width : (i + 1) * width].clone()
                    self._nbytes += block_bytes
                    added += 1
            self._touch(keys)
            while self._nbytes > self.config.max_bytes:
                _, evicted = self._blocks.popitem(last=False)
                self._nbytes -= evicted.numel() * evicted.element_size()
        return added

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(self._hits, self._misses, self._hit_tokens, len(self._blocks), self._nbytes,
                                    self.config.max_bytes)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._nbytes = 0
