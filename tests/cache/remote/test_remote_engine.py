"""Engines over one Redis server: answers identical to engines without it, read-through into the local tiers,
write-through of computed chunks, and two processes with separate local directories sharing the server."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from prophet_rag.config import StoreConfig
from remote_helpers import DOCS, GEN, REQUESTS, answers, engine_over, fingerprint


@pytest.fixture
def reference(tmp_path) -> list[tuple]:
    """The answers of an engine with no shared tier, every chunk computed."""
    with engine_over(StoreConfig(directory=tmp_path / "reference")) as engine:
        return answers(engine)


def test_the_remote_tier_sits_behind_the_disk_store(remote_config):
    with engine_over(remote_config()) as engine:
        assert [tier.name for tier in engine.cache.tiers] == ["memory", "host", "disk", "remote"]


def test_without_a_url_there_is_no_remote_tier(tmp_path):
    with engine_over(StoreConfig(directory=tmp_path / "plain")) as engine:
        assert "remote" not in [tier.name for tier in engine.cache.tiers]


def test_computed_chunks_are_written_through_and_read_by_another_replica(remote_config, reference):
    with engine_over(remote_config("a")) as first:
        assert answers(first) == reference
        written = first.cache.stats()["remote"]
    with engine_over(remote_config("b")) as second:
        got = [second.answer(docs, query, generation=GEN, return_logits=True) for docs, query in REQUESTS]
        remote = second.cache.stats()["remote"]
    assert [fingerprint(a) for a in got] == reference
    assert sum(a.stats.cache_misses for a in got) == 0
    assert written.bytes_written > 0 and written.hits == 0
    assert remote.hits == len(DOCS) + 1  # every document once, and the prefix
    assert (remote.misses, remote.failures, remote.corrupt, remote.unauthenticated) == (0, 0, 0, 0)


def test_a_remote_hit_is_copied_into_the_local_tiers(remote_config):
    with engine_over(remote_config("a")) as first:
        answers(first)
    with engine_over(remote_config("b"), hot_cache_bytes=2**20) as second:
        answers(second, REQUESTS[:1])
        assert second.store.stats().entries == 4  # three documents and the prefix, now on the local disk too
        hits = second.cache.stats()["remote"].hits
        answers(second, REQUESTS[:1])
        assert second.cache.stats()["remote"].hits == hits  # the second time the memory tier answers
        assert second.hot.stats().hits == 4


def test_ingest_skips_what_the_server_holds(remote_config):
    with engine_over(remote_config("a")) as first:
        assert first.ingest(DOCS) == len(DOCS)
    with engine_over(remote_config("b")) as second:
        assert second.ingest(DOCS) == 0
        assert second.ingest([*DOCS, "A new record: the pump house of site 9 holds 4 pumps."]) == 1


def test_compact_storage_shares_its_own_entries(remote_config, tmp_path):
    with engine_over(remote_config("a", kv_storage="bfloat16")) as first:
        answers(first)
        compact = answers(first)  # from its disk: the chunks as stored, in bf16 (the first pass used them computed)
    with engine_over(remote_config("b", kv_storage="bfloat16")) as second:
        assert answers(second) == compact
        assert second.cache.stats()["remote"].hits == len(DOCS) + 1
    with engine_over(remote_config("c")) as lossless:
        answers(lossless, REQUESTS[:1])
        assert lossless.cache.stats()["remote"].hits == 0  # lossless keys never meet compact entries


def _ingest_and_answer(config: StoreConfig, results) -> None:
    """Process A: its own local directory, the shared server; ingest every document, then answer."""
    torch.set_num_threads(1)
    with engine_over(config) as engine:
        computed = engine.ingest(DOCS)
        results.put((computed, answers(engine)))


def test_a_second_process_answers_from_what_the_first_ingested(remote_config):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    writer = ctx.Process(target=_ingest_and_answer, args=(remote_config("process-a"), results))
    writer.start()
    computed, expected = results.get(timeout=300)
    writer.join(timeout=60)
    assert writer.exitcode == 0 and computed == len(DOCS)
    with engine_over(remote_config("process-b")) as reader:
        got = [reader.answer(docs, query, generation=GEN, return_logits=True) for docs, query in REQUESTS]
        remote = reader.cache.stats()["remote"]
        assert reader.store.stats().entries == len(DOCS) + 1
    assert [fingerprint(a) for a in got] == expected
    assert sum(a.stats.cache_misses for a in got) == 0
    assert sum(a.stats.cache_hits for a in got) == sum(len(docs) for docs, _ in REQUESTS)
    assert remote.hits == len(DOCS) + 1 and remote.misses == 0
