"""A live but slow server and values of the wrong type: neither may cost a request more than its time budget on the
server, nor keep the shared tier offline (issue 26, item 4)."""

from __future__ import annotations

import time

import pytest

from kvstore_helpers import WIDE, assert_same_chunk, make_chunk
from prophet_rag.cache.remote import RedisTier
from prophet_rag.cache.tier import one_request
from prophet_rag.config import StoreConfig
from prophet_rag.errors import InvalidRequestError
from remote_helpers import GEN, REQUESTS, engine_over, fingerprint

DELAY_S = 0.3
"""Each command's reply comes this late through the proxy: well under the timeout, so no operation fails."""


def _connected(tier: RedisTier) -> RedisTier:
    """`tier` with its connection made: redis-py's handshake is several round trips, paid once per connection."""
    tier._client.ping()
    return tier


@pytest.fixture
def reference(tmp_path) -> list[tuple]:
    with engine_over(StoreConfig(directory=tmp_path / "reference")) as engine:
        return [fingerprint(engine.answer(docs, query, generation=GEN, return_logits=True))
                for docs, query in REQUESTS]


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), True, "1", 601])
def test_the_request_budget_is_validated(tmp_path, value):
    with pytest.raises(InvalidRequestError, match="remote_request_budget_s"):
        StoreConfig(directory=tmp_path, remote_request_budget_s=value)


def _chunks(tier: RedisTier, count: int) -> list:
    chunks = [make_chunk(40, WIDE, seed=seed) for seed in range(count)]
    for ref, chunk in chunks:
        assert tier.put(ref, chunk, WIDE)
    return chunks


def test_a_request_stops_asking_a_slow_server_once_its_budget_is_spent(remote_config, slow_proxy):
    proxy = slow_proxy(DELAY_S)
    fast = RedisTier(remote_config(), WIDE.model_fp)
    chunks = _chunks(fast, 6)
    slow = _connected(RedisTier(remote_config(remote_url=proxy.url, remote_timeout_s=2.0, remote_request_budget_s=0.5,
                                              remote_breaker_failures=10), WIDE.model_fp))
    start = time.perf_counter()
    with one_request():
        got = [slow.get(ref, WIDE) for ref, _ in chunks]
    waited = time.perf_counter() - start
    stats = slow.stats()
    # The budget runs out during the second round trip; the rest of the request never asks.
    assert waited < 0.5 + DELAY_S + 0.4
    assert stats.over_budget == 1 and stats.failures == 0
    assert stats.over_budget_skips >= len(chunks) - 1
    assert stats.hits + stats.over_budget_skips == len(chunks)
    for found, (_, chunk) in zip(got, chunks, strict=True):
        if found is not None:
            assert_same_chunk(found, chunk)
    fast.close()
    slow.close()


def test_a_slow_server_keeps_tripping_the_breaker(remote_config, slow_proxy):
    proxy = slow_proxy(DELAY_S)
    fast = RedisTier(remote_config(), WIDE.model_fp)
    chunks = _chunks(fast, 3)
    slow = RedisTier(remote_config(remote_url=proxy.url, remote_timeout_s=2.0, remote_request_budget_s=0.2,
                                   remote_breaker_failures=2, remote_breaker_cooldown_s=60), WIDE.model_fp)
    for _ in range(2):
        with one_request():
            for ref, _ in chunks:
                slow.get(ref, WIDE)
    stats = slow.stats()
    assert stats.over_budget == 2 and stats.breaker_open and stats.breaker_opens == 1
    start = time.perf_counter()
    with one_request():
        assert all(slow.get(ref, WIDE) is None for ref, _ in chunks)  # not asked: the breaker is open
    assert time.perf_counter() - start < 0.05
    assert slow.stats().breaker_skips == len(chunks)
    clock = [0.0]
    slow._breaker._clock = lambda: clock[0]  # the cool-down, moved by hand
    slow._breaker._open_until = 0.0
    with one_request():
        for ref, _ in chunks:  # the probe spends the budget: the breaker opens for another cool-down
            slow.get(ref, WIDE)
    stats = slow.stats()
    assert stats.over_budget == 3 and stats.breaker_open and slow._breaker._open_until == 60
    fast.close()
    slow.close()


