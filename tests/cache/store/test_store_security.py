"""Trust boundary: a tampered cache.db cannot run code or reach files outside the store; unsafe folders are refused."""

import logging
import os
import pickle
import re
import sqlite3
import stat
from pathlib import Path

import diskcache
import pytest

from kvstore_helpers import db_row, make_chunk, meta_for, put, update_row, value_files, value_path
from prophet_rag.cache.store import KVStore
from prophet_rag.cache.store_db import SafeDisk
from prophet_rag.config import StoreConfig
from prophet_rag.errors import CacheCorruptionError, StoreError


class _Touch:
    """Unpickling this creates `path`: the payload a cache.db attacker would plant."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def _payload(tmp_path, name="sentinel") -> tuple[bytes, Path]:
    sentinel = tmp_path / name
    data = pickle.dumps(_Touch(sentinel))
    control = tmp_path / f"{name}-control"
    pickle.loads(pickle.dumps(_Touch(control)))
    assert control.exists(), "the payload must be live for the test to mean anything"
    return data, sentinel


def test_pickle_value_file_is_never_unpickled(store, tmp_path):
    ref, _, meta = put(store)
    data, sentinel = _payload(tmp_path)
    path = value_path(store.directory, ref.key)
    path.write_bytes(data)
    update_row(store.directory, ref.key, mode=diskcache.core.MODE_PICKLE, size=len(data))
    assert store.get(ref, meta) is None
    assert not sentinel.exists()
    assert store.stats().corrupt == 1 and not store.contains(ref.key)


def test_inline_pickle_value_is_never_unpickled(store, tmp_path):
    ref, _, meta = put(store)
    data, sentinel = _payload(tmp_path)
    update_row(store.directory, ref.key, mode=diskcache.core.MODE_PICKLE, filename=None, value=data)
    assert store.get(ref, meta) is None
    assert not sentinel.exists() and store.stats().corrupt == 1


def test_verify_never_unpickles(store, tmp_path):
    ref, _, _ = put(store)
    data, sentinel = _payload(tmp_path)
    update_row(store.directory, ref.key, mode=diskcache.core.MODE_PICKLE, filename=None, value=data)
    report = store.verify()
    assert (report.checked, report.removed) == (1, 1)
    assert not sentinel.exists()


def test_pickled_keys_are_never_unpickled(store, tmp_path):
    put(store)
    data, sentinel = _payload(tmp_path)
    con = sqlite3.connect(store.directory / "cache.db")
    with con:
        con.execute(
            "INSERT INTO Cache (key, raw, store_time, access_time, size, mode, filename, value)"
            " VALUES (?, 0, 0, 0, 0, ?, NULL, ?)",
            (data, diskcache.core.MODE_RAW, b"x"),
        )
    con.close()
    assert store.verify().checked == 1  # the foreign row is not an entry
    with pytest.raises(CacheCorruptionError, match="pickled key"):
        list(diskcache.Cache(str(store.directory), disk=SafeDisk).iterkeys())
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "mode, value", [(diskcache.core.MODE_RAW, 12345), (diskcache.core.MODE_TEXT, "text"), (7, None)]
)
def test_foreign_value_types_and_modes_are_corrupt(store, mode, value):
    ref, _, meta = put(store)
    update_row(store.directory, ref.key, mode=mode, value=value)
    assert store.get(ref, meta) is None
    assert store.stats().corrupt == 1 and not store.contains(ref.key)


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink", "symlinked-folder"])
def test_value_file_outside_the_directory_is_refused_and_kept(store, tmp_path, where):
    ref, _, meta = put(store)
    inside = value_path(store.directory, ref.key)
    outside_dir = tmp_path / "elsewhere"
    outside_dir.mkdir()
    outside = outside_dir / inside.name
    outside.write_bytes(inside.read_bytes())  # a valid entry: only the path checks can refuse it
    if where == "absolute":
        update_row(store.directory, ref.key, filename=str(outside))
    elif where == "dotdot":
        update_row(store.directory, ref.key, filename=os.path.relpath(outside, store.directory))
    elif where == "symlink":
        inside.unlink()
        inside.symlink_to(outside)
    else:
        folder = inside.parent
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
        folder.symlink_to(outside_dir)
    assert store.get(ref, meta) is None
    assert store.stats().corrupt == 1 and not store.contains(ref.key)
    assert outside.read_bytes()[:4] == b"PRKV"  # deleting the row did not delete the file it pointed at


def test_safe_disk_refuses_pickling_keys_and_values(tmp_path):
    disk = SafeDisk(str(tmp_path))
    for value in (12345, 1.5, {"a": 1}, None, b"bytes", "text"):
        with pytest.raises(TypeError, match="written by KVStore.put"):
            disk.store(value, False)
    for key in (b"key", 1, ("a", "b")):
        with pytest.raises(TypeError, match="must be str"):
            disk.put(key)
    assert disk.put("ab" * 32) == ("ab" * 32, True)
    with pytest.raises(CacheCorruptionError, match="never through diskcache"):
        disk.fetch(diskcache.core.MODE_BINARY, "ab/cd/x.val", None, False)


def _config(directory) -> StoreConfig:
    return StoreConfig(directory=directory, size_limit_bytes=2**20, max_entry_bytes=2**19)


def test_directory_under_a_regular_file_is_a_store_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    for directory in (blocker / "sub", blocker):
        with pytest.raises(
            StoreError, match=r"cannot create the KV store directory .*file\.txt.*StoreConfig\(directory="
        ):
            KVStore(_config(directory))


def test_unwritable_directory_runs_read_only_and_says_what_to_do(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # what a non-root user sees on a 0o500 folder
    with caplog.at_level(logging.WARNING, logger="prophet_rag.cache.store"), KVStore(_config(tmp_path / "kv")) as kv:
        assert kv.read_only is not None
    assert re.search(r"kv is not writable by this user\. Pass StoreConfig\(directory=\.\.\.\)", caplog.text)


def test_world_writable_directory_is_refused(tmp_path):
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(StoreError, match=r"mode 0o777 lets every user write it.*chmod 700"):
        KVStore(_config(directory))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand the folder to another uid")
def test_group_writable_directory_of_another_user_is_refused(tmp_path):
    directory = tmp_path / "theirs"
    directory.mkdir()
    directory.chmod(0o770)
    os.chown(directory, 65534, 65534)
    with pytest.raises(StoreError, match="owned by uid 65534"):
        KVStore(_config(directory))


def test_own_group_writable_directory_is_accepted(tmp_path):
    directory = tmp_path / "team"
    directory.mkdir()
    directory.chmod(0o770)
    with KVStore(_config(directory)) as store:
        assert store.directory == directory


def test_readable_existing_directory_is_accepted_with_a_warning_and_files_stay_private(tmp_path, caplog):
    directory = tmp_path / "kv-store"
    directory.mkdir(mode=0o755)  # what `mkdir kv-store` gives under the usual umask
    directory.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="prophet_rag.cache.store_files"), KVStore(_config(directory)) as store:
        put(store)
    assert "mode 0o755" in caplog.text and "chmod 700" in caplog.text
    for path in [directory / "cache.db", *value_files(directory)]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in directory.glob("*/"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


def test_files_of_an_older_store_are_made_private_on_open(store_dir):
    with KVStore(_config(store_dir)) as store:
        ref, chunk, meta = put(store)
    files = [store_dir / "cache.db", *value_files(store_dir)]
    for path in files:
        path.chmod(0o644)
    with KVStore(_config(store_dir)) as store:
        assert store.get(ref, meta) is not None
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in files)


def test_a_damaged_database_is_rebuilt_not_a_store_error(tmp_path):
    directory = tmp_path / "kv"
    directory.mkdir(mode=0o700)
    (directory / "cache.db").write_bytes(b"this is not an sqlite database" * 100)
    with KVStore(_config(directory)) as store:
        assert len(store) == 0 and store.stats().repairs == 1


def test_row_layout_matches_what_the_tests_tamper_with(store):
    ref, _, _ = put(store)
    row = db_row(store.directory, ref.key)
    assert row["mode"] == diskcache.core.MODE_BINARY and row["raw"] == 1
    assert row["size"] == value_path(store.directory, ref.key).stat().st_size


def test_get_of_a_chunk_never_stored_reads_no_file(store, monkeypatch):
    ref, _ = make_chunk(seed=3)
    monkeypatch.setattr(os, "open", lambda *a, **k: pytest.fail("a miss must not open files"))
    assert store.get(ref, meta_for()) is None
