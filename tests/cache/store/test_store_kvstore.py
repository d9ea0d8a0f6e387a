"""KVStore: reads straight into the caller's cache, per-layer reads, damaged entries dropped and re-storable, size
bound, timeouts, verify, compact storage."""

import errno
import os
import sqlite3
import stat

import diskcache
import pytest
import torch

from kvstore_helpers import (
    WIDE,
    assert_same_chunk,
    db_row,
    forge,
    make_chunk,
    meta_for,
    put,
    rewrite,
    sql,
    update_row,
    value_files,
    value_path,
)
from prophet_rag.cache import store_db, store_files
from prophet_rag.cache.store import KVStore, StoreStats
from prophet_rag.config import StoreConfig
from prophet_rag.errors import CacheCorruptionError, InvalidRequestError


@pytest.fixture
def small_pieces(monkeypatch):
    """Reads in 64-byte pieces, so every layer spans several reads and hash updates."""
    monkeypatch.setattr(store_files, "PIECE_BYTES", 64)


def test_put_then_get_returns_the_chunk_and_counts_a_hit(store, small_pieces):
    ref, chunk, meta = put(store)
    got = store.get(ref, meta)
    assert_same_chunk(got, chunk)
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 0, 1)
    assert stats.bytes_read == chunk.nbytes and stats.bytes_written > chunk.nbytes
    assert stats.volume_bytes == store.volume() >= stats.bytes_written


def test_get_reads_straight_into_out_and_nowhere_else(store, small_pieces):
    ref, chunk, meta = put(store)
    cache = torch.full((2, 2, 100, 2, 4), float("nan"))
    out = cache[:, :, 10:90]
    got = store.get(ref, meta, out)
    assert got.kv is out
    assert_same_chunk(got, chunk)
    assert cache[:, :, :10].isnan().all() and cache[:, :, 90:].isnan().all()


def test_non_contiguous_out_goes_through_the_staging_buffer(store):
    ref, chunk, meta = put(store)
    out = torch.empty(2, 2, 2, 80, 4).transpose(2, 3)  # [L, 2, T, H, D] whose blocks are not contiguous
    assert not out[0, 0].is_contiguous()
    assert_same_chunk(store.get(ref, meta, out), chunk)


def test_layers_read_in_parts_count_one_hit(store):
    ref, chunk, meta = put(store, meta=meta_for(layers=4))
    out = torch.zeros(chunk.kv.shape)
    with store.open(ref, meta) as entry:
        assert entry.shape == tuple(chunk.kv.shape) and torch.equal(entry.token_ids, chunk.token_ids)
        entry.read_layers(2, 4, out)
        assert torch.equal(out[2:], chunk.kv[2:]) and not out[:2].any()
        assert store.stats().hits == 0
        entry.read_layers(0, 2, out)
        entry.read_layers(1, 2, out)
    assert torch.equal(out, chunk.kv)
    assert store.stats().hits == 1 and store.stats().bytes_read == chunk.nbytes * 5 // 4


@pytest.mark.parametrize(
    "start, stop, out, match",
    [(0, 3, None, "outside"), (2, 1, None, "outside"), (0, 1, torch.zeros(2, 2, 80, 2, 5), "out must be"),
     (0, 1, torch.zeros(2, 2, 80, 2, 4, dtype=torch.float16), "out must be")],
    ids=["past-end", "reversed", "shape", "dtype"],
)
def test_read_layers_refuses_bad_arguments(store, start, stop, out, match):
    ref, chunk, meta = put(store)
    with store.open(ref, meta) as entry, pytest.raises(InvalidRequestError, match=match):
        entry.read_layers(start, stop, torch.zeros(chunk.kv.shape) if out is None else out)


def test_a_damaged_layer_fails_its_read_and_drops_the_entry(store):
    ref, chunk, meta = put(store, meta=meta_for(layers=3))
    path = value_path(store.directory, ref.key)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x04  # inside the last layer
    rewrite(path, bytes(data))
    out = torch.zeros(chunk.kv.shape)
    with store.open(ref, meta) as entry:
        entry.read_layers(0, 2, out)
        assert torch.equal(out[:2], chunk.kv[:2])
        with pytest.raises(CacheCorruptionError, match="layer 2"):
            entry.read_layers(2, 3, out)
        with pytest.raises(InvalidRequestError, match="failed"):
            entry.read_layers(0, 1, out)
    stats = store.stats()
    assert (stats.hits, stats.corrupt) == (0, 1) and not store.contains(ref.key)
    assert store.put(ref, chunk, meta) and store.get(ref, meta) is not None


