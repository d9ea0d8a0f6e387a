"""Persistent, size-bounded store of chunk KV caches: a diskcache directory of checksummed safetensors values.

Keys are `keys.chunk_key` hex strings and values are `codec.encode` bytes. diskcache writes each large value to
a fresh file and then commits its row, so readers never see a half-written entry; it does not fsync, so a power
loss can leave a committed row over a truncated or zeroed file, which the codec's checksum catches.

Trust boundary: the cache directory is as trusted as your site-packages. diskcache unpickles any row marked as
pickled (CVE-2025-69872); `SafeDisk` refuses pickle in both directions and any value file outside the directory,
so a tampered `cache.db` cannot run code. Someone who can write the directory can still plant well-formed
entries with wrong KV, so the directory is created 0o700 and a world-writable one, or a group-writable one owned
by another user, is refused.

Content problems never raise out of `get`/`put`: a damaged entry is deleted and counted, and the engine
recomputes it. `StoreStats` counts every outcome.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import diskcache
import torch
from diskcache.core import EVICTION_POLICY, MODE_BINARY, MODE_RAW, MODE_TEXT, UNKNOWN

from prophet_rag import codec
from prophet_rag.chunk_kv import ChunkKV

if TYPE_CHECKING:
    from prophet_rag.chunk_cache import ChunkRef
from prophet_rag.codec import EntryMeta
from prophet_rag.config import StoreConfig
from prophet_rag.errors import CacheCorruptionError, IncompatibleCacheError, StoreError

logger = logging.getLogger(__name__)

_SQLITE_TIMEOUT_S = 5.0
"""How long an operation waits for another process's write lock before it is counted as a timeout (diskcache's
default of 60 s would stall a request; a timed-out get is a miss and a timed-out put is skipped)."""

_MIN_FILE_BYTES = 2**15
"""Values from this size up get their own file; smaller ones live in cache.db (diskcache's default, set
explicitly because the directory persists settings)."""

_DB_ERRORS = (diskcache.Timeout, sqlite3.Error)


class SafeDisk(diskcache.Disk):
    """A `diskcache.Disk` that stores only `str` keys and `bytes`/`str` values and never unpickles.

    `fetch` and `remove` act only on files that resolve inside the cache directory, because a row's `filename`
    comes from `cache.db` and could otherwise be absolute or climb out with `..` or a symlink.
    """

    def put(self, key):
        if type(key) is not str:
            raise TypeError(f"KV store keys must be str (keys.chunk_key), got {type(key).__name__}.")
        return super().put(key)

    def get(self, key, raw):
        if not raw:
            raise CacheCorruptionError(
                "cache.db holds a pickled key, which prophet-rag never writes: another program wrote this "
                "directory. Clear it (KVStore.clear()) or delete the folder."
            )
        return super().get(key, raw)

    def store(self, value, read, key=UNKNOWN):
        if read or type(value) not in (bytes, str):
            raise TypeError(f"KV store values must be bytes (codec.encode), got {type(value).__name__}.")
        return super().store(value, read, key=key)

    def fetch(self, mode, filename, value, read):
        if mode == MODE_RAW:
            return super().fetch(mode, filename, value, read)
        if mode not in (MODE_BINARY, MODE_TEXT):
            raise CacheCorruptionError(f"cache.db row has value mode {mode} (pickle or unknown); refused.")
        self._check_inside(filename)
        try:
            return super().fetch(mode, filename, value, read)
        except OSError as error:
            # diskcache would report an unreadable file as a plain miss and keep the row, which then blocks
            # every later `add` of the key; as corruption the row is deleted and the chunk stored again.
            raise CacheCorruptionError(f"value file {filename!r} cannot be read: {error}.") from None

    def remove(self, file_path):
        try:
            self._check_inside(file_path)
        except CacheCorruptionError as error:
            logger.warning("not removing %s", error)
            return
        super().remove(file_path)

    def _check_inside(self, filename) -> None:
        root = os.path.realpath(self._directory)
        if not isinstance(filename, str) or not filename:
            raise CacheCorruptionError(f"cache.db row names value file {filename!r}, expected a relative path.")
        path = os.path.realpath(os.path.join(root, filename))
        if os.path.commonpath([root, path]) != root or path == root:
            raise CacheCorruptionError(f"value file {filename!r} resolves to {path}, outside the cache {root}.")


@dataclass(frozen=True)
class StoreStats:
    """Counters since the store was opened (this process), plus the directory's current size.

    Every `get` counts exactly one of hits, misses, corrupt, incompatible and timeouts. `skipped` counts puts
    that stored nothing (too large, lock timeout, disk full); those that timed out also count in `timeouts`.
    """

    hits: int
    misses: int
    corrupt: int
    incompatible: int
    evicted: int
    skipped: int
    timeouts: int
    bytes_read: int
    bytes_written: int
    entries: int
    volume_bytes: int


@dataclass(frozen=True)
class VerifyReport:
    """`checked` entries: `ok` intact, `removed` damaged and deleted, `other_version` intact but written in
    another format version (kept: another prophet-rag may share the directory; eviction reclaims them)."""

    checked: int
    ok: int
    removed: int
    other_version: int


_COUNTERS = tuple(f.name for f in fields(StoreStats) if f.name not in ("entries", "volume_bytes"))


def _prepare_directory(directory: Path) -> Path:
    """Create `directory` (0o700) or check an existing one is a writable, private folder."""
    hint = "Pass StoreConfig(directory=...) pointing to a writable folder, or set PROPHET_RAG_HOME."
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as error:
        raise StoreError(f"cannot create the KV store directory {directory}: {error.strerror}. {hint}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StoreError(f"the KV store directory {directory} is not writable by this user. {hint}")
    mode = stat.S_IMODE(info.st_mode)
    foreign = info.st_uid != os.geteuid()
    if mode & stat.S_IWOTH or (mode & stat.S_IWGRP and foreign):
        who = "every user" if mode & stat.S_IWOTH else f"group {info.st_gid} and is owned by uid {info.st_uid}"
        raise StoreError(
            f"refusing the KV store directory {directory}: its mode {mode:#o} lets {who} write it, so others "
            f"could plant cache entries. Run `chmod 700 {directory}` or choose another StoreConfig(directory=...)."
        )
    return directory


class KVStore:
    """Chunk KV caches on disk, keyed by `keys.chunk_key`, bounded by `StoreConfig.size_limit_bytes`.

    Safe to share between threads, and between processes that open the same directory. A `chunk_cache.KVTier`.
    """

    name = "disk"

    def __init__(self, config: StoreConfig):
        self._config = config
        self._directory = _prepare_directory(Path(config.directory))
        try:
            # cull_limit=0: diskcache would evict up to 10 rows per write, lazily; `put` culls to the limit instead.
            self._cache = diskcache.Cache(
                str(self._directory),
                timeout=_SQLITE_TIMEOUT_S,
                disk=SafeDisk,
                size_limit=config.size_limit_bytes,
                eviction_policy=config.eviction_policy,
                cull_limit=0,
                statistics=0,
                tag_index=0,
                disk_min_file_size=_MIN_FILE_BYTES,
            )
        except (OSError, sqlite3.Error) as error:
            raise StoreError(
                f"cannot open the KV store database in {self._directory}: {error}. If it is damaged, delete the "
                "folder (it only holds caches), or pass StoreConfig(directory=...) pointing to another folder."
            ) from None
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTERS, 0)

    @property
    def directory(self) -> Path:
        return self._directory

    def get(self, key: str | ChunkRef, meta: EntryMeta, token_ids: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> ChunkKV | None:
        """The chunk stored under `key`, checked against `meta` (and `token_ids`, when given), or None; with `out`,
        its KV is copied there. A `ChunkRef` gives the key and the token ids to check.

        A damaged or incompatible entry is deleted so the recomputed chunk can be stored again.
        """
        if hasattr(key, "key"):
            key, token_ids = key.key, key.token_ids
        try:
            data = self._read(key)
            chunk = None if data is None else codec.decode(data, meta, token_ids)
        except CacheCorruptionError as error:
            self._discard(key, "corrupt", error)
            return None
        except IncompatibleCacheError as error:
            # The key already names model, tokenizer, spec and tokens, so a mismatch is a bad entry, not another
            # user's valid one.
            self._discard(key, "incompatible", error)
            return None
        except _DB_ERRORS as error:
            logger.warning("KV store get timed out (%s); treating it as a miss", error)
            self._count(timeouts=1)
            return None
        if chunk is None:
            self._count(misses=1)
            return None
        self._count(hits=1, bytes_read=len(data))
        if out is not None:
            out.copy_(chunk.kv)
            chunk = ChunkKV(chunk.token_ids, chunk.positions, out)
        return chunk

    def put(self, key: str | ChunkRef, chunk: ChunkKV, meta: EntryMeta) -> bool:
        """Store `chunk` under `key` unless an entry is already there. True when the key now holds an entry."""
        key = getattr(key, "key", key)
        try:
            # Content-addressed: an existing entry is this chunk. Checking first saves encoding and writing
            # a large value file that `add` would throw away.
            if key in self._cache:
                return True
            data = codec.encode(chunk, meta)
            if len(data) > self._config.max_entry_bytes:
                logger.info(
                    "not storing a %d-byte KV entry (max_entry_bytes=%d)", len(data), self._config.max_entry_bytes
                )
                self._count(skipped=1)
                return False
            added = self._cache.add(key, data)
        except _DB_ERRORS as error:
            logger.warning("KV store put skipped: database busy or failing (%s)", error)
            self._count(skipped=1, timeouts=1)
            return False
        except OSError as error:
            logger.warning("KV store put skipped: cannot write the value file (%s)", error)
            self._count(skipped=1)
            return False
        if added:
            self._count(bytes_written=len(data))
            self._cull()
        return True

    def contains(self, key: str) -> bool:
        """Whether `key` has an entry (not checked: `get` may still find it damaged)."""
        try:
            return key in self._cache
        except _DB_ERRORS:
            return False

    def delete(self, key: str) -> bool:
        """Remove `key`'s entry; True when there was one."""
        try:
            return bool(self._cache.delete(key))
        except _DB_ERRORS:
            return False

    def stats(self) -> StoreStats:
        with self._lock:
            counts = dict(self._counts)
        return StoreStats(**counts, entries=len(self), volume_bytes=self.volume())

    def verify(self) -> VerifyReport:
        """Check every entry's checksum, metadata and shapes against its own header; delete damaged ones.

        Reads the whole directory, without touching access times (a scan must not reorder LRU eviction).
        """
        checked = ok = removed = other_version = 0
        for key, fetch in self._scan():
            try:
                data = fetch()
                found = codec.read_meta(data)
                codec.decode(data, EntryMeta(found["model_fp"], found["tokenizer_fp"], found["kv_spec"]))
                ok += 1
            except IncompatibleCacheError:
                other_version += 1
            except CacheCorruptionError as error:
                logger.warning("verify: removing KV store entry %s: %s", key, error)
                removed += self.delete(key)
            checked += 1
        return VerifyReport(checked=checked, ok=ok, removed=removed, other_version=other_version)

    def entries(self) -> Iterator[tuple[str, dict]]:
        """`(key, metadata)` of every intact entry of this format version; metadata is `codec.read_meta`'s
        plus `bytes`. Reads every value (to check it) but not access times; damaged entries are skipped."""
        for key, fetch in self._scan():
            try:
                data = fetch()
                meta = codec.read_meta(data)
            except (CacheCorruptionError, IncompatibleCacheError):
                continue
            yield key, {**meta, "bytes": len(data)}

    def clear(self) -> int:
        """Delete every entry; returns how many there were."""
        return self._cache.clear(retry=True)

    def volume(self) -> int:
        """Bytes on disk: value files plus the database."""
        return self._cache.volume()

    def close(self) -> None:
        self._cache.close()

    def __len__(self) -> int:
        return len(self._cache)

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    def _discard(self, key: str, kind: str, error: Exception) -> None:
        logger.warning("dropping %s KV store entry %s: %s", kind, key, error)
        self.delete(key)
        self._count(**{kind: 1})

    def _cull(self) -> None:
        """Evict entries one at a time, in policy order, until the volume is within the size limit.

        diskcache's `cull()` deletes ten rows per step: with entries of 0.1-1 GiB that discards far more than the
        overflow, often the entry just stored. One short transaction per entry; the file goes after the commit.
        """
        select = EVICTION_POLICY[self._config.eviction_policy]["cull"].format(fields="rowid, filename")
        evicted = 0
        try:
            with self._db() as con:
                while self._cache.volume() > self._config.size_limit_bytes:
                    con.execute("BEGIN IMMEDIATE")
                    row = con.execute(select, (1,)).fetchone()
                    if row is not None:
                        con.execute("DELETE FROM Cache WHERE rowid = ?", (row[0],))
                    con.execute("COMMIT")
                    if row is None:
                        break
                    evicted += 1
                    if row[1] is not None:
                        self._cache.disk.remove(row[1])
        except sqlite3.Error as error:
            logger.warning("KV store eviction stopped early (%s); it resumes after the next put", error)
        self._count(evicted=evicted)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection of our own to diskcache's `Cache(rowid, key, raw, mode, filename, value, ...)` table
        (stable since diskcache 3), for reads that must not update access times and for eviction. Autocommit;
        transactions are explicit. Closing it rolls back an unfinished one."""
        con = sqlite3.connect(self._directory / "cache.db", timeout=_SQLITE_TIMEOUT_S, isolation_level=None)
        try:
            yield con
        finally:
            con.close()

    def _read(self, key: str) -> bytes | None:
        # read=True: diskcache hands back an open file from inside its transaction (under LRU a write lock), so
        # reading a large value happens after the lock is released; the open file survives a concurrent eviction.
        value = self._cache.get(key, read=True)
        if not hasattr(value, "read"):
            return value
        try:
            with value:
                return value.read()
        except OSError as error:
            raise CacheCorruptionError(f"value file of {key} cannot be read: {error}.") from None

    def _scan(self) -> Iterator[tuple[str, Callable[[], bytes]]]:
        """`(key, fetch)` for every row with a str key, read without touching access times; `fetch()` reads the
        value through `SafeDisk` and raises `CacheCorruptionError` for a refused or missing one. Rows with pickled
        keys are skipped: `get` never looks them up and eviction reclaims them."""
        with self._db() as con:
            rows = con.execute("SELECT key, mode, filename, value FROM Cache WHERE raw = 1 ORDER BY rowid")
            for key, mode, filename, value in rows:
                if isinstance(key, str):
                    yield key, functools.partial(self._cache.disk.fetch, mode, filename, value, False)
