"""KVStore: hits and misses, damaged entries dropped and re-storable, size bound, timeouts, verify, listing."""

import errno
import sqlite3
import stat

import diskcache
import pytest
import torch

from kvstore_helpers import (
    assert_same_chunk,
    db_row,
    file_chunk,
    frame,
    key_for,
    make_chunk,
    meta_for,
    update_row,
    value_path,
)
from prophet_rag import store as store_module
from prophet_rag.codec import EntryMeta
from prophet_rag.config import StoreConfig
from prophet_rag.keys import FORMAT_VERSION
from prophet_rag.store import KVStore, SafeDisk, StoreStats


def _put(store, chunk):
    meta = meta_for(chunk)
    key = key_for(chunk, meta)
    assert store.put(key, chunk, meta) is True
    return key, meta


def test_put_then_get_returns_the_chunk_and_counts_a_hit(store):
    chunk = file_chunk()
    key, meta = _put(store, chunk)
    got = store.get(key, meta, token_ids=chunk.token_ids)
    assert_same_chunk(got, chunk)
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 0, 1)
    assert stats.bytes_read == stats.bytes_written > chunk.nbytes
    assert stats.volume_bytes == store.volume() >= stats.bytes_written


def test_small_entries_live_in_the_database_and_round_trip(store):
    chunk = make_chunk(num_tokens=3)
    key, meta = _put(store, chunk)
    assert db_row(store.directory, key)["filename"] is None
    assert_same_chunk(store.get(key, meta), chunk)


def test_large_entries_get_their_own_file(store):
    key, _ = _put(store, file_chunk())
    assert value_path(store.directory, key).is_file()


def test_missing_key_is_a_miss(store):
    chunk = make_chunk()
    assert store.get("0" * 64, meta_for(chunk)) is None
    assert store.stats().misses == 1 and store.stats().hits == 0


def test_put_of_an_existing_key_keeps_the_first_entry(store):
    chunk = file_chunk()
    key, meta = _put(store, chunk)
    written, filename = store.stats().bytes_written, db_row(store.directory, key)["filename"]
    assert store.put(key, chunk, meta) is True
    assert store.stats().bytes_written == written
    assert db_row(store.directory, key)["filename"] == filename
    assert len(store) == 1


def test_contains_delete_len_and_clear(store):
    keys = [_put(store, make_chunk(seed=seed))[0] for seed in range(3)]
    assert len(store) == 3 and all(store.contains(key) for key in keys)
    assert store.delete(keys[0]) is True
    assert store.delete(keys[0]) is False
    assert not store.contains(keys[0]) and len(store) == 2
    assert store.clear() == 2
    assert len(store) == 0


def test_entries_survive_reopening(store_dir):
    chunk = file_chunk()
    config = StoreConfig(directory=store_dir, size_limit_bytes=2**24, max_entry_bytes=2**20)
    with KVStore(config) as first:
        key, meta = _put(first, chunk)
    with KVStore(config) as second:
        assert_same_chunk(second.get(key, meta), chunk)


def test_every_get_counts_exactly_one_outcome(store):
    chunk = file_chunk()
    key, meta = _put(store, chunk)
    store.get(key, meta)
    store.get("f" * 64, meta)
    store.get(key, EntryMeta("other", meta.tokenizer_fp, meta.kv_spec))
    stats = store.stats()
    assert stats.hits + stats.misses + stats.corrupt + stats.incompatible + stats.timeouts == 3
    assert isinstance(stats, StoreStats)


def _flip(offset):
    def damage(data: bytes) -> bytes:
        damaged = bytearray(data)
        damaged[offset] ^= 0xFF
        return bytes(damaged)

    return damage