def test_missing_key_is_a_miss(store):
    ref, _ = make_chunk()
    assert store.get(ref, meta_for()) is None and store.open(ref, meta_for()) is None
    assert store.stats().misses == 2 and store.stats().hits == 0


def test_put_of_an_existing_key_keeps_the_first_entry(store):
    ref, chunk, meta = put(store)
    written, filename = store.stats().bytes_written, db_row(store.directory, ref.key)["filename"]
    assert store.put(ref, chunk, meta) is True
    assert store.stats().bytes_written == written
    assert db_row(store.directory, ref.key)["filename"] == filename
    assert len(store) == 1 and len(value_files(store.directory)) == 1


def test_put_refuses_a_ref_that_is_not_the_chunks_key(store):
    ref, chunk = make_chunk()
    other_ref, _ = make_chunk(seed=1)
    with pytest.raises(InvalidRequestError, match="not the key"):
        store.put(other_ref, chunk, meta_for())
    with pytest.raises(InvalidRequestError, match="not the key"):
        store.put(ref, chunk, meta_for(model_fp="other"))


def test_contains_delete_len_and_clear(store):
    refs = [put(store, seed=seed)[0] for seed in range(3)]
    assert len(store) == 3 and all(store.contains(ref.key) for ref in refs)
    assert store.delete(refs[0].key) is True
    assert store.delete(refs[0].key) is False
    assert not store.contains(refs[0].key) and len(store) == 2
    assert store.clear() == 2
    assert len(store) == 0 and value_files(store.directory) == []


def test_entries_survive_reopening(store_dir):
    config = StoreConfig(directory=store_dir, size_limit_bytes=2**24, max_entry_bytes=2**20)
    with KVStore(config) as first:
        ref, chunk, meta = put(first)
    with KVStore(config) as second:
        assert_same_chunk(second.get(ref, meta), chunk)


def test_every_get_counts_exactly_one_outcome(store):
    ref, _, meta = put(store)
    missing, _ = make_chunk(seed=9)
    store.get(ref, meta)
    store.get(missing, meta)
    store.get(ref, meta_for(model_fp="other"))
    stats = store.stats()
    assert stats.hits + stats.misses + stats.corrupt + stats.incompatible + stats.unauthenticated + stats.timeouts == 3
    assert isinstance(stats, StoreStats)


def _flip(offset):
    def damage(data: bytes) -> bytes:
        damaged = bytearray(data)
        damaged[offset] ^= 0xFF
        return bytes(damaged)

    return damage


