"""The disk store's upkeep: checking, repairing and bounding its directory, beside its reads and writes.

`StoreUpkeep` is the half of `KVStore` (store.py) that keeps the directory sound rather than serving requests:
`verify` (every entry checked as a read would, the damaged ones deleted), `reclaim_orphans` (value files no row names,
left by killed writers), `clear`, eviction down to the size limit (`_cull`: one entry per short transaction), and the
repair of a damaged index (`_repair`: SQLite's reindex, else `_rebuild`: a new cache.db indexing every value file
whose header checks). It runs on the store's own state (its connections `_con`, `_rows`, value files `_files`,
entry reader `_reader`, write lock and counters), which `KVStore` sets up; it is never used on its own.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass

import diskcache
import torch
from diskcache.core import EVICTION_POLICY

from prophet_rag.cache import codec, store_db
from prophet_rag.cache.store_db import DB_ERRORS, Written
from prophet_rag.cache.store_entry import KeepEntry
from prophet_rag.cache.store_files import Staging
from prophet_rag.errors import CacheCorruptionError, IncompatibleCacheError

logger = logging.getLogger(__name__)

_CLEAR_WAIT_S = 60.0
"""`clear` deletes rows in short transactions, each waiting its turn at the database; busy turns are retried for this
long in all before it gives up (writers keep the database busy, but never for long)."""
_CLEAR_BATCH = 100
"""Rows `clear` deletes per transaction: each holds the write lock only briefly."""


@dataclass(frozen=True)
class VerifyReport:
    """`checked` entries: `ok` intact, `removed` damaged or inconsistent and deleted; kept without being checked:
    `other_version` (another format version: another prophet-rag may share the directory; eviction reclaims them)
    and `unverifiable` (authenticated with a key this store does not have). `orphans` value files no entry named
    were deleted. `index_repaired`: cache.db failed SQLite's integrity check and was repaired or rebuilt first."""

    checked: int
    ok: int
    removed: int
    other_version: int
    unverifiable: int
    orphans: int
    index_repaired: bool = False


