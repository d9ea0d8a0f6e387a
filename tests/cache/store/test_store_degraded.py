"""A store that cannot be written or whose index is damaged (issue 26, item 5): the engine runs on without it
writing (a full disk or read-only folder at open), and a damaged cache.db is repaired or rebuilt from the value
files, never left failing every lookup, and never passed by `verify`."""

from __future__ import annotations

import copy
import errno
import logging
import os
import resource
import signal
import sqlite3
from pathlib import Path

import pytest

from kvstore_helpers import WIDE, assert_same_chunk, make_chunk, value_files
from prophet_rag.cache import store_db, store_files
from prophet_rag.cache.store import KVStore
from prophet_rag.cli import main
from prophet_rag.config import GenerationConfig, StoreConfig
from prophet_rag.engine import ProphetEngine
from prophet_rag.errors import StoreError
from tiny import tiny_model, tiny_tokenizer

GEN = GenerationConfig(max_new_tokens=3, eos_token_ids=(10**6,))
DOCS = [f"Record {i}: the pump house of site {i} holds {i + 2} pumps." for i in range(4)]


def _config(directory: Path) -> StoreConfig:
    return StoreConfig(directory=directory, size_limit_bytes=2**24, max_entry_bytes=2**20)


def _filled(directory: Path, count: int = 6) -> list:
    chunks = [make_chunk(80, WIDE, seed=seed) for seed in range(count)]
    with KVStore(_config(directory)) as store:
        for ref, chunk in chunks:
            assert store.put(ref, chunk, WIDE)
    return chunks


class _DiskFull:
    """No file may grow (RLIMIT_FSIZE 0, SIGXFSZ ignored): every write that extends a file fails, as on a full disk."""

    def __enter__(self):
        self._limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        self._handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, self._limits[1]))
        return self

    def __exit__(self, *exc_info):
        resource.setrlimit(resource.RLIMIT_FSIZE, self._limits)
        signal.signal(signal.SIGXFSZ, self._handler)


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*") if p.is_file()}


def test_a_new_store_on_a_full_disk_runs_without_writing(store_dir):
    store_dir.mkdir(mode=0o700)
    ref, chunk = make_chunk(80, WIDE, seed=1)
    with _DiskFull():
        store = KVStore(_config(store_dir))
        assert store.read_only is not None
        assert store.get(ref, WIDE) is None
        assert store.put(ref, chunk, WIDE) is False
        stats = store.stats()
        store.close()
    assert stats.read_only and stats.skipped == 1 and stats.misses == 1 and stats.timeouts == 0


def test_an_existing_store_on_a_full_disk_still_serves_its_entries(store_dir):
    chunks = _filled(store_dir)
    before = _snapshot(store_dir)
    extra_ref, extra = make_chunk(80, WIDE, seed=99)
    with _DiskFull():
        with KVStore(_config(store_dir)) as store:
            for ref, chunk in chunks:
                assert_same_chunk(store.get(ref, WIDE), chunk)
            assert store.put(extra_ref, extra, WIDE) is False
            stats = store.stats()
    assert stats.read_only and stats.hits == len(chunks) and stats.skipped == 1
    assert _snapshot(store_dir) == before


