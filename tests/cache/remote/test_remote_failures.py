"""Failure means recompute: a server killed mid-run, hung (SIGSTOP), absent from the start or evicting under
`maxmemory`; every answer stays identical to an engine without the server, the failures are counted, and once the
circuit breaker is open no request waits for the server."""

from __future__ import annotations

import time

import pytest

from kvstore_helpers import WIDE, assert_same_chunk, make_chunk
from prophet_rag.cache.remote import RedisTier
from prophet_rag.config import StoreConfig
from remote_helpers import DOCS, GEN, engine_over, fingerprint

MORE = [f"Log {i}: the pump house of site {i} holds {i + 2} pumps." for i in range(8)]
REQUESTS = [([DOCS[i], MORE[2 * i], MORE[2 * i + 1]], f"How many pumps at site {i}?") for i in range(4)]


@pytest.fixture
def reference(tmp_path) -> list[tuple]:
    with engine_over(StoreConfig(directory=tmp_path / "reference")) as engine:
        return [fingerprint(engine.answer(docs, query, generation=GEN, return_logits=True))
                for docs, query in REQUESTS]


class _Waits:
    """Seconds each request spent waiting for the remote tier (its get, put and contains calls), measured around
    the tier's own methods: the request's compute time, which varies with the machine's load, is not counted."""

    def __init__(self, engine) -> None:
        self.total = 0.0
        tier = engine.cache.tier("remote")
        for name in ("get", "put", "contains"):
            setattr(tier, name, self._timing(getattr(tier, name)))

    def _timing(self, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - start

        return timed

    def answer(self, engine, request) -> tuple[tuple, float]:
        docs, query = request
        before = self.total
        answer = engine.answer(docs, query, generation=GEN, return_logits=True)
        return fingerprint(answer), self.total - before


class _Clock:
    """The breaker's clock, moved by hand, so the cool-down does not depend on how fast this machine is today."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_server_killed_mid_run_costs_recomputation_only(remote_config, redis_server, reference):
    config = remote_config(remote_timeout_s=0.5, remote_breaker_failures=2, remote_breaker_cooldown_s=60)
    with engine_over(config) as engine:
        waits = _Waits(engine)
        first, _ = waits.answer(engine, REQUESTS[0])
        assert engine.cache.stats()["remote"].bytes_written > 0
        redis_server.kill()
        rest = [waits.answer(engine, request) for request in REQUESTS[1:]]
        stats = engine.cache.stats()["remote"]
    assert [first, *(fp for fp, _ in rest)] == reference
    assert stats.failures == 2 and stats.breaker_open and stats.breaker_opens == 1
    assert stats.breaker_skips > 0
    assert all(waited < config.remote_timeout_s for _, waited in rest)


def test_a_hung_server_is_waited_for_at_most_the_timeout_then_skipped(remote_config, redis_server, reference):
    timeout = 0.3
    config = remote_config(remote_timeout_s=timeout, remote_breaker_failures=2, remote_breaker_cooldown_s=5.0)
    with engine_over(config) as engine:
        clock = _Clock()
        engine.cache.tier("remote")._breaker._clock = clock
        waits = _Waits(engine)
        redis_server.pause()
        (first, waited), *rest = [waits.answer(engine, request) for request in REQUESTS[:3]]
        stats = engine.cache.stats()["remote"]
        assert stats.failures == 2 and stats.breaker_open and stats.breaker_skips > 0
        assert 2 * timeout <= waited < 2 * timeout + 0.5  # two timed-out operations opened the breaker
        assert all(skipped < 0.01 for _, skipped in rest)  # then the server is not asked at all
        redis_server.resume()
        clock.now += 5.0
        last, _ = waits.answer(engine, REQUESTS[3])  # the probe finds the server back: its chunks are written
        after = engine.cache.stats()["remote"]
    assert [first, *(fp for fp, _ in rest), last] == reference
    assert not after.breaker_open and after.failures == 2 and after.bytes_written > 0


def test_one_operation_on_a_hung_server_is_bounded_by_the_timeout(remote_config, redis_server):
    tier = RedisTier(remote_config(remote_timeout_s=0.2), WIDE.model_fp)
    ref, chunk = make_chunk(80, WIDE, seed=1)
    assert tier.put(ref, chunk, WIDE)
    redis_server.pause()
    for operation in (lambda: tier.get(ref, WIDE), lambda: tier.contains(ref.key),
                      lambda: tier.put(*make_chunk(80, WIDE, seed=2), WIDE)):
        start = time.perf_counter()
        assert operation() in (None, False)
        assert time.perf_counter() - start < 0.2 + 0.15
    assert tier.stats().failures + tier.stats().breaker_skips == 3
    redis_server.resume()
    tier.close()


def test_an_engine_starts_and_answers_with_no_server_listening(remote_config, redis_server, reference):
    redis_server.kill()
    with engine_over(remote_config(remote_breaker_failures=1, remote_breaker_cooldown_s=60)) as engine:
        got = [fingerprint(engine.answer(docs, query, generation=GEN, return_logits=True))
               for docs, query in REQUESTS]
        stats = engine.cache.stats()["remote"]
        assert engine.store.stats().entries > 0  # the local tiers still work
    assert got == reference
    assert stats.failures == 1 and stats.breaker_open and stats.hits == 0


def test_values_evicted_by_the_server_are_never_used(start_redis, remote_config):
    """Under `maxmemory` with random eviction the server drops single layers and headers: every read is the exact
    chunk or a miss, never a partial one."""
    server = start_redis("--maxmemory", "3mb", "--maxmemory-policy", "allkeys-random")
    tier = RedisTier(remote_config(remote_url=server.url), WIDE.model_fp)
    chunks = [make_chunk(80, WIDE, seed=seed) for seed in range(150)]  # ~6 MiB of entries
    for ref, chunk in chunks:
        tier.put(ref, chunk, WIDE)
    assert server.client().info("stats")["evicted_keys"] > 0
    found = [(tier.get(ref, WIDE), chunk) for ref, chunk in chunks]
    for got, chunk in found:
        if got is not None:
            assert_same_chunk(got, chunk)
    stats = tier.stats()
    assert stats.hits + stats.misses + stats.partial == len(chunks)
    assert stats.hits > 0 and stats.partial > 0 and stats.failures == 0
    tier.close()