def test_puts_of_a_request_over_budget_are_skipped(remote_config, slow_proxy):
    proxy = slow_proxy(DELAY_S)
    slow = _connected(RedisTier(remote_config(remote_url=proxy.url, remote_timeout_s=2.0, remote_request_budget_s=0.2,
                                              remote_breaker_failures=10), WIDE.model_fp))
    chunks = [make_chunk(40, WIDE, seed=seed) for seed in range(4)]
    start = time.perf_counter()
    with one_request():
        stored = [slow.put(ref, chunk, WIDE) for ref, chunk in chunks]
    assert time.perf_counter() - start < 0.2 + 2 * DELAY_S + 0.4
    stats = slow.stats()
    assert stats.over_budget == 1 and stats.skipped >= len(chunks) - 1
    assert stored.count(True) + stats.skipped == len(chunks)
    slow.close()


def test_a_fast_server_within_budget_closes_the_breaker_as_before(remote_config):
    tier = RedisTier(remote_config(remote_request_budget_s=5.0), WIDE.model_fp)
    chunks = _chunks(tier, 4)
    with one_request():
        assert all(tier.get(ref, WIDE) is not None for ref, _ in chunks)
    stats = tier.stats()
    assert stats.hits == 4 and stats.over_budget == 0 and not stats.breaker_open
    tier.close()


def _timing(method, total: list[float]):
    """`method`, adding the seconds each call takes to `total[0]` (the request's own compute is not counted)."""

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start

    return timed


def test_an_engine_over_a_slow_server_answers_in_about_its_budget(remote_config, slow_proxy, reference):
    proxy = slow_proxy(DELAY_S)
    budget = 0.4
    config = remote_config(remote_url=proxy.url, remote_timeout_s=2.0, remote_request_budget_s=budget,
                           remote_breaker_failures=2, remote_breaker_cooldown_s=60)
    with engine_over(config) as engine:
        tier = _connected(engine.cache.tier("remote"))
        waited = [0.0]
        for name in ("get", "put", "contains"):
            setattr(tier, name, _timing(getattr(tier, name), waited))
        spent = []
        for docs, query in REQUESTS:
            before = waited[0]
            got = fingerprint(engine.answer(docs, query, generation=GEN, return_logits=True))
            spent.append((got, waited[0] - before))
        stats = tier.stats()
    assert [fp for fp, _ in spent] == reference
    # Without the budget each request waited a round trip per chunk read or written (about 2 s here).
    assert all(waited < budget + DELAY_S + 0.3 for _, waited in spent)
    assert stats.over_budget == 2 and stats.breaker_open and stats.breaker_skips > 0


def _planted_wrong_type(redis_server, tier, ref, layer: int | None) -> None:
    head, layers = tier.names(ref.key, WIDE.num_layers)
    name = head if layer is None else layers[layer]
    client = redis_server.client()
    client.delete(name)
    client.rpush(name, b"not a layer")


@pytest.mark.parametrize("layer", [None, 0, 1])
def test_a_value_of_the_wrong_type_is_one_bad_entry_not_a_server_failure(remote_config, redis_server, layer):
    tier = RedisTier(remote_config(remote_breaker_failures=1, remote_breaker_cooldown_s=60), WIDE.model_fp)
    (ref, chunk), (other, other_chunk) = _chunks(tier, 2)
    _planted_wrong_type(redis_server, tier, ref, layer)
    assert tier.get(ref, WIDE) is None
    stats = tier.stats()
    assert stats.corrupt == 1 and stats.failures == 0 and not stats.breaker_open
    assert tier.contains(ref.key) is False  # deleted, so the recomputed chunk can be stored
    assert_same_chunk(tier.get(other, WIDE), other_chunk)  # the tier stays online
    assert tier.put(ref, chunk, WIDE)
    assert_same_chunk(tier.get(ref, WIDE), chunk)
    tier.close()


def test_a_put_replaces_a_header_of_the_wrong_type(remote_config, redis_server):
    tier = RedisTier(remote_config(), WIDE.model_fp)
    ref, chunk = make_chunk(40, WIDE, seed=7)
    _planted_wrong_type(redis_server, tier, ref, None)
    assert tier.put(ref, chunk, WIDE)
    assert_same_chunk(tier.get(ref, WIDE), chunk)
    assert tier.stats().failures == 0
    tier.close()