class StoreUpkeep:
    """Verification, orphan reclamation, clearing, eviction and index repair: the base class of `KVStore`."""

    def verify(self) -> VerifyReport:
        """Check every entry as `get` would, against its own row key: header tag, fields, sizes, every layer's tag
        and finiteness; delete the damaged or inconsistent ones, then reclaim orphaned value files. Reads the whole
        directory without touching access times (a scan must not reorder eviction)."""
        self._check_writable("verify")
        counts = dict.fromkeys(("checked", "ok", "removed", "other_version", "unverifiable"), 0)
        staging = Staging(pinned=False)
        try:
            # A damaged page of an index leaves the table scan below intact while every lookup by key fails.
            problem = store_db.integrity(self._directory)
            if problem is not None:
                self._repair(problem, self._generation)
            rows = list(self._rows())
        except DB_ERRORS as error:
            raise self._db_failure("verify", error) from None
        for key, row in rows:
            filename, fd = row.filename, -1
            try:
                filename = row.check()
                fd, header = self._reader.open_file(filename, row.size)
                header.check_key(key)
                layer = torch.empty(header.shape[1:], dtype=header.kv_dtype)
                for index in range(header.num_layers):
                    if not codec.all_finite(self._reader.read_layer(fd, header, index, layer, True, staging)):
                        raise CacheCorruptionError(f"layer {index} holds NaN or infinite values.")
                counts["ok"] += 1
            except KeepEntry:
                counts["unverifiable"] += 1
            except IncompatibleCacheError:
                counts["other_version"] += 1
            except (CacheCorruptionError, OSError) as error:
                if isinstance(error, OSError):
                    error = CacheCorruptionError(f"value file cannot be read: {error.strerror}.")
                if not self.discard(key, error, filename):
                    continue  # evicted or deleted during the scan: neither checked nor damaged
                counts["removed"] += 1
            finally:
                if fd >= 0:
                    os.close(fd)
        counts["checked"] = counts["ok"] + counts["removed"] + counts["other_version"] + counts["unverifiable"]
        return VerifyReport(**counts, orphans=self.reclaim_orphans(), index_repaired=problem is not None)

    def reclaim_orphans(self) -> int:
        """Delete value files that no row names (left by writers killed between writing a file and committing its
        row); returns how many. Files still being written are skipped."""
        if self.read_only is not None:
            return 0
        try:
            named = {name for (name,) in self._con().execute("SELECT filename FROM Cache WHERE filename IS NOT NULL")}

            def referenced(name: str) -> bool:
                if name in named:
                    return True
                return self._con().execute("SELECT 1 FROM Cache WHERE filename = ?", (name,)).fetchone() is not None

            removed = self._files.reclaim(referenced)
        except DB_ERRORS as error:
            logger.warning("orphan reclamation skipped (%s)", error)
            return 0
        self._count(orphans_reclaimed=removed)
        return removed

    def clear(self) -> int:
        """Delete every entry and every orphaned value file; returns how many entries there were. Safe while
        others read and write: rows go in short transactions (their files after each commit), and a transaction
        that finds the database busy is retried for up to `_CLEAR_WAIT_S` seconds in all."""
        self._check_writable("clear")
        removed = 0
        deadline = time.monotonic() + _CLEAR_WAIT_S
        con = self._con()
        select = "SELECT rowid, filename FROM Cache ORDER BY rowid LIMIT ?"
        while True:
            try:
                with store_db.immediate(con):
                    rows = con.execute(select, (_CLEAR_BATCH,)).fetchall()
                    con.executemany("DELETE FROM Cache WHERE rowid = ?", [(rowid,) for rowid, _ in rows])
            except DB_ERRORS as error:
                if time.monotonic() > deadline:
                    raise self._db_failure("clear", error) from None
                continue
            if not rows:
                break
            removed += len(rows)
            for _, filename in rows:
                if filename is not None:
                    self._files.remove(filename)
        self.reclaim_orphans()
        return removed

    def _repair(self, problem: str, generation: int) -> None:
        """cache.db is damaged (`problem`): rebuild its indexes from the table, or when the table is damaged too,
        start a new database and index the value files again. Once, whichever thread finds it first: `generation`
        is the one the caller's failure happened under."""
        with self._repair_lock:
            if self._generation != generation:
                return  # repaired meanwhile
            logger.warning("the KV store index %s is damaged (%s); repairing it", self._directory / "cache.db",
                           problem)
            if store_db.reindex(self._directory):
                self._generation += 1
                self._count(repairs=1)
                return
            assert self._write_lock is not None, "a writable store holds its write lock"
            try:
                with self._write_lock.hold(store_db.SQLITE_TIMEOUT_S):
                    try:
                        self._rebuild(problem)
                    except (OSError, sqlite3.Error, diskcache.Timeout) as error:
                        # Under the write lock: no put is between its check of read_only and its write.
                        self._run_read_only(f"cannot rebuild the KV store index in {self._directory}: {error}")
            except TimeoutError as error:
                logger.warning("KV store index rebuild postponed (%s); the next failing lookup retries", error)

    def _rebuild(self, problem: str) -> None:
        """Replace a damaged cache.db by a new one indexing every value file whose header checks (the key is the
        hash of the header's own fields); the others are orphans, reclaimed. Entries stay checked on every read,
        so an index rebuilt from the files cannot make a read return another chunk."""
        logger.warning("rebuilding the KV store index in %s from its value files (%s)", self._directory, problem)
        if self._cache is not None:
            self._cache.close()
        store_db.remove_database(self._directory)
        self._cache = store_db.open_cache(self._directory, self.config)
        self._generation += 1
        indexed = 0
        for name in list(self._files.names()) if self._files is not None else []:
            try:
                fd, size = self._files.open(name)
                os.close(fd)
                fd, header = self._reader.open_file(name, size)
                os.close(fd)
            except (CacheCorruptionError, IncompatibleCacheError, KeepEntry, OSError):
                continue
            indexed += bool(self._cache.add(header.key(), Written(name, size)))
        logger.warning("KV store index rebuilt: %d entries", indexed)
        self._count(repairs=1)

    def _cull(self, reserve: int = 0) -> bool:
        """Evict entries one at a time, in policy order, until the volume plus `reserve` bytes is within the size
        limit; False when nothing is left to evict and it still is not. A failing database stops eviction early
        (True: the put goes ahead, and eviction resumes after the next one).

        diskcache's `cull()` deletes ten rows per step: with entries of 0.1-1 GiB that discards far more than the
        overflow, often the entry just stored. One short transaction per entry; the file goes after the commit.
        """
        select = EVICTION_POLICY[self.config.eviction_policy]["cull"].format(fields="rowid, filename")
        evicted = 0
        con = self._con()
        fits = False
        try:
            while not (fits := self.volume() + reserve <= self.config.size_limit_bytes):
                with store_db.immediate(con):
                    row = con.execute(select, (1,)).fetchone()
                    if row is not None:
                        con.execute("DELETE FROM Cache WHERE rowid = ?", (row[0],))
                if row is None:
                    break
                evicted += 1
                if row[1] is not None:
                    self._files.remove(row[1])
        except sqlite3.Error as error:
            logger.warning("KV store eviction stopped early (%s); it resumes after the next put", error)
            fits = True
        self._count(evicted=evicted)
        return fits
