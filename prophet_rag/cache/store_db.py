"""The disk store's index: diskcache's `Cache` table in cache.db (key, value file name, size, access time), the
atomic commit (a value file is written completely, then its row is committed) and the eviction order.

Every diskcache setting and SQLite pragma is pinned here, none is read from cache.db, and values never go through
diskcache (`SafeDisk`): `store.KVStore` writes the value files and reads them through the codec.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import diskcache
from diskcache.core import DEFAULT_SETTINGS, METADATA, MODE_BINARY, UNKNOWN

from prophet_rag.cache import store_files
from prophet_rag.cache.store_files import ValueFiles
from prophet_rag.config import StoreConfig
from prophet_rag.errors import CacheCorruptionError

SQLITE_TIMEOUT_S = 5.0
"""How long an operation waits for another process's write lock before it is counted as a timeout (diskcache's
default of 60 s would stall a request; a timed-out get is a miss and a timed-out put is skipped)."""

_PRAGMAS = {"synchronous": 1, "mmap_size": 0, "cache_size": 2**13, "trusted_schema": 0}
"""Applied to every connection, ours and diskcache's. mmap_size=0: a mapped database that another process truncates
kills the reader with SIGBUS. trusted_schema=0: triggers and views in a tampered cache.db cannot call functions."""

_SETTINGS = {
    "statistics": 0, "tag_index": 0, "cull_limit": 0, "sqlite_auto_vacuum": 1, "sqlite_cache_size": 2**13,
    "sqlite_journal_mode": "delete", "sqlite_mmap_size": 0, "sqlite_synchronous": 0, "disk_min_file_size": 0,
    "disk_pickle_protocol": pickle.HIGHEST_PROTOCOL,
}
"""Every diskcache setting, pinned, so none is taken from cache.db's Settings table (diskcache lets the table
override what it is not given). A rollback journal rather than WAL: WAL maps its -shm file, which a truncation turns
into a SIGBUS. cull_limit=0: `KVStore._cull` evicts instead. disk_min_file_size=0: every value is a file.
sqlite_synchronous=0 only holds for diskcache's setup connection, whose ~40 small writes would each wait for a disk
sync; every later connection gets `_PRAGMAS`."""

DB_ERRORS = (diskcache.Timeout, sqlite3.Error)


@contextlib.contextmanager
def immediate(con: sqlite3.Connection):
    """A write transaction on `con`, taken at once (BEGIN IMMEDIATE, so a busy database fails here rather than at
    the first write); committed when the block ends, rolled back when it raises."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(*DB_ERRORS):
            con.execute("ROLLBACK")
        raise

_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
_WRITE_CODES = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN,
                          sqlite3.SQLITE_IOERR, sqlite3.SQLITE_PERM})
_DAMAGE_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def _code(error: BaseException) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF  # extended codes carry the primary one in the low byte


def cannot_write(error: BaseException) -> bool:
    """Whether `error` says the store's files cannot be written: a full disk or quota, a read-only file system or
    folder, a file size limit, an I/O error."""
    if isinstance(error, OSError):
        return error.errno in _WRITE_ERRNOS
    return _code(error) in _WRITE_CODES


def damaged(error: BaseException) -> bool:
    """Whether `error` says cache.db is damaged (a zeroed or overwritten page, not a database at all)."""
    return isinstance(error, sqlite3.DatabaseError) and _code(error) in _DAMAGE_CODES


@dataclass(frozen=True)
class Written:
    """A value file already written by `KVStore.put`, handed to diskcache's `add` to commit its row."""

    name: str
    size: int


class SafeDisk(diskcache.Disk):
    """A `diskcache.Disk` for str keys and value files the store wrote itself; it never pickles or unpickles.

    Values are read by `KVStore` through the codec, never by diskcache, so `fetch` refuses. File names come from
    cache.db rows, so removal goes through `ValueFiles`, which refuses any name outside the store's layout.
    """

    def __init__(self, directory, **kwargs):
        super().__init__(directory, **kwargs)
        self.files = ValueFiles(Path(directory))

    def put(self, key):
        if type(key) is not str:
            raise TypeError(f"KV store keys must be str (keys.chunk_key), got {type(key).__name__}.")
        return super().put(key)

    def get(self, key, raw):
        if not raw:
            raise CacheCorruptionError("cache.db holds a pickled key, which prophet-rag never writes; refused.")
        return super().get(key, raw)

    def store(self, value, read, key=UNKNOWN):
        if read or type(value) is not Written:
            raise TypeError(f"KV store values are written by KVStore.put, got {type(value).__name__}.")
        return value.size, MODE_BINARY, value.name, None

    def fetch(self, mode, filename, value, read):
        raise CacheCorruptionError("KV store values are read with KVStore.open, never through diskcache.")

    def remove(self, file_path):
        self.files.remove(file_path)


