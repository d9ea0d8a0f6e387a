"""cache.db is data: its Settings rows never configure the store, and no connection maps it into memory."""

import sqlite3

import pytest

from kvstore_helpers import WIDE, put, sql
from prophet_rag.cache.store import KVStore
from prophet_rag.config import StoreConfig

TAMPERED = [
    ("disk_evil", 1),  # diskcache passed it to Disk(...): a raw TypeError on open
    ("sqlite_temp_store_directory", "'/tmp/outside-the-store'"),  # executed as a PRAGMA
    ("sqlite_mmap_size", 2**30),
    ("sqlite_journal_mode", "wal"),
    ("size", -1e9),  # diskcache's volume(): eviction off
    ("size_limit", 10**15),
    ("eviction_policy", "none"),
    ("cull_limit", 1000),
    ("close", 1),  # set as an attribute of the Cache object
]


def _tamper(directory, rows):
    for key, value in rows:
        sql(directory, "INSERT OR REPLACE INTO Settings (key, value) VALUES (?, ?)", key, value)


@pytest.mark.parametrize("row", TAMPERED, ids=[key for key, _ in TAMPERED])
def test_settings_rows_never_configure_the_store(store_dir, row):
    config = StoreConfig(directory=store_dir, size_limit_bytes=400_000, max_entry_bytes=100_000)
    KVStore(config).close()
    _tamper(store_dir, [row])
    with KVStore(config) as store:
        for seed in range(16):
            put(store, seed=seed, meta=WIDE)
        assert store.volume() <= 400_000 and store.stats().evicted > 0
        for con in (store._con(), store._cache._con):
            assert con.execute("PRAGMA mmap_size").fetchone()[0] == 0
            assert con.execute("PRAGMA temp_store_directory").fetchall() in ([], [("",)])
        assert store._con().execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    keys = {key for (key,) in sql(store_dir, "SELECT key FROM Settings")}
    if row[0] not in ("size", "size_limit", "eviction_policy", "cull_limit", "sqlite_mmap_size",
                      "sqlite_journal_mode"):
        assert row[0] not in keys


def test_settings_tampered_while_open_do_not_reach_new_connections(store):
    _tamper(store.directory, TAMPERED)
    con = store._cache._con  # a connection of this thread, made before the tampering
    assert con.execute("PRAGMA mmap_size").fetchone()[0] == 0
    result = {}

    def in_another_thread():  # diskcache opens one connection per thread, reading Settings each time
        result["mmap"] = store._cache._con.execute("PRAGMA mmap_size").fetchone()[0]
        result["put"] = put(store, seed=5)

    import threading

    thread = threading.Thread(target=in_another_thread)
    thread.start()
    thread.join()
    assert result["mmap"] == 0 and result["put"]


def test_no_store_file_is_memory_mapped(store):
    put(store)
    assert not (store.directory / "cache.db-wal").exists() and not (store.directory / "cache.db-shm").exists()
    con = sqlite3.connect(store.directory / "cache.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()