def test_a_read_only_directory_serves_reads_skips_writes_and_warns_once(store_dir, monkeypatch, caplog):
    chunks = _filled(store_dir)
    before = _snapshot(store_dir)
    monkeypatch.setattr(store_files.os, "access", lambda path, mode: False)  # what a non-root user sees on 0o500
    with caplog.at_level(logging.WARNING, logger="prophet_rag.cache.store"), KVStore(_config(store_dir)) as store:
        for ref, chunk in chunks:
            assert_same_chunk(store.get(ref, WIDE), chunk)
        for seed in range(100, 105):
            assert store.put(*make_chunk(80, WIDE, seed=seed), WIDE) is False
        stats = store.stats()
        with pytest.raises(StoreError, match="cannot clear the KV store: .*not writable"):
            store.clear()
        with pytest.raises(StoreError, match="cannot verify the KV store: .*not writable"):
            store.verify()
    assert stats.read_only and stats.skipped == 5 and stats.hits == len(chunks)
    assert caplog.text.count("runs read-only") == 1 and "not writable by this user" in caplog.text
    assert _snapshot(store_dir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write a 0o500 folder")
def test_a_0o500_directory_is_read_only(store_dir):
    chunks = _filled(store_dir)
    store_dir.chmod(0o500)
    try:
        with KVStore(_config(store_dir)) as store:
            assert store.read_only is not None
            assert_same_chunk(store.get(chunks[0][0], WIDE), chunks[0][1])
    finally:
        store_dir.chmod(0o700)


def test_an_engine_on_a_full_disk_answers_as_one_with_a_working_store(tmp_path):
    def answers(directory):
        engine = ProphetEngine(tiny_model("llama"), copy.deepcopy(tiny_tokenizer()), store=_config(directory))
        with engine:
            got = [engine.answer(DOCS[i : i + 3], f"How many pumps at site {i}?", generation=GEN).token_ids
                   for i in range(2)]
            return got, engine.store.stats()

    reference, _ = answers(tmp_path / "working")
    (tmp_path / "full").mkdir(mode=0o700)
    with _DiskFull():
        got, stats = answers(tmp_path / "full")
    assert got == reference
    assert stats.read_only and stats.skipped > 0 and stats.hits == 0


def _zero_page(directory: Path, name: str) -> None:
    """Overwrite with zeros the root page of table or index `name` in cache.db."""
    con = sqlite3.connect(directory / "cache.db")
    (page_size,) = con.execute("PRAGMA page_size").fetchone()
    (root,) = con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()
    con.close()
    with open(directory / "cache.db", "r+b") as db:
        db.seek((root - 1) * page_size)
        db.write(bytes(page_size))


def test_a_zeroed_index_page_is_repaired_on_the_first_lookup(store_dir):
    chunks = _filled(store_dir)
    _zero_page(store_dir, "Cache_key_raw")
    with KVStore(_config(store_dir)) as store:
        for ref, chunk in chunks:
            assert_same_chunk(store.get(ref, WIDE), chunk)
        stats = store.stats()
    assert stats.repairs == 1 and stats.hits == len(chunks) and stats.timeouts == 0


def test_a_zeroed_table_page_is_rebuilt_from_the_value_files(store_dir):
    chunks = _filled(store_dir)
    _zero_page(store_dir, "Cache")
    with KVStore(_config(store_dir)) as store:
        for ref, chunk in chunks:
            assert_same_chunk(store.get(ref, WIDE), chunk)
        assert store.stats().repairs == 1 and len(store) == len(chunks)
        assert store.verify().ok == len(chunks)


def test_a_file_that_is_not_a_database_is_rebuilt_from_the_value_files(store_dir):
    chunks = _filled(store_dir, count=3)
    (store_dir / "cache.db").write_bytes(b"this is not an sqlite database" * 100)
    with KVStore(_config(store_dir)) as store:
        for ref, chunk in chunks:
            assert_same_chunk(store.get(ref, WIDE), chunk)


def test_a_rebuild_drops_value_files_that_fail_their_check(store_dir):
    chunks = _filled(store_dir, count=3)
    damaged = value_files(store_dir)[0]
    damaged.write_bytes(b"\0" * damaged.stat().st_size)
    os.utime(damaged, (0, 0))  # old enough for orphan reclamation
    _zero_page(store_dir, "Cache")
    with KVStore(_config(store_dir)) as store:
        found = [store.get(ref, WIDE) for ref, _ in chunks]
        assert sum(got is not None for got in found) == len(chunks) - 1
        assert len(store) == len(chunks) - 1
    assert not damaged.exists()


def test_verify_repairs_a_zeroed_index_page_and_lookups_work_after_it(store_dir):
    chunks = _filled(store_dir)
    _zero_page(store_dir, "Cache_key_raw")
    with KVStore(_config(store_dir)) as store:
        report = store.verify()
        assert report.index_repaired and report.ok == len(chunks)
        for ref, chunk in chunks:
            assert_same_chunk(store.get(ref, WIDE), chunk)
        assert store.stats().timeouts == 0


def test_cache_verify_says_it_repaired_the_index(store_dir, capsys):
    chunks = _filled(store_dir)
    _zero_page(store_dir, "Cache_key_raw")
    assert main(["cache", "verify", "--store", str(store_dir)]) == 0
    out = capsys.readouterr().out
    assert "index (cache.db) was damaged" in out and f"{len(chunks)} ok" in out


def test_verify_of_a_sound_store_repairs_nothing(store_dir):
    _filled(store_dir, count=2)
    with KVStore(_config(store_dir)) as store:
        report = store.verify()
    assert not report.index_repaired and report.ok == 2


def test_a_table_damaged_while_the_store_runs_is_rebuilt(store_dir):
    chunks = _filled(store_dir)
    with KVStore(_config(store_dir)) as store:
        _zero_page(store_dir, "Cache")
        store._repair("found by a lookup", store._generation)  # what a lookup that met the damage calls
        for ref, chunk in chunks:
            assert_same_chunk(store.get(ref, WIDE), chunk)
        assert store.stats().repairs == 1 and store.read_only is None


def test_a_rebuild_that_cannot_write_leaves_the_store_read_only(store_dir, monkeypatch):
    chunks = _filled(store_dir)
    with KVStore(_config(store_dir)) as store:
        _zero_page(store_dir, "Cache")
        monkeypatch.setattr(store_db, "open_cache", lambda *args: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
        store._repair("found by a lookup", store._generation)
        assert store.read_only is not None and "cannot rebuild" in store.read_only
        assert store.get(chunks[0][0], WIDE) is None  # a miss, never an error
        assert store.put(*make_chunk(80, WIDE, seed=50), WIDE) is False