@pytest.mark.parametrize(
    "damage",
    [
        _flip(0),
        _flip(5),
        _flip(12),
        _flip(100),
        _flip(2000),
        _flip(-40),
        _flip(-1),
        lambda d: d[: len(d) // 2],
        lambda d: bytes(len(d)),
        lambda d: b"",
    ],
    ids=[
        "magic",
        "version",
        "length",
        "st-header",
        "tensor-data",
        "token-ids",
        "digest",
        "half",
        "zero-filled",
        "empty",
    ],
)
def test_damaged_value_file_is_dropped_counted_and_restorable(store, damage):
    chunk = file_chunk()
    key, meta = _put(store, chunk)
    path = value_path(store.directory, key)
    path.write_bytes(damage(path.read_bytes()))

    assert store.get(key, meta) is None
    assert store.stats().corrupt == 1 and store.stats().hits == 0
    assert not store.contains(key) and not path.exists()
    assert store.put(key, chunk, meta) is True
    assert_same_chunk(store.get(key, meta), chunk)


def test_deleted_value_file_is_dropped_and_restorable(store):
    chunk = file_chunk()
    key, meta = _put(store, chunk)
    value_path(store.directory, key).unlink()
    assert store.get(key, meta) is None
    assert store.stats().corrupt == 1
    # diskcache alone would keep the row and report misses forever, refusing every later `add`.
    assert not store.contains(key)
    assert store.put(key, chunk, meta) is True
    assert_same_chunk(store.get(key, meta), chunk)


def test_damaged_inline_value_is_dropped(store):
    chunk = make_chunk()
    key, meta = _put(store, chunk)
    damaged = bytearray(db_row(store.directory, key)["value"])
    damaged[len(damaged) // 2] ^= 0x10
    update_row(store.directory, key, value=bytes(damaged))
    assert store.get(key, meta) is None
    assert store.stats().corrupt == 1 and not store.contains(key)


@pytest.mark.parametrize("field", ["model_fp", "tokenizer_fp", "kv_spec"])
def test_incompatible_entry_is_a_counted_miss_and_removed(store, field):
    chunk = file_chunk()
    key, meta = _put(store, chunk)
    other = EntryMeta(**{**meta.__dict__, field: "another"})
    assert store.get(key, other) is None
    assert store.stats().incompatible == 1 and store.stats().corrupt == 0
    assert not store.contains(key)


def test_wrong_token_ids_are_a_miss(store):
    chunk = file_chunk()
    key, meta = _put(store, chunk)
    assert store.get(key, meta, token_ids=chunk.token_ids.flip(0)) is None
    assert store.stats().incompatible == 1 and store.stats().hits == 0


def test_entry_over_max_entry_bytes_is_skipped(store_dir):
    config = StoreConfig(directory=store_dir, size_limit_bytes=2**20, max_entry_bytes=10_000)
    with KVStore(config) as store:
        chunk = file_chunk()
        meta = meta_for(chunk)
        key = key_for(chunk, meta)
        assert store.put(key, chunk, meta) is False
        assert store.stats().skipped == 1 and store.stats().bytes_written == 0
        assert not store.contains(key) and len(store) == 0


def _small_store(store_dir, policy="least-recently-used"):
    # ~42 KiB entries: about eight fit beside the database.
    return KVStore(
        StoreConfig(directory=store_dir, size_limit_bytes=400_000, max_entry_bytes=100_000, eviction_policy=policy)
    )


def test_volume_stays_within_the_size_limit(store_dir):
    with _small_store(store_dir) as store:
        for seed in range(24):
            _put(store, file_chunk(seed=seed))
            assert store.volume() <= 400_000
        stats = store.stats()
        assert stats.evicted > 0
        assert stats.evicted + stats.entries == 24
        # Evicting one entry at a time keeps the store nearly full (diskcache's cull drops ten at once).
        assert stats.entries == 8 and stats.volume_bytes > 400_000 - 45_000
        assert len(list(store_dir.rglob("*.val"))) == stats.entries


def test_lru_keeps_a_recently_read_entry(store_dir):
    with _small_store(store_dir) as store:
        puts = [_put(store, file_chunk(seed=seed)) for seed in range(6)]
        assert store.stats().evicted == 0
        first_key, first_meta = puts[0]
        assert store.get(first_key, first_meta) is not None
        for seed in range(6, 12):
            _put(store, file_chunk(seed=seed))
        assert store.stats().evicted >= 1
        assert store.contains(first_key)
        assert not store.contains(puts[1][0])


@pytest.mark.parametrize("error", [diskcache.Timeout(), sqlite3.OperationalError("database is locked")])
def test_get_timeout_is_a_counted_miss(store, monkeypatch, error):
    chunk = make_chunk()
    key, meta = _put(store, chunk)

    def locked(*args, **kwargs):
        raise error

    monkeypatch.setattr(diskcache.Cache, "get", locked)
    assert store.get(key, meta) is None
    assert store.stats().timeouts == 1 and store.stats().misses == 0
    monkeypatch.undo()
    assert_same_chunk(store.get(key, meta), chunk)


@pytest.mark.parametrize("error", [diskcache.Timeout(), sqlite3.OperationalError("database is locked")])
def test_put_timeout_is_counted_and_skipped(store, monkeypatch, error):
    def locked(*args, **kwargs):
        raise error

    monkeypatch.setattr(diskcache.Cache, "add", locked)
    chunk = make_chunk()
    meta = meta_for(chunk)
    assert store.put(key_for(chunk, meta), chunk, meta) is False
    stats = store.stats()
    assert (stats.skipped, stats.timeouts, stats.bytes_written) == (1, 1, 0)


def test_disk_full_skips_the_put_and_keeps_serving(store, monkeypatch):
    stored = file_chunk(seed=0)
    key, meta = _put(store, stored)

    def full(self, value, read, key=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SafeDisk, "store", full)
    other = file_chunk(seed=1)
    assert store.put(key_for(other, meta), other, meta) is False
    assert store.stats().skipped == 1 and store.stats().timeouts == 0
    assert_same_chunk(store.get(key, meta), stored)


def test_eviction_failure_does_not_fail_the_put(store, monkeypatch):
    def broken(self):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(diskcache.Cache, "volume", broken)
    chunk = make_chunk()
    key, _ = _put(store, chunk)
    monkeypatch.undo()
    assert store.contains(key) and store.stats().evicted == 0


def test_a_real_lock_times_out_get_and_put(store_dir, monkeypatch):
    monkeypatch.setattr(store_module, "_SQLITE_TIMEOUT_S", 0.2)
    with KVStore(StoreConfig(directory=store_dir, size_limit_bytes=2**24, max_entry_bytes=2**20)) as store:
        chunk = file_chunk()
        key, meta = _put(store, chunk)
        other = file_chunk(seed=1)
        locker = sqlite3.connect(store_dir / "cache.db", isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")  # another process mid-write
            # Under LRU every get updates the access time, so it needs the write lock too.
            assert store.get(key, meta) is None
            assert store.put(key_for(other, meta), other, meta) is False
        finally:
            locker.close()
        stats = store.stats()
        assert (stats.timeouts, stats.skipped, stats.misses) == (2, 1, 0)
        assert len(list(store_dir.rglob("*.val"))) == 1  # the refused put left no value file behind
        assert_same_chunk(store.get(key, meta), chunk)


def test_verify_removes_damaged_entries_only(store):
    keys = [_put(store, file_chunk(seed=seed))[0] for seed in range(3)]
    keys.append(_put(store, make_chunk(seed=9))[0])
    path = value_path(store.directory, keys[1])
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))

    report = store.verify()
    assert (report.checked, report.ok, report.removed, report.other_version) == (4, 3, 1, 0)
    assert not store.contains(keys[1]) and len(store) == 3
    assert store.verify().removed == 0


def test_verify_keeps_entries_of_another_format_version(store):
    key, _ = _put(store, file_chunk())
    value_path(store.directory, key).write_bytes(frame(b"a future body", FORMAT_VERSION + 1))
    report = store.verify()
    assert (report.checked, report.ok, report.removed, report.other_version) == (1, 0, 0, 1)
    assert store.contains(key)


def test_verify_and_entries_do_not_touch_access_times(store):
    keys = [_put(store, file_chunk(seed=seed))[0] for seed in range(3)]
    before = [db_row(store.directory, key)["access_time"] for key in keys]
    store.verify()
    list(store.entries())
    assert [db_row(store.directory, key)["access_time"] for key in keys] == before


def test_entries_lists_intact_entries_with_metadata(store):
    big, small = file_chunk(), make_chunk(num_tokens=4, dtype=torch.bfloat16)
    big_key, big_meta = _put(store, big)
    small_key, small_meta = _put(store, small)
    broken_key, _ = _put(store, file_chunk(seed=5))
    value_path(store.directory, broken_key).write_bytes(b"garbage")

    listed = dict(store.entries())
    assert set(listed) == {big_key, small_key}
    assert listed[small_key]["kv_spec"] == small_meta.kv_spec and listed[small_key]["num_tokens"] == "4"
    assert listed[big_key]["model_fp"] == big_meta.model_fp
    assert listed[big_key]["bytes"] == value_path(store.directory, big_key).stat().st_size


def test_new_directory_is_private(store):
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