def connect(directory: Path, timeout: float | None = None, read_only: bool = False) -> sqlite3.Connection:
    """A connection to cache.db with `_PRAGMAS`; `read_only` opens it so that nothing is ever written (a store on a
    full disk or a read-only folder)."""
    timeout = SQLITE_TIMEOUT_S if timeout is None else timeout
    path = directory / "cache.db"
    target, uri = (f"file:{quote(str(path))}?mode=ro", True) if read_only else (path, False)
    con = sqlite3.connect(target, timeout=timeout, isolation_level=None, check_same_thread=False, uri=uri)
    for name, value in _PRAGMAS.items():
        con.execute(f"PRAGMA {name} = {value}")
    return con


def has_index(con: sqlite3.Connection) -> bool:
    """Whether the database holds diskcache's Cache table (a store never written holds none)."""
    return con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'Cache'").fetchone() is not None


def integrity(directory: Path) -> str | None:
    """None when cache.db passes SQLite's integrity check (every page, and every index against its table), else
    what failed."""
    try:
        con = connect(directory)
        try:
            problems = [row[0] for row in con.execute("PRAGMA integrity_check(5)")]
        finally:
            con.close()
    except sqlite3.DatabaseError as error:
        if not damaged(error):
            raise
        return str(error)
    return None if problems == ["ok"] else "; ".join(problems)


def reindex(directory: Path) -> bool:
    """Rebuild every index of cache.db from its tables; True when the database then passes `integrity`."""
    try:
        con = connect(directory)
        try:
            with immediate(con):
                con.execute("REINDEX")
        finally:
            con.close()
    except sqlite3.DatabaseError as error:
        if not damaged(error):
            raise
        return False
    return integrity(directory) is None


def remove_database(directory: Path) -> None:
    """Delete cache.db and its companions (a damaged index: the value files stay, to be indexed again)."""
    for name in store_files.DB_FILES:
        try:
            os.unlink(directory / name)
        except FileNotFoundError:
            pass


class _PinnedCache(diskcache.Cache):
    """diskcache's `Cache` whose connections get `_PRAGMAS`, not the pragmas named in cache.db's Settings table."""

    @property
    def _con(self):
        if getattr(self._local, "pid", None) != os.getpid():
            self.close()  # a forked child must not share its parent's connection
            self._local.pid = os.getpid()
        con = getattr(self._local, "con", None)
        if con is None:
            # diskcache opens its setup connection with timeout 0 and retries its own statements, but our pragmas
            # run here, outside its retries: they wait like any other statement.
            con = self._local.con = connect(Path(self._directory), self._timeout or SQLITE_TIMEOUT_S)
        return con


def _prepare_database(directory: Path) -> None:
    """Before diskcache opens cache.db: switch it to a rollback journal, drop Settings rows diskcache does not define
    (it would apply them: `disk_*` as Disk arguments, `sqlite_*` as PRAGMAs, others as attributes) and recount the
    metadata rows from the Cache table."""
    known = [*DEFAULT_SETTINGS, *METADATA]
    con = connect(directory)
    try:
        (mode,) = con.execute("PRAGMA journal_mode = delete").fetchone()
        if mode != "delete":
            raise sqlite3.OperationalError(f"journal mode stays {mode!r}: another process holds the database")
        tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "Settings" in tables:
            with immediate(con):
                con.execute(f"DELETE FROM Settings WHERE key NOT IN ({', '.join('?' * len(known))})", known)
                if "Cache" in tables:
                    con.execute("UPDATE Settings SET value = (SELECT COUNT(*) FROM Cache) WHERE key = 'count'")
                    con.execute("UPDATE Settings SET value = (SELECT TOTAL(size) FROM Cache) WHERE key = 'size'")
    finally:
        con.close()


def open_cache(directory: Path, config: StoreConfig) -> diskcache.Cache:
    """diskcache's index over the store `directory`, with every setting pinned (`_SETTINGS`, `config`'s eviction
    policy and size limit) and cache.db prepared first (`_prepare_database`)."""
    store_files.prepare_db_files(directory)
    _prepare_database(directory)
    settings = {**_SETTINGS, "eviction_policy": config.eviction_policy, "size_limit": config.size_limit_bytes}
    assert set(settings) == set(DEFAULT_SETTINGS), "every diskcache setting must be pinned"
    return _PinnedCache(str(directory), timeout=SQLITE_TIMEOUT_S, disk=SafeDisk, **settings)


@dataclass(frozen=True)
class Row:
    filename: object
    size: object
    mode: object

    def check(self) -> str:
        """The value file name of a row the store could have written; a broken row raises CacheCorruptionError."""
        if self.mode != MODE_BINARY or not isinstance(self.filename, str) or type(self.size) is not int:
            raise CacheCorruptionError(
                f"cache.db row is broken (mode {self.mode!r}, file {self.filename!r}, size {self.size!r})."
            )
        return self.filename
