"""Disk accounting: writers killed mid-put leave no torn entry and no unreclaimed file; the volume the store reports
is what the directory holds."""

import contextlib
import os
import queue
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvstore_helpers import put, value_files, value_path
from prophet_rag.cache import store_files
from prophet_rag.cache.store import KVStore
from prophet_rag.config import StoreConfig

WRITERS = 3
ROUNDS = 4

_FORKER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
from kvstore_helpers import make_chunk, meta_for
from prophet_rag.config import StoreConfig
from prophet_rag.cache.store import KVStore
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed writers are reaped by the kernel
meta = meta_for(layers=4, heads=4, head_dim=64)
for line in sys.stdin:  # one writer per line; a fork is much cheaper than a new interpreter importing torch
    if os.fork() == 0:
        os.write(1, f"{{os.getpid()}}\\n".encode())  # one write: concurrent writers' lines never interleave
        torch.set_num_threads(1)
        seed = int(line)
        with KVStore(StoreConfig(directory={store!r}, size_limit_bytes=2**30, max_entry_bytes=2**28)) as store:
            while True:  # until killed; 8 MiB entries, so kills land mid-write
                store.put(*make_chunk(2048, meta, seed), meta)
                seed += 1
"""


def _du(directory: Path) -> int:
    return sum(p.lstat().st_size for p in directory.rglob("*") if p.is_file() and not p.is_symlink())


def test_sigkilled_writers_leave_no_torn_entries_and_their_orphans_are_reclaimed(store_dir, monkeypatch):
    store_dir.mkdir(mode=0o700)
    script = _FORKER.format(tests=str(Path(__file__).parents[1]), store=str(store_dir))
    # Its own process group, so that every writer it forked goes with it whatever happens.
    forker = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in forker.stdout], daemon=True).start()
    rng = random.Random(0)
    killed = []
    try:
        for round_ in range(ROUNDS):
            for writer in range(WRITERS):  # concurrent writers, each killed at its own moment
                forker.stdin.write(f"{1000 * writer + 100 * round_}\n")
            forker.stdin.flush()
            pids = [int(lines.get(timeout=120)) for _ in range(WRITERS)]
            if round_ == 0:
                _wait_for_entries(store_dir)
            for pid in pids:
                time.sleep(rng.uniform(0.05, 0.6))
                assert _parent(pid) == forker.pid, f"{pid} is not one of our writers"
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    finally:
        os.killpg(forker.pid, signal.SIGKILL)
        forker.wait(timeout=60)
    for pid in killed:  # a killed writer's flock goes when its process is gone
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
    monkeypatch.setattr(store_files, "ORPHAN_GRACE_S", 0.0)
    with KVStore(StoreConfig(directory=store_dir, size_limit_bytes=2**30, max_entry_bytes=2**28)) as store:
        reclaimed = store.stats().orphans_reclaimed
        report = store.verify()
        assert report.removed == 0 and report.ok == report.checked == len(store) > 0  # no torn entries
        named = {value_path(store_dir, key).relative_to(store_dir) for key, _ in store._rows()}
        assert {p.relative_to(store_dir) for p in value_files(store_dir)} == named  # no orphan left
        assert store.volume() == _du(store_dir)
    print(f"{len(killed)} kills, {reclaimed} orphans reclaimed, {report.checked} intact entries")


def _wait_for_entries(directory: Path) -> None:
    """Until some entry is committed (bounded), so the kills have entries to tear if they could."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(sqlite3.Error):
            con = sqlite3.connect(directory / "cache.db", timeout=5)
            try:
                if con.execute("SELECT COUNT(*) FROM Cache").fetchone()[0]:
                    return
            finally:
                con.close()
        time.sleep(0.05)
    raise AssertionError("no writer committed an entry within 120 s")


def _parent(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after its closing parenthesis.
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _orphan(store) -> Path:
    """A copy of a value file under a fresh name, no row naming it, old enough to be reclaimed."""
    source = value_files(store.directory)[0]
    target = store.directory / "ff" / "ee" / ("d" * 28 + ".val")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    os.utime(target, (time.time() - 3600, time.time() - 3600))
    return target


@pytest.mark.parametrize("how", ["open", "verify", "clear"])
def test_orphaned_value_files_are_reclaimed(store_dir, how):
    config = StoreConfig(directory=store_dir, size_limit_bytes=2**24, max_entry_bytes=2**20)
    with KVStore(config) as store:
        put(store)
        orphan = _orphan(store)
        assert store.volume() < _du(store_dir)
        if how == "verify":
            assert store.verify().orphans == 1
        elif how == "clear":
            assert store.clear() == 1
    if how == "open":
        with KVStore(config) as store:
            assert store.stats().orphans_reclaimed == 1
    assert not orphan.exists()
    with KVStore(config) as store:
        assert store.volume() == _du(store_dir)


def test_a_file_being_written_is_not_reclaimed(store):
    name, fd = store._files.create()  # a writer that has not committed its row yet
    try:
        os.write(fd, b"partial")
        path = store.directory / name
        os.utime(path, (time.time() - 3600, time.time() - 3600))
        assert store.reclaim_orphans() == 0 and path.exists()  # its flock protects it
    finally:
        os.close(fd)
    assert store.reclaim_orphans() == 1 and not path.exists()


def test_volume_counts_the_database_and_its_journal(store):
    put(store)
    assert store.volume() == _du(store.directory)
    import sqlite3

    writer = sqlite3.connect(store.directory / "cache.db", isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE Cache SET access_count = access_count + 1")  # the rollback journal now exists
        assert (store.directory / "cache.db-journal").exists()
        assert store.volume() == _du(store.directory)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
