"""Trust boundary: a tampered cache.db cannot run code or reach files outside the store; unsafe folders are refused."""

import os
import pickle
import sqlite3
from pathlib import Path

import diskcache
import pytest

from kvstore_helpers import db_row, file_chunk, key_for, make_chunk, meta_for, update_row, value_path
from prophet_rag.config import StoreConfig
from prophet_rag.errors import CacheCorruptionError, StoreError
from prophet_rag.store import KVStore, SafeDisk


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


def _stored(store, chunk=None):
    chunk = chunk if chunk is not None else file_chunk()
    meta = meta_for(chunk)
    key = key_for(chunk, meta)
    assert store.put(key, chunk, meta)
    return key, meta


def test_pickle_value_file_is_never_unpickled(store, tmp_path):
    key, meta = _stored(store)
    data, sentinel = _payload(tmp_path)
    (store.directory / "evil.val").write_bytes(data)
    update_row(store.directory, key, mode=diskcache.core.MODE_PICKLE, filename="evil.val")

    assert store.get(key, meta) is None
    assert not sentinel.exists()
    assert store.stats().corrupt == 1 and not store.contains(key)


def test_inline_pickle_value_is_never_unpickled(store, tmp_path):
    key, meta = _stored(store, make_chunk())
    data, sentinel = _payload(tmp_path)
    update_row(store.directory, key, mode=diskcache.core.MODE_PICKLE, filename=None, value=data)

    assert store.get(key, meta) is None
    assert not sentinel.exists() and store.stats().corrupt == 1


def test_verify_and_entries_never_unpickle(store, tmp_path):
    key, _ = _stored(store, make_chunk())
    data, sentinel = _payload(tmp_path)
    update_row(store.directory, key, mode=diskcache.core.MODE_PICKLE, value=data)

    assert list(store.entries()) == []
    report = store.verify()
    assert (report.checked, report.removed) == (1, 1)
    assert not sentinel.exists()


def test_pickled_keys_are_never_unpickled(store, tmp_path):
    _stored(store, make_chunk())
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
    assert len(list(store.entries())) == 1
    with pytest.raises(CacheCorruptionError, match="pickled key"):
        list(diskcache.Cache(str(store.directory), disk=SafeDisk).iterkeys())
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "mode, value", [(diskcache.core.MODE_RAW, 12345), (diskcache.core.MODE_RAW, "text"), (7, None)]
)
def test_foreign_value_types_and_modes_are_corrupt(store, mode, value):
    key, meta = _stored(store, make_chunk())
    update_row(store.directory, key, mode=mode, value=value)
    assert store.get(key, meta) is None
    assert store.stats().corrupt == 1 and not store.contains(key)


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_value_file_outside_the_directory_is_refused_and_kept(store, tmp_path, where):
    key, meta = _stored(store)
    inside = value_path(store.directory, key)
    outside = tmp_path / "outside.val"
    outside.write_bytes(inside.read_bytes())  # a valid entry: only the path check can refuse it
    if where == "absolute":
        update_row(store.directory, key, filename=str(outside))
    elif where == "dotdot":
        update_row(store.directory, key, filename=os.path.relpath(outside, store.directory))
    else:
        inside.unlink()
        inside.symlink_to(outside)

    assert store.get(key, meta) is None
    assert store.stats().corrupt == 1 and not store.contains(key)
    assert outside.read_bytes()[:4] == b"PRKV"  # deleting the row did not delete the file it pointed at


def test_safe_disk_refuses_pickling_keys_and_values(tmp_path):
    disk = SafeDisk(str(tmp_path))
    for value in (12345, 1.5, {"a": 1}, None, bytearray(b"x")):
        with pytest.raises(TypeError, match="must be bytes"):
            disk.store(value, False)
    for key in (b"key", 1, ("a", "b")):
        with pytest.raises(TypeError, match="must be str"):
            disk.put(key)
    assert disk.put("ab" * 32) == ("ab" * 32, True)


def test_non_str_key_is_a_programming_error(store):
    chunk = make_chunk()
    with pytest.raises(TypeError, match="must be str"):
        store.put(b"\x00" * 32, chunk, meta_for(chunk))


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


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write a 0o500 folder")
def test_read_only_directory_is_a_store_error(tmp_path):
    directory = tmp_path / "ro"
    directory.mkdir(mode=0o500)
    with pytest.raises(StoreError, match="not writable.*StoreConfig"):
        KVStore(_config(directory))


def test_unwritable_directory_message_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # what a non-root user sees on a 0o500 folder
    with pytest.raises(StoreError, match=r"kv is not writable by this user\. Pass StoreConfig\(directory=\.\.\.\)"):
        KVStore(_config(tmp_path / "kv"))


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


def test_damaged_database_is_a_store_error(tmp_path):
    directory = tmp_path / "kv"
    directory.mkdir(mode=0o700)
    (directory / "cache.db").write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(StoreError, match="cannot open the KV store database.*delete the folder"):
        KVStore(_config(directory))


def test_row_layout_matches_what_the_tests_tamper_with(store):
    key, _ = _stored(store)
    row = db_row(store.directory, key)
    assert row["mode"] == diskcache.core.MODE_BINARY and row["raw"] == 1
