"""The conversation prefix cache on its own: longest stored prefix in whole blocks, chained keys, LRU under a byte
budget that evicts the ends of chains first, thread safety."""

from __future__ import annotations

import threading

import pytest
import torch

from prophet_rag.cache.prefix_cache import PrefixCache
from prophet_rag.config import PrefixCacheConfig
from prophet_rag.errors import InvalidRequestError

BLOCK = 4
BLOCK_BYTES = 1 * 2 * BLOCK * 1 * 2 * 4  # 1 layer x (K, V) x 4 tokens x 1 head x 2 dims x fp32


def _cache(blocks: int = 100) -> PrefixCache:
    return PrefixCache(PrefixCacheConfig(max_bytes=blocks * BLOCK_BYTES, block_tokens=BLOCK))


def _kv(ids: torch.Tensor) -> torch.Tensor:
    """KV `[1, 2, T, 1, 2]` whose values name the token and its position, so a copy shows where it came from."""
    t = torch.arange(ids.numel(), dtype=torch.float32)
    per_token = torch.stack([ids.float(), t], dim=-1)  # [T, 2]
    return per_token[None, None, :, None, :].expand(1, 2, -1, 1, 2).clone()


def _served(blocks: list[torch.Tensor]) -> int:
    return sum(int(b.shape[2]) for b in blocks)


def test_a_lookup_finds_the_longest_stored_prefix_in_whole_blocks():
    cache = _cache()
    stored = torch.arange(10, 21)  # 11 tokens: 2 whole blocks
    assert cache.put(stored, _kv(stored)) == 2
    longer = torch.cat([stored, torch.tensor([99, 98, 97])])
    blocks = cache.lookup(longer, limit=longer.numel())
    assert _served(blocks) == 8
    torch.testing.assert_close(torch.cat(blocks, dim=2), _kv(stored)[:, :, :8])


def test_the_limit_bounds_the_prefix_served():
    cache = _cache()
    ids = torch.arange(16)
    cache.put(ids, _kv(ids))
    assert _served(cache.lookup(ids, limit=16)) == 16
    assert _served(cache.lookup(ids, limit=15)) == 12
    assert cache.lookup(ids, limit=3) == []


def test_prompts_that_differ_early_share_only_the_blocks_before():
    cache = _cache()
    ids = torch.arange(16)
    cache.put(ids, _kv(ids))
    changed = ids.clone()
    changed[9] = 500  # in the third block
    assert _served(cache.lookup(changed, limit=16)) == 8
    changed[0] = 500
    assert cache.lookup(changed, limit=16) == []


def test_a_block_is_keyed_by_everything_before_it():
    cache = _cache()
    ids = torch.arange(8)
    cache.put(ids, _kv(ids))
    # The second block's tokens at the start of another prompt are another block.
    assert cache.lookup(ids[4:], limit=4) == []


def test_prompts_with_a_common_start_share_its_blocks():
    cache = _cache()
    first = torch.arange(12)
    second = torch.cat([first[:8], torch.tensor([50, 51, 52, 53])])
    assert cache.put(first, _kv(first)) == 3
    assert cache.put(second, _kv(second)) == 1
    assert len(cache) == 4 and cache.stats().nbytes == 4 * BLOCK_BYTES
    assert _served(cache.lookup(second, limit=12)) == 12 and _served(cache.lookup(first, limit=12)) == 12


def test_kept_blocks_are_copies():
    cache = _cache()
    ids = torch.arange(8)
    kv = _kv(ids)
    cache.put(ids, kv)
    kv.zero_()
    torch.testing.assert_close(torch.cat(cache.lookup(ids, limit=8), dim=2), _kv(ids))


def test_eviction_keeps_within_the_byte_budget():
    cache = _cache(blocks=5)
    for start in range(0, 400, 100):
        ids = torch.arange(start, start + 8)
        cache.put(ids, _kv(ids))
        assert cache.stats().nbytes <= 5 * BLOCK_BYTES
    assert len(cache) == 5


def test_the_least_recently_used_conversation_goes_first_from_its_end():
    cache = _cache(blocks=5)
    old, new = torch.arange(12), torch.arange(100, 112)
    cache.put(old, _kv(old))
    cache.put(new, _kv(new))
    # One block over: the old conversation's last block goes, its start stays reachable.
    assert _served(cache.lookup(old, limit=12)) == 8
    assert _served(cache.lookup(new, limit=12)) == 12


def test_a_lookup_makes_a_conversation_recent():
    cache = _cache(blocks=6)
    first, second, third = torch.arange(8), torch.arange(100, 108), torch.arange(200, 208)
    cache.put(first, _kv(first))
    cache.put(second, _kv(second))
    cache.lookup(first, limit=8)
    cache.put(third, _kv(third))
    cache.put(torch.arange(300, 304), _kv(torch.arange(300, 304)))  # one block over the budget
    assert _served(cache.lookup(first, limit=8)) == 8
    assert _served(cache.lookup(second, limit=8)) == 4


def test_a_prompt_longer_than_the_budget_keeps_its_start():
    cache = _cache(blocks=3)
    ids = torch.arange(40)
    assert cache.put(ids, _kv(ids)) == 3
    assert _served(cache.lookup(ids, limit=40)) == 12


def test_stats_count_hits_misses_and_tokens_served():
    cache = _cache()
    ids = torch.arange(8)
    cache.put(ids, _kv(ids))
    cache.lookup(ids, limit=8)
    cache.lookup(torch.arange(50, 58), limit=8)
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.hit_tokens, stats.blocks) == (1, 1, 8, 2)
    assert stats.limit_bytes == 100 * BLOCK_BYTES


def test_a_cache_without_a_budget_keeps_nothing():
    cache = PrefixCache(PrefixCacheConfig())
    ids = torch.arange(8)
    assert not cache.enabled and cache.put(ids, _kv(ids)) == 0 and cache.lookup(ids, limit=8) == []


@pytest.mark.parametrize("options", [{"max_bytes": -1}, {"max_bytes": 1.5}, {"block_tokens": 0},
                                     {"block_tokens": True}])
def test_bad_settings_are_refused(options):
    with pytest.raises(InvalidRequestError, match="max_bytes|block_tokens"):
        PrefixCacheConfig(**options)


def test_threads_putting_and_looking_up_keep_the_index_consistent():
    cache = _cache(blocks=20)
    errors = []

    def work(seed: int) -> None:
        try:
            for step in range(50):
                ids = torch.cat([torch.arange(8), torch.arange(1000 * seed + step, 1000 * seed + step + 8)])
                cache.put(ids, _kv(ids))
                blocks = cache.lookup(ids, limit=16)
                # Whatever was served is the right KV for these tokens, even if other threads evicted it meanwhile.
                if blocks:
                    torch.testing.assert_close(torch.cat(blocks, dim=2), _kv(ids)[:, :, :_served(blocks)])
        except Exception as error:  # handed to the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stats = cache.stats()
    assert stats.nbytes == stats.blocks * BLOCK_BYTES <= 20 * BLOCK_BYTES
