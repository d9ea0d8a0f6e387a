"""Store files are data, never special: FIFOs, huge sparse files, symlinks and truncation while open are refused or
read as damage, never a hang, a MemoryError or a crash."""

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from kvstore_helpers import answer, chunk_refs, put, sql, value_path
from prophet_rag.cache.store import KVStore
from prophet_rag.config import StoreConfig
from prophet_rag.errors import CacheCorruptionError, StoreError


def _within(seconds, fn):
    """fn() run in a daemon thread, its result or exception passed on; fails the test instead of hanging it."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as error:  # noqa: B036 - handed to the test's thread
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _fifo_in_place(store, ref) -> Path:
    path = value_path(store.directory, ref.key)
    path.unlink()
    os.mkfifo(path, 0o600)
    return path


def test_a_fifo_in_place_of_a_value_file_is_a_miss_not_a_hang(engine_on):
    engine = engine_on()
    clean = answer(engine)
    _fifo_in_place(engine.store, chunk_refs(engine)[0])
    again = _within(30, lambda: answer(engine))
    assert engine.store.stats().corrupt == 1 and again.stats.cache_misses == 1
    assert again.token_ids == clean.token_ids
    assert answer(engine).stats.cache_hits == 3  # the recomputed chunk was stored again


def test_verify_does_not_block_on_a_fifo(store):
    ref, _, _ = put(store)
    _fifo_in_place(store, ref)
    report = _within(30, store.verify)
    assert (report.checked, report.removed) == (1, 1)


def test_a_huge_sparse_value_file_is_refused_unread(store):
    ref, _, meta = put(store)
    path = value_path(store.directory, ref.key)
    os.truncate(path, 20 * 2**30)  # 20 GiB, no disk used
    sql(store.directory, "UPDATE Cache SET size = ? WHERE key = ?", 20 * 2**30, ref.key)
    assert _within(30, lambda: store.get(ref, meta)) is None
    assert store.stats().corrupt == 1 and store.stats().bytes_read == 0
    assert not path.exists()


@pytest.mark.parametrize("name", ["cache.db", "cache.db-journal"])
@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_special_database_files_are_refused_at_open(tmp_path, name, kind):
    directory = tmp_path / "kv"
    KVStore(StoreConfig(directory=directory)).close()
    path = directory / name
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(tmp_path / "elsewhere.db")
    with pytest.raises(StoreError, match=rf"{name} is a (FIFO|symlink), not a regular file; delete it"):
        _within(30, lambda: KVStore(StoreConfig(directory=directory)))


def test_a_value_file_truncated_while_open_is_corrupt(store):
    ref, chunk, meta = put(store)
    out = torch.zeros(chunk.kv.shape)
    with store.open(ref, meta) as entry:
        os.truncate(value_path(store.directory, ref.key), entry.header.data_offset + 10)
        with pytest.raises(CacheCorruptionError, match="ended at byte"):
            entry.read_layers(0, entry.num_layers, out)
    assert store.stats().corrupt == 1 and not store.contains(ref.key)


def test_a_value_file_deleted_while_open_is_still_read(store):
    ref, chunk, meta = put(store)
    out = torch.zeros(chunk.kv.shape)
    with store.open(ref, meta) as entry:
        store.delete(ref.key)  # another process evicts it mid-read
        entry.read_layers(0, entry.num_layers, out)
    assert torch.equal(out, chunk.kv) and store.stats().hits == 1


_TRUNCATE_DB = """
import os, sys
sys.path.insert(0, {tests!r})
from kvstore_helpers import make_chunk, meta_for
from prophet_rag.config import StoreConfig
from prophet_rag.errors import StoreError
from prophet_rag.cache.store import KVStore
meta = meta_for()
store = KVStore(StoreConfig(directory={store!r}))
for seed in range(10):
    store.put(*make_chunk(80, meta, seed), meta)
for size in (os.path.getsize({db!r}) // 2, 100, 0):
    os.truncate({db!r}, size)  # another process damages the database under the open store
    for seed in range(10, 13):
        ref, chunk = make_chunk(80, meta, seed)
        store.get(ref, meta), store.put(ref, chunk, meta), store.contains(ref.key)
    store.get(make_chunk(80, meta, 0)[0], meta)
    store.stats()
    try:
        store.verify()
    except StoreError as error:  # a ProphetRAGError naming the fix, not a raw sqlite3 error
        assert "delete the folder" in str(error)
store.close()
print("survived")
"""


def test_truncating_the_database_under_an_open_store_does_not_crash_it(tmp_path):
    store = tmp_path / "kv"
    script = _TRUNCATE_DB.format(tests=str(Path(__file__).parents[1]), store=str(store), db=str(store / "cache.db"))
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PROPHET_RAG_HOME": str(tmp_path / "home")})
    assert run.returncode == 0, run.stderr[-3000:]  # SQLite's mmap turned this into SIGBUS (-7)
    assert "survived" in run.stdout
