"""The server's Prometheus metrics, in a registry of its own (one per app, so several apps never share counters).

Per request: counts by endpoint and HTTP status (499: the client went away first), time to first token as the
client sees it (queue wait included) and end to end, queue wait, and the token counts of `usage` (prompt, cached,
recomputed, completion). Read at scrape time: queue depth, requests in flight, every cache tier's hits and misses
(`engine.cache.stats()`, since the process started), and the decode batch (`engine.batcher.stats()`: requests in
it now, steps and rows so far, whose ratio is the mean batch size; prefill passes and the steps they ran in, whose
ratio is how many prefills ran together).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from prophet_rag.results import RequestStats

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _TierCollector:
    """Each cache tier's cumulative hits and misses, read from the engine when scraped."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def collect(self):
        hits = CounterMetricFamily("prophet_rag_cache_hits", "Chunk lookups answered by a cache tier.",
                                   labels=["tier"])
        misses = CounterMetricFamily("prophet_rag_cache_misses", "Chunk lookups a cache tier could not answer.",
                                     labels=["tier"])
        for tier in self._engine.cache.tiers:
            stats = tier.stats()
            hits.add_metric([tier.name], stats.hits)
            misses.add_metric([tier.name], stats.misses)
        yield hits
        yield misses


class _BatchCollector:
    """The engine's decode batch, read when scraped."""

    def __init__(self, batcher) -> None:
        self._batcher = batcher

    def collect(self):
        stats = self._batcher.stats()
        size = GaugeMetricFamily("prophet_rag_decode_batch_size", "Requests in the engine's decode batch now.")
        size.add_metric([], stats.running)
        steps = CounterMetricFamily("prophet_rag_decode_steps", "Batched decode steps (forward passes) run.")
        steps.add_metric([], stats.steps)
        rows = CounterMetricFamily("prophet_rag_decode_rows", "Request-steps decoded; rows / steps is the mean "
                                   "batch size.")
        rows.add_metric([], stats.rows)
        passes = CounterMetricFamily("prophet_rag_prefill_passes", "Prefill passes (Stage I, selective forward) run "
                                     "in the batched steps.")
        passes.add_metric([], stats.passes)
        pass_steps = CounterMetricFamily("prophet_rag_prefill_pass_steps", "Batched steps that ran prefill passes; "
                                         "passes / pass_steps is how many ran together.")
        pass_steps.add_metric([], stats.pass_steps)
        yield from (size, steps, rows, passes, pass_steps)


class Metrics:
    def __init__(self, engine, scheduler) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("prophet_rag_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("prophet_rag_ttft_seconds", "Request arrival to its first text, queue wait included.",
                              buckets=_LATENCY, registry=r)
        self.latency = Histogram("prophet_rag_request_seconds", "Request arrival to its last token.",
                                 buckets=_LATENCY, registry=r)
        self.queue_wait = Histogram("prophet_rag_queue_wait_seconds", "Request arrival to a worker starting it.",
                                    buckets=_LATENCY, registry=r)
        self.tokens = Counter("prophet_rag_tokens", "Tokens of finished requests: prompt, cached (KV from a cache "
                              "tier), recomputed (context tokens recomputed) and completion.", ["kind"], registry=r)
        self.chunks = Counter("prophet_rag_chunks", "Chunks of finished requests, found in a tier (hit) or "
                              "computed (miss).", ["result"], registry=r)
        Gauge("prophet_rag_queue_depth", "Requests waiting for a worker.", registry=r).set_function(
            lambda: scheduler.queue_depth)
        Gauge("prophet_rag_requests_in_flight", "Requests running on the engine.", registry=r).set_function(
            lambda: scheduler.in_flight)
        r.register(_TierCollector(engine))
        if getattr(engine, "batcher", None) is not None:  # the `hf` backend decodes one request at a time
            r.register(_BatchCollector(engine.batcher))

    def finished(self, stats: RequestStats) -> None:
        prompt = stats.prefix_tokens + stats.context_tokens + stats.suffix_tokens
        for kind, count in (("prompt", prompt), ("cached", stats.cached_tokens),
                            ("recomputed", stats.recomputed_tokens), ("completion", stats.new_tokens)):
            self.tokens.labels(kind).inc(count)
        self.chunks.labels("hit").inc(stats.cache_hits)
        self.chunks.labels("miss").inc(stats.cache_misses)
