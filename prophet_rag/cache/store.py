"""Persistent, size-bounded store of chunk KV caches: a diskcache index over one value file per entry.

diskcache is the index (store_db.py: its `Cache` table of key, value file name, size and access time), the atomic
commit (a value file is written completely, then its row is committed, so readers never see a half-written entry) and
the eviction order. Entries are read without it (store_entry.py): `open` looks the row up, opens the file safely
(store_files.py) and checks its header against the request; `StoredEntry.read_layers` reads layers straight into the
request's cache, checking each against its tag (codec.py). `get` is built from the two. `KVStore` serves requests
(reads, writes, counters, its connections and access times); its upkeep (verify, orphans, clear, eviction, index
repair) is its base class `StoreUpkeep` (store_upkeep.py).

Trust boundary. The store never unpickles (`SafeDisk` refuses pickle in both directions and every read goes through
the codec), never follows a symlink, never opens anything but regular files, never reads a file larger than
`max_entry_bytes`, and takes none of its settings from cache.db. SQLite runs with a rollback journal and memory
mapping off, so no file of the store is ever mapped: damaging one while a process runs is an I/O error, never a
SIGBUS. Every entry is checked against the model (layers, KV heads, head dim, dtype), the request (its token ids and
sink ids, hence its positions, hash to the row's key) and for finite values. Without an authentication key, someone
who can write the directory can still plant a well-formed entry holding other finite values under a real key; with
one (`StoreConfig.auth_key_file`/`auth_key_env`) every entry carries a MAC and nothing unauthenticated is used.

Content problems never raise out of `get`/`put`: a damaged entry is deleted and counted, and the engine recomputes
it. `StoreStats` counts every outcome.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import diskcache
import torch

from prophet_rag.cache import codec, store_db, store_files
from prophet_rag.cache.codec import EntryMeta, Sealer
from prophet_rag.cache.keys import chunk_key
from prophet_rag.cache.store_db import DB_ERRORS, Row, Written
from prophet_rag.cache.store_entry import EntryReader, KeepEntry, StoredEntry
from prophet_rag.cache.store_files import ValueFiles
from prophet_rag.cache.store_upkeep import StoreUpkeep
from prophet_rag.cache.tier import ChunkRef, KVTier, refusal_counter
from prophet_rag.compute.chunk_kv import ChunkKV
from prophet_rag.config import StoreConfig
from prophet_rag.errors import (
    CacheCorruptionError,
    IncompatibleCacheError,
    InvalidRequestError,
    StoreError,
)

logger = logging.getLogger(__name__)

_TOUCH_FLUSH_S = 2.0
"""Reads record access times in memory and write them at most this often (and before each eviction), so a hit
never waits for the write lock or a disk sync."""


@dataclass(frozen=True)
class StoreStats:
    """Counters since the store was opened (this process), plus the directory's current size.

    Every `get` counts exactly one of hits, misses, corrupt, incompatible, unauthenticated and timeouts (an `open`
    whose entry is read to the end, or fails, counts the same way; a read racing eviction is a miss). `skipped`
    counts puts that stored nothing (too large, not finite, lock timeout, disk full, a read-only store); those that
    timed out also count in `timeouts`. `repairs` counts damaged indexes (cache.db) rebuilt. `read_only` says
    the store writes nothing (it could not write its directory when it was opened: see `KVStore.read_only`).
    """

    hits: int
    misses: int
    corrupt: int
    incompatible: int
    unauthenticated: int
    evicted: int
    skipped: int
    timeouts: int
    orphans_reclaimed: int
    bytes_read: int
    bytes_written: int
    repairs: int
    entries: int
    volume_bytes: int
    read_only: bool


_COUNTERS = tuple(f.name for f in fields(StoreStats) if f.name not in ("entries", "volume_bytes", "read_only"))


class KVStore(StoreUpkeep):
    """Chunk KV caches on disk, keyed by `keys.chunk_key`, bounded by `StoreConfig.size_limit_bytes`.

    Safe to share between threads, and between processes that open the same directory. A `tier.KVTier`.
    `create=False` opens an existing store only (the CLI's inspection commands must not create folders).
    """

    name = "disk"

    def __init__(self, config: StoreConfig, *, create: bool = True) -> None:
        self.config = config
        self._directory, unwritable = store_files.prepare_directory(Path(config.directory), create)
        self._sealer = Sealer(codec.load_key(config))
        self._local = threading.local()
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        self._repair_lock = threading.Lock()
        self._generation = 0
        """Bumped when cache.db is rebuilt: connections made before then are to the old file."""
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._touches: dict[str, int] = {}
        self._touched_at = time.monotonic()
        self._cache: diskcache.Cache | None = None
        self._write_lock: store_files.WriteLock | None = None
        self.read_only: str | None = None
        """Why this store writes nothing (a full disk, a read-only folder), or None."""
        self._indexed = True
        """False for a read-only store without a readable cache.db: every lookup misses."""
        self._files: ValueFiles | None = ValueFiles(self._directory) if self._directory.is_dir() else None
        self._reader = EntryReader(self._files, self._sealer, config.max_entry_bytes)
        if unwritable is None:
            unwritable = self._open_database()
        if unwritable is not None:
            self._run_read_only(unwritable)
            return
        self.reclaim_orphans()

    def _open_database(self) -> str | None:
        """Open cache.db for writing (rebuilding a damaged one); returns why it cannot be written, or None."""
        try:
            try:
                self._cache = store_db.open_cache(self._directory, self.config)
            except sqlite3.DatabaseError as error:
                if not store_db.damaged(error):
                    raise
                self._rebuild(str(error))
            self._write_lock = store_files.WriteLock(self._files)
        except (OSError, sqlite3.Error, diskcache.Timeout) as error:
            if store_db.cannot_write(error):
                return f"cannot write the KV store database in {self._directory}: {error}"
            raise StoreError(
                f"cannot open the KV store database in {self._directory}: {error}. If another process holds it, "
                "retry; if it is damaged, delete the folder (it only holds caches) or choose another directory."
            ) from None
        return None

    def _run_read_only(self, reason: str) -> None:
        """From now on nothing is written: entries are read if cache.db can be, puts are skipped (counted)."""
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        self.read_only = reason
        self._generation += 1  # connections from now on are read-only ones
        try:
            self._indexed = self._files is not None and store_db.has_index(self._con())
        except sqlite3.Error:  # no cache.db, or one that cannot be read: a store without entries
            self._indexed = False
        logger.warning("%s; the KV store runs read-only: stored chunks are still read, new ones are recomputed "
                       "and not stored (reopen the store once it can be written)", reason)

    @property
    def directory(self) -> Path:
        return self._directory

    # ---- reads -------------------------------------------------------------------------------------------------

    def open(self, ref: ChunkRef, meta: EntryMeta) -> StoredEntry | None:
        """The entry of `ref` with its header checked against `meta` and `ref.key`, held open; None when there is
        none or it is refused (counted; a damaged or inconsistent entry is deleted)."""
        try:
            row = self._row(ref.key)
        except DB_ERRORS as error:
            logger.warning("KV store lookup failed (%s); treating it as a miss", error)
            self._count(timeouts=1)
            return None
        if row is None:
            self._count(misses=1)
            return None
        filename, fd = row.filename, -1
        try:
            filename = row.check()
            fd, header = self._reader.open_file(filename, row.size)
            header.check(meta, ref.key)
            return StoredEntry(self, self._reader, ref.key, filename, fd, header, meta)
        except KeepEntry:
            self._count(incompatible=1)
        except (CacheCorruptionError, IncompatibleCacheError) as error:
            # The key names the model, tokenizer, layout and tokens, so an entry that disagrees is a bad entry,
            # not another user's valid one.
            self.discard(ref.key, error, filename)
        if fd >= 0:
            os.close(fd)
        return None

    def get(self, ref: ChunkRef, meta: EntryMeta, out: torch.Tensor | None = None) -> ChunkKV | None:
        """The chunk `ref` names, checked, or None. With `out` (`[L, 2, T, H_kv, D]` in `meta.kv_dtype`, on the CPU
        or a CUDA device) the KV is read straight into it; without, into a new CPU tensor."""
        entry = self.open(ref, meta)
        if entry is None:
            return None
        with entry:
            kv = out if out is not None else torch.empty(entry.shape, dtype=meta.kv_dtype)
            try:
                entry.read_layers(0, entry.num_layers, kv)
            except CacheCorruptionError:
                return None
            return ChunkKV(entry.token_ids, entry.positions, kv)

    def contains(self, key: str) -> bool:
        """Whether `key` has an entry that names a value file (not read: `get` may still refuse it)."""
        try:
            row = self._row(key)
            return row is not None and row.check() is not None
        except (*DB_ERRORS, CacheCorruptionError):
            return False

    def discard(self, key: str, error: Exception, filename: object = None) -> bool:
        """Count `error` (a CacheCorruptionError or IncompatibleCacheError) against `key` and delete its entry, so
        the recomputed chunk can be stored again; True when it did. With `filename`, only an entry still naming that
        file goes. An entry that no longer does was evicted, deleted or replaced since it was looked up: the failure
        was a read racing that (its file is gone on purpose), counted as a miss, not as damage; False."""
        kind = refusal_counter(error)
        if self.read_only is not None:
            logger.warning("%s KV store entry %s (%s); kept: the store is read-only", kind, key, error)
            self._count(**{kind: 1})
            return True
        try:
            con = self._con()
            with store_db.immediate(con):
                row = con.execute("SELECT rowid, filename FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchone()
                ours = row is not None and (filename is None or row[1] == filename)
                if ours:
                    con.execute("DELETE FROM Cache WHERE rowid = ?", (row[0],))
        except DB_ERRORS as db_error:
            logger.warning("%s KV store entry %s (%s); could not delete it (%s), the next read retries", kind, key,
                           error, db_error)
            self._count(**{kind: 1})
            return True
        if not ours:
            logger.debug("KV store entry %s went while it was read (%s): a miss", key, error)
            self._count(misses=1)
            return False
        logger.warning("dropping %s KV store entry %s: %s", kind, key, error)
        self._count(**{kind: 1})
        if row[1] is not None:
            self._files.remove(row[1])
        return True

    # ---- writes ------------------------------------------------------------------------------------------------

    def put(self, ref: ChunkRef, chunk: ChunkKV, meta: EntryMeta) -> bool:
        """Store `chunk` (computed behind `ref.sink_ids`) under `ref.key` unless an entry is there; True when the key
        now holds one. A broken row in the way is removed first."""
        key = ref.key
        if chunk_key(meta.model_fp, meta.tokenizer_fp, meta.kv_spec, chunk.token_ids, ref.sink_ids) != key:
            raise InvalidRequestError(f"ref.key {key} is not the key of this chunk under this EntryMeta.")
        if self.read_only is not None:
            self._count(skipped=1)  # warned once, when the store was opened
            return False
        try:
            row = self._row(key)
            if row is not None:
                # Content-addressed: an existing entry is this chunk; checking first saves encoding and writing.
                try:
                    row.check()
                    return True
                except CacheCorruptionError as error:
                    self.discard(key, error)
        except DB_ERRORS as error:
            return self._skip("database busy or failing", error, timeouts=1)
        try:
            encoded = codec.encode(chunk, ref.sink_ids, meta, self._sealer)
        except ValueError as error:
            return self._skip("not storable", error)
        if encoded.size > self.config.max_entry_bytes:
            return self._skip(f"{encoded.size} bytes over max_entry_bytes={self.config.max_entry_bytes}", None)
        self._flush_touches(wait=True)  # eviction below goes by access times
        try:
            # One writer at a time makes room for its entry, then writes it: the directory never holds more than
            # the limit because entries were being written at once (each of which fit only on its own).
            with self._write_lock.hold(store_db.SQLITE_TIMEOUT_S):
                return self._write(key, encoded)
        except TimeoutError as error:
            return self._skip("other writers held the store", error, timeouts=1)

    def _write(self, key: str, encoded: codec.Encoded) -> bool:
        """Under the write lock: evict until `encoded` fits, write its value file, commit its row."""
        if self.read_only is not None:  # a failed repair made it read-only while this put waited for the lock
            self._count(skipped=1)
            return False
        if not self._cull(reserve=encoded.size):
            return self._skip(f"no room for {encoded.size} bytes under size_limit_bytes", None)
        try:
            name, fd = self._files.create()
        except OSError as error:
            return self._skip("cannot create the value file", error)
        try:
            self._files.write(fd, [encoded.header, *(b for layer in encoded.layers for b in layer)])
            added = self._cache.add(key, Written(name, encoded.size))
        except DB_ERRORS as error:
            self._files.remove(name)
            self._end_transaction()
            return self._skip("database busy or failing", error, timeouts=1)
        except OSError as error:
            self._files.remove(name)
            return self._skip("cannot write the value file", error)
        finally:
            os.close(fd)  # after the commit: releases the lock that keeps orphan reclamation off the file
        if added:
            self._count(bytes_written=encoded.size)
            self._cull()  # the database itself may have grown
        return True

    def _end_transaction(self) -> None:
        """diskcache leaves its transaction open when COMMIT fails (busy): roll it back, or this thread's
        connection would hold the write lock and refuse every later BEGIN."""
        con = self._cache._con
        if con.in_transaction:
            with contextlib.suppress(*DB_ERRORS):
                con.execute("ROLLBACK")
            self._cache._txn_id = None

    def delete(self, key: str) -> bool:
        """Remove `key`'s entry; True when there was one."""
        if self._cache is None:
            return False
        try:
            return bool(self._cache.delete(key))
        except DB_ERRORS:
            return False

    def stats(self) -> StoreStats:
        with self._lock:
            counts = dict(self._counts)
        return StoreStats(**counts, entries=len(self), volume_bytes=self.volume(),
                          read_only=self.read_only is not None)

    def volume(self) -> int:
        """Bytes on disk: the entries' value files (as their rows record them) plus the database and its journal."""
        try:
            (total,) = self._con().execute("SELECT TOTAL(size) FROM Cache").fetchone()
        except DB_ERRORS:
            total = 0
        db = 0
        for name in store_files.DB_FILES:
            with contextlib.suppress(OSError):
                db += (self._directory / name).lstat().st_size
        return int(total) + db

    def __len__(self) -> int:
        try:
            return int(self._con().execute("SELECT COUNT(*) FROM Cache").fetchone()[0])
        except DB_ERRORS:
            return 0

    def close(self) -> None:
        self._flush_touches(wait=True)
        if self._cache is not None:
            self._cache.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for _, con in connections:
            con.close()
        if self._write_lock is not None:
            self._write_lock.close()
        if self._files is not None:
            self._files.close()

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- internals ---------------------------------------------------------------------------------------------

    def _con(self) -> sqlite3.Connection:
        """This thread's own connection to cache.db (reconnected after a fork or a rebuild; read-only in a
        read-only store). Connections of threads that have ended are closed when a new one is made: a server
        starting a thread per request would pile them up."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.con, local.pid, local.generation = None, os.getpid(), self._generation
        if local.generation != self._generation:
            if local.con is not None:
                local.con.close()  # this thread's own, to the database a repair replaced
            local.con, local.generation = None, self._generation
        if local.con is None:
            local.con = store_db.connect(self._directory, read_only=self.read_only is not None)
            with self._lock:
                ended = [con for thread, con in self._connections if not thread.is_alive()]
                self._connections = [(t, c) for t, c in self._connections if t.is_alive()]
                self._connections.append((threading.current_thread(), local.con))
            for con in ended:
                con.close()
        return local.con

    def _row(self, key: str) -> Row | None:
        """`key`'s row; a damaged index is repaired (`_repair`) and the lookup made again. Nothing in a store that
        has no index (read-only, never written)."""
        if self.read_only is not None and not self._indexed:
            return None
        select = "SELECT filename, size, mode FROM Cache WHERE key = ? AND raw = 1"
        generation = self._generation
        try:
            row = self._con().execute(select, (key,)).fetchone()
        except sqlite3.DatabaseError as error:
            if not store_db.damaged(error) or self.read_only is not None:
                raise
            self._repair(str(error), generation)
            row = self._con().execute(select, (key,)).fetchone()
        return None if row is None else Row(*row)

    def _rows(self) -> Iterator[tuple[str, Row]]:
        """Every row with a str key (a snapshot); rows with pickled keys are not entries and eviction reclaims them."""
        select = "SELECT key, filename, size, mode FROM Cache WHERE raw = 1 ORDER BY rowid"
        rows = self._con().execute(select).fetchall()
        for key, filename, size, mode in rows:
            if isinstance(key, str):
                yield key, Row(filename, size, mode)

    def entry_read(self, key: str, nbytes: int, complete: bool) -> None:
        """An open entry (`StoredEntry`) read `nbytes` more; `complete`: it has now read every layer (a hit)."""
        self._count(bytes_read=nbytes)
        if complete:
            self._hit(key)

    def _hit(self, key: str) -> None:
        self._count(hits=1)
        if self.config.eviction_policy == "least-recently-stored":
            return
        with self._lock:
            self._touches[key] = self._touches.get(key, 0) + 1
        if time.monotonic() - self._touched_at > _TOUCH_FLUSH_S:
            self._flush_touches(wait=False)

    def _flush_touches(self, wait: bool) -> None:
        """Write the recorded reads into the rows' access time (LRU) or count (LFU). Without `wait` a busy
        database leaves them for later instead of stalling the reader."""
        with self._lock:
            touches, self._touches = self._touches, {}
            self._touched_at = time.monotonic()
        if not touches or self.read_only is not None:
            return
        now = time.time()
        if self.config.eviction_policy == "least-recently-used":
            update, args = "UPDATE Cache SET access_time = ? WHERE key = ? AND raw = 1", [(now, k) for k in touches]
        else:
            update, args = ("UPDATE Cache SET access_count = access_count + ? WHERE key = ? AND raw = 1",
                            [(count, key) for key, count in touches.items()])
        con = self._con()
        try:
            if not wait:
                con.execute("PRAGMA busy_timeout = 0")
            with store_db.immediate(con):
                con.executemany(update, args)
        except DB_ERRORS:
            with self._lock:
                for key, count in touches.items():
                    self._touches[key] = self._touches.get(key, 0) + count
        finally:
            con.execute(f"PRAGMA busy_timeout = {int(store_db.SQLITE_TIMEOUT_S * 1000)}")

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    def _check_writable(self, action: str) -> None:
        if self.read_only is not None:
            raise StoreError(f"cannot {action} the KV store: {self.read_only}")

    def _db_failure(self, action: str, error: Exception) -> StoreError:
        return StoreError(
            f"cannot {action} the KV store in {self._directory}: its database failed ({error}). If another process "
            "holds it, retry; if it is damaged, delete the folder (it only holds caches)."
        )

    def _skip(self, reason: str, error: Exception | None, **counts: int) -> bool:
        logger.warning("KV store put skipped: %s%s", reason, f" ({error})" if error else "")
        self._count(skipped=1, **counts)
        return False



def kv_storage(store: StoreConfig | KVTier | None) -> str:
    """The KV storage encoding (`StoreConfig.kv_storage`) of the store an engine is given; "lossless" for the
    default store and for tiers that are not a `KVStore`."""
    config = store if isinstance(store, StoreConfig) else getattr(store, "config", None)
    return config.kv_storage if isinstance(config, StoreConfig) else "lossless"