@pytest.mark.parametrize(
    "damage, keep_size",
    [
        (_flip(0), True), (_flip(5), True), (_flip(9), True), (_flip(13), True), (_flip(40), True),
        (_flip(300), True), (_flip(4096), True), (_flip(-1), True),
        (lambda d: d[: len(d) // 2], True), (lambda d: d[: len(d) // 2], False), (lambda d: bytes(len(d)), True),
        (lambda d: b"", True), (lambda d: d + b"\0", True),
    ],
    ids=["magic", "version", "header-size", "tag-kind", "json", "token-ids", "layer-0", "last-byte", "half",
         "half-row-unchanged", "zero-filled", "empty", "appended"],
)
def test_damaged_value_file_is_dropped_counted_and_restorable(store, damage, keep_size):
    ref, chunk, meta = put(store)
    path = value_path(store.directory, ref.key)
    damaged = damage(path.read_bytes())
    if keep_size:
        rewrite(path, damaged)
    else:
        path.write_bytes(damaged)
    assert store.get(ref, meta) is None
    assert store.stats().corrupt == 1 and store.stats().hits == 0
    assert not store.contains(ref.key) and not path.exists()
    assert store.put(ref, chunk, meta) is True
    assert_same_chunk(store.get(ref, meta), chunk)


def test_deleted_value_file_is_dropped_and_restorable(store):
    ref, chunk, meta = put(store)
    value_path(store.directory, ref.key).unlink()
    assert store.get(ref, meta) is None
    assert store.stats().corrupt == 1
    # diskcache alone would keep the row and report misses forever, refusing every later `add`.
    assert not store.contains(ref.key)
    assert store.put(ref, chunk, meta) is True
    assert_same_chunk(store.get(ref, meta), chunk)


@pytest.mark.parametrize("columns", [dict(filename=None, value=None, mode=diskcache.core.MODE_RAW),
                                     dict(filename=None, value=b"PRKV", mode=diskcache.core.MODE_RAW),
                                     dict(size=None)], ids=["null-value", "inline-value", "null-size"])
def test_broken_row_is_removed_on_read_and_repaired_by_put(store, columns):
    ref, chunk, meta = put(store)
    update_row(store.directory, ref.key, **columns)
    assert not store.contains(ref.key)
    assert store.get(ref, meta) is None
    assert store.stats().corrupt == 1 and db_row(store.directory, ref.key) is None
    update_row(store.directory, ref.key, **columns)  # no row left: nothing changes
    assert store.put(ref, chunk, meta) is True
    assert_same_chunk(store.get(ref, meta), chunk)


def test_put_repairs_a_broken_row_in_its_way(store):
    ref, chunk, meta = put(store)
    update_row(store.directory, ref.key, filename=None, value=None, mode=diskcache.core.MODE_RAW)
    assert store.put(ref, chunk, meta) is True
    assert_same_chunk(store.get(ref, meta), chunk)


@pytest.mark.parametrize(
    "other",
    [meta_for(model_fp="x" * 64), meta_for(tokenizer_fp="y" * 64), meta_for(torch.float16),
     meta_for(storage="bfloat16")],
    ids=["model", "tokenizer", "kv-dtype", "storage"],
)
def test_entry_under_a_key_it_does_not_match_is_incompatible_and_removed(store, other):
    ref, _, _ = put(store)
    assert store.get(ref, other) is None
    assert store.stats().incompatible == 1 and store.stats().corrupt == 0
    assert not store.contains(ref.key)


@pytest.mark.parametrize("other", [meta_for(layers=3), meta_for(heads=1), meta_for(head_dim=8)],
                         ids=["layers", "kv-heads", "head-dim"])
def test_entry_for_another_shape_is_incompatible(store, other):
    ref, _, _ = put(store)
    assert store.get(ref, other) is None
    assert store.stats().incompatible == 1 and not store.contains(ref.key)


def test_entry_over_max_entry_bytes_is_skipped(store_dir):
    with KVStore(StoreConfig(directory=store_dir, size_limit_bytes=2**20, max_entry_bytes=5_000)) as store:
        ref, chunk = make_chunk(80)
        assert store.put(ref, chunk, meta_for()) is False
        assert store.stats().skipped == 1 and store.stats().bytes_written == 0
        assert not store.contains(ref.key) and value_files(store_dir) == []


def test_non_finite_chunk_is_not_stored(store):
    ref, chunk = make_chunk()
    chunk.kv[0, 1, 2, 0, 0] = float("nan")
    assert store.put(ref, chunk, meta_for()) is False
    assert store.stats().skipped == 1 and len(store) == 0


def _small_store(store_dir, policy="least-recently-used"):
    # About eight 44 KiB WIDE entries fit beside the database.
    return KVStore(StoreConfig(directory=store_dir, size_limit_bytes=LIMIT, max_entry_bytes=100_000,
                               eviction_policy=policy))


LIMIT = 400_000


def test_volume_stays_within_the_size_limit(store_dir):
    with _small_store(store_dir) as store:
        for seed in range(24):
            put(store, seed=seed, meta=WIDE)
            assert store.volume() <= LIMIT
        stats = store.stats()
        assert stats.evicted > 0 and stats.evicted + stats.entries == 24
        # Evicting one entry at a time keeps the store nearly full (diskcache's cull drops ten at once).
        entry = value_files(store_dir)[0].stat().st_size
        assert stats.volume_bytes > LIMIT - entry
        assert len(value_files(store_dir)) == stats.entries


@pytest.mark.parametrize("policy", ["least-recently-used", "least-frequently-used"])
def test_eviction_keeps_a_recently_read_entry(store_dir, policy):
    with _small_store(store_dir, policy) as store:
        puts = [put(store, seed=seed, meta=WIDE) for seed in range(6)]
        assert store.stats().evicted == 0
        first_ref, _, _ = puts[0]
        for _ in range(3):
            assert store.get(first_ref, WIDE) is not None
        for seed in range(6, 12):
            put(store, seed=seed, meta=WIDE)
        assert store.stats().evicted >= 1
        assert store.contains(first_ref.key)
        assert not store.contains(puts[1][0].key)


@pytest.mark.parametrize("error", [diskcache.Timeout(), sqlite3.OperationalError("database is locked")])
def test_lookup_failure_is_a_counted_miss(store, monkeypatch, error):
    ref, chunk, meta = put(store)

    def locked(*args, **kwargs):
        raise error

    monkeypatch.setattr(KVStore, "_row", locked)
    assert store.get(ref, meta) is None
    assert store.stats().timeouts == 1 and store.stats().misses == 0
    monkeypatch.undo()
    assert_same_chunk(store.get(ref, meta), chunk)


@pytest.mark.parametrize("error", [diskcache.Timeout(), sqlite3.OperationalError("database is locked")])
def test_put_timeout_is_counted_and_skipped(store, monkeypatch, error):
    def locked(*args, **kwargs):
        raise error

    monkeypatch.setattr(diskcache.Cache, "add", locked)
    ref, chunk = make_chunk()
    assert store.put(ref, chunk, meta_for()) is False
    stats = store.stats()
    assert (stats.skipped, stats.timeouts, stats.bytes_written) == (1, 1, 0)
    assert value_files(store.directory) == []  # the written file went with the failed commit


def test_disk_full_skips_the_put_and_keeps_serving(store, monkeypatch):
    ref, chunk, meta = put(store)

    def full(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    other, other_chunk = make_chunk(seed=1)
    assert store.put(other, other_chunk, meta) is False
    assert store.stats().skipped == 1 and store.stats().timeouts == 0
    assert len(value_files(store.directory)) == 1
    assert_same_chunk(store.get(ref, meta), chunk)


def test_eviction_failure_does_not_fail_the_put(store, monkeypatch):
    def broken(self):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(KVStore, "volume", broken)
    ref, _, _ = put(store)
    monkeypatch.undo()
    assert store.contains(ref.key) and store.stats().evicted == 0


def test_readers_do_not_wait_for_a_writer_and_a_locked_put_is_skipped(store_dir, monkeypatch):
    monkeypatch.setattr(store_db, "SQLITE_TIMEOUT_S", 0.2)
    with KVStore(StoreConfig(directory=store_dir, size_limit_bytes=2**24, max_entry_bytes=2**20)) as store:
        ref, chunk, meta = put(store)
        other, other_chunk = make_chunk(seed=1)
        locker = sqlite3.connect(store_dir / "cache.db", isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")  # another process mid-write
            assert_same_chunk(store.get(ref, meta), chunk)
            assert store.put(other, other_chunk, meta) is False
            locker.execute("ROLLBACK")
            locker.execute("BEGIN EXCLUSIVE")  # another process committing: readers wait, then give up
            assert store.get(ref, meta) is None
        finally:
            locker.close()
        stats = store.stats()
        assert (stats.hits, stats.timeouts, stats.skipped, stats.misses) == (1, 2, 1, 0)
        assert len(value_files(store_dir)) == 1  # the refused put left no value file behind
        assert_same_chunk(store.get(ref, meta), chunk)


def test_verify_removes_damaged_entries_only(store):
    refs = [put(store, seed=seed)[0] for seed in range(4)]
    path = value_path(store.directory, refs[1].key)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    rewrite(path, bytes(data))
    report = store.verify()
    assert (report.checked, report.ok, report.removed, report.other_version) == (4, 3, 1, 0)
    assert not store.contains(refs[1].key) and len(store) == 3
    assert store.verify().removed == 0


def test_verify_checks_each_entry_against_its_own_key(store):
    a, _, _ = put(store, seed=0)
    b, _, _ = put(store, seed=1)
    path_a, path_b = value_path(store.directory, a.key), value_path(store.directory, b.key)
    data_a, data_b = path_a.read_bytes(), path_b.read_bytes()
    rewrite(path_a, data_b)  # swapped values: both intact, both under the wrong key
    rewrite(path_b, data_a)
    report = store.verify()
    assert (report.checked, report.ok, report.removed) == (2, 0, 2)


def test_verify_keeps_entries_of_another_format_version(store):
    ref, _, _ = put(store)
    path = value_path(store.directory, ref.key)
    data = bytearray(path.read_bytes())
    data[4:8] = (1).to_bytes(4, "little")  # a version-1 entry (another frame): not ours to judge
    rewrite(path, bytes(data))
    report = store.verify()
    assert (report.checked, report.ok, report.removed, report.other_version) == (1, 0, 0, 1)
    assert store.contains(ref.key)


def test_verify_does_not_touch_access_times(store):
    refs = [put(store, seed=seed)[0] for seed in range(3)]
    before = [db_row(store.directory, ref.key)["access_time"] for ref in refs]
    store.verify()
    assert [db_row(store.directory, ref.key)["access_time"] for ref in refs] == before


def test_verify_refuses_non_finite_values_under_a_valid_checksum(store):
    ref, chunk, meta = put(store)
    forged = chunk.kv.clone()
    forged[1, 0, 5, 1, 3] = float("inf")
    forge(store.directory, ref, forged)
    assert store.verify().removed == 1 and not store.contains(ref.key)


def test_new_directory_and_files_are_private(store):
    put(store)
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    for path in [store.directory / "cache.db", *value_files(store.directory)]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in store.directory.glob("*/"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


@pytest.mark.parametrize("storage", ["bfloat16", "float8_e4m3"])
def test_compact_storage_round_trips_into_out(store, storage, small_pieces):
    meta = meta_for(storage=storage)
    ref, chunk, _ = put(store, meta=meta)
    cache = torch.full((2, 2, 100, 2, 4), float("nan"))
    got = store.get(ref, meta, cache[:, :, 10:90])
    tolerance = 2**-8 if storage == "bfloat16" else 2**-4
    assert got.kv.dtype == torch.float32
    torch.testing.assert_close(got.kv, chunk.kv, rtol=tolerance, atol=chunk.kv.abs().max().item() / 448 * 2**-3)
    assert cache[:, :, :10].isnan().all()
    assert value_path(store.directory, ref.key).stat().st_size < chunk.nbytes
    lossless = meta_for()
    assert store.get(ref, lossless) is None and store.stats().incompatible == 1  # its key is the compact one's


def test_store_holds_sql_rows_only_for_str_keys(store):
    put(store)
    rows = sql(store.directory, "SELECT raw, mode, value FROM Cache")
    assert rows == [(1, diskcache.core.MODE_BINARY, None)]


class _Event:
    """Stands in for a CUDA event: records whether anyone waited on it."""

    def __init__(self):
        self.waited = False

    def synchronize(self):
        self.waited = True


def test_staging_alternates_two_buffers_and_waits_for_their_copies():
    staging = store_files.Staging(pinned=False)
    slot_a, a = staging.take(100)
    event_a = _Event()
    staging.done(slot_a, event_a)
    slot_b, b = staging.take(100)
    assert slot_a != slot_b and a.data_ptr() != b.data_ptr() and a.numel() == b.numel() == 100
    assert not event_a.waited  # layer l+1 is read while layer l's copy is in flight
    slot_c, c = staging.take(200)
    assert slot_c == slot_a and event_a.waited  # the buffer is reused only once its copy is done
    assert c.data_ptr() == a.data_ptr() and c.numel() == 200  # grown to whole MiBs, so this fits in place
    staging.take(3 * 2**20)
    _, grown = staging.take(3 * 2**20)
    assert grown.numel() == 3 * 2**20


def test_connections_of_ended_threads_are_closed(store):
    import threading

    ref, _, meta = put(store)
    for _ in range(5):
        thread = threading.Thread(target=store.get, args=(ref, meta))
        thread.start()
        thread.join()
    assert len(store._connections) <= 2  # the last thread's and this one's, not one per thread ever started
