"""Safe file I/O for the KV store directory: every file the store reads or writes is a private regular file in it.

Value files are named by diskcache's scheme, `ab/cd/<28 hex digits>.val` under the store directory; a name of any
other form (cache.db rows can be tampered with) is refused before a path is built. Every component is opened
relative to the store directory's descriptor with O_NOFOLLOW, so a symlink anywhere in the path is refused, and value
files are opened O_NONBLOCK, so a FIFO or device in place of one can neither block a reader nor be read: it fails the
regular-file check on the open descriptor. New folders are 0700 and new files 0600.

A writer holds an exclusive flock on its value file until the row naming it is committed, so orphan reclamation
(value files no row names, left by a crashed writer) never takes a file that is still being written. Writers take
turns (`WriteLock`, an flock on `write.lock`): each makes room for its entry before writing it, so the directory never
holds more than its size limit because several entries were being written at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from prophet_rag.errors import CacheCorruptionError, StoreError

logger = logging.getLogger(__name__)

VALUE_NAME = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val\Z")
_HEX2 = re.compile(r"[0-9a-f]{2}\Z")
DB_FILES = ("cache.db", "cache.db-journal", "cache.db-wal", "cache.db-shm")
"""SQLite's database and the companions it may create next to it."""
LOCK_FILE = "write.lock"
"""Empty; writers of every process take turns by an flock on it (`WriteLock`)."""
ORPHAN_GRACE_S = 10.0
"""A value file modified this recently may belong to a writer that has not locked it yet; reclamation skips it."""
PIECE_BYTES = 2**20
"""Reads go in pieces of this size, each hashed right after it lands, while it is still in the CPU cache."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "regular file"


_UNWRITABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def prepare_directory(directory: Path, create: bool) -> tuple[Path, str | None]:
    """Create `directory` (0700) or check an existing one, a folder others cannot write; returns it and why this
    user cannot write it (None when it can: the store then runs read-only).

    A folder that other users can read (an existing 0755 one, say) is accepted with a warning: the store's own
    files and folders are private, so others only see how many entries there are. A folder that cannot be created
    for want of space or permission is no store at all: every lookup misses.
    """
    hint = "Pass StoreConfig(directory=...) (or --store) pointing to a writable folder, or set PROPHET_RAG_HOME."
    if not create and not directory.is_dir():
        raise StoreError(f"there is no KV store at {directory}: no such folder. Check the path; {hint}")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as error:
        if error.errno in _UNWRITABLE and not directory.exists():
            return directory, f"cannot create the KV store directory {directory}: {error.strerror}. {hint}"
        raise StoreError(f"cannot create the KV store directory {directory}: {error.strerror}. {hint}") from None
    mode = stat.S_IMODE(info.st_mode)
    foreign = info.st_uid != os.geteuid()
    if mode & stat.S_IWOTH or (mode & stat.S_IWGRP and foreign):
        who = "every user" if mode & stat.S_IWOTH else f"group {info.st_gid} and is owned by uid {info.st_uid}"
        raise StoreError(
            f"refusing the KV store directory {directory}: its mode {mode:#o} lets {who} write it, so others "
            f"could plant cache entries. Run `chmod 700 {directory}` or choose another StoreConfig(directory=...)."
        )
    if mode & 0o055:
        logger.warning(
            "the KV store directory %s has mode %#o: other users can list it (its files stay private, 0600). "
            "Run `chmod 700 %s` to hide it.", directory, mode, directory,
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        return directory, f"the KV store directory {directory} is not writable by this user. {hint}"
    return directory, None


def prepare_db_files(directory: Path) -> None:
    """Refuse a database file that is not a regular file (a FIFO would block SQLite, a symlink redirect it), create
    cache.db 0600 when missing (SQLite gives its journal the database's mode), and make an existing one private."""
    for name in DB_FILES:
        path = directory / name
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode):
            raise StoreError(
                f"{path} is a {_kind(info.st_mode)}, not a regular file; delete it (the store only holds caches)."
            )
        if info.st_mode & 0o077 and info.st_uid == os.geteuid():
            os.chmod(path, 0o600)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(directory / "cache.db", _CREATE_FLAGS, 0o600))


def read_exact(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill `buffer` from `offset` of `fd`; a file that ends early (truncated while open) is corrupt."""
    done = 0
    while done < buffer.nbytes:
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise CacheCorruptionError(f"value file ended at byte {offset + done}, expected {offset + buffer.nbytes}.")
        done += got


def read_hashed(fd: int, buffers: Sequence[memoryview], offset: int, hasher) -> int:
    """Read consecutive regions from `offset` into `buffers`, feeding each piece to `hasher` right after it lands;
    returns the bytes read."""
    for buffer in buffers:
        for start in range(0, buffer.nbytes, PIECE_BYTES):
            piece = buffer[start : start + PIECE_BYTES]
            read_exact(fd, piece, offset + start)
            hasher.update(piece)
        offset += buffer.nbytes
    return offset


class ValueFiles:
    """The value files of one store directory, reached through a descriptor of it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._root = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    def open(self, name: object) -> tuple[int, int]:
        """`(fd, size)` of the regular value file `name`; the caller closes `fd`. Raises CacheCorruptionError for a
        malformed name, a missing file, a symlink or anything but a regular file."""
        parts = self._parts(name)
        try:
            with self._parent(parts, create=False) as parent:
                fd = os.open(parts[-1], _READ_FLAGS, dir_fd=parent)
        except OSError as error:
            raise CacheCorruptionError(f"value file {name!r} cannot be opened: {error.strerror}.") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise CacheCorruptionError(f"value file {name!r} is a {_kind(info.st_mode)}, not a regular file.")
        with contextlib.suppress(OSError):  # readahead hint only
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd, info.st_size

    def create(self) -> tuple[str, int]:
        """`(name, fd)` of a new, empty, exclusively flocked 0600 value file; the caller writes it, commits the row
        naming it, then closes `fd` (which releases the lock)."""
        for attempt in range(10):
            hex_name = secrets.token_hex(16)
            name = f"{hex_name[:2]}/{hex_name[2:4]}/{hex_name[4:]}.val"
            parts = name.split("/")
            try:
                with self._parent(parts, create=True) as parent:
                    fd = os.open(parts[-1], _CREATE_FLAGS, 0o600, dir_fd=parent)
            except FileNotFoundError:
                # Another process removed the emptied folder between our mkdir and open; try again.
                if attempt == 9:
                    raise
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            return name, fd
        raise AssertionError("unreachable")

    @staticmethod
    def write(fd: int, buffers: Sequence[bytes | memoryview]) -> None:
        """Write `buffers` in order, resuming after partial writes."""
        pending = [memoryview(b).cast("B") for b in buffers if len(b)]
        while pending:
            written = os.writev(fd, pending[:1024])
            while written:
                if written >= pending[0].nbytes:
                    written -= pending.pop(0).nbytes
                else:
                    pending[0] = pending[0][written:]
                    written = 0

    def remove(self, name: object) -> bool:
        """Delete the value file `name` and its emptied folders; False when `name` is malformed or already gone."""
        try:
            parts = self._parts(name)
        except CacheCorruptionError as error:
            logger.warning("not removing %s", error)
            return False
        try:
            with self._parent(parts, create=False) as parent:
                os.unlink(parts[-1], dir_fd=parent)
        except OSError:
            return False
        for depth in (2, 1):  # diskcache's layout: ab/cd/name; an emptied ab/cd then ab go too
            with contextlib.suppress(OSError):
                os.rmdir("/".join(parts[:depth]), dir_fd=self._root)
        return True

    def names(self) -> Iterator[str]:
        """The name of every value file in the directory (regular files with a value-file name); those that other
        users can read are made private on the way (stores written before files were created 0600)."""
        for first, mode, _ in self._scan(()):
            if not (_HEX2.match(first) and stat.S_ISDIR(mode)):
                continue
            for second, mode, _ in self._scan((first,)):
                if not (_HEX2.match(second) and stat.S_ISDIR(mode)):
                    continue
                for leaf, mode, uid in self._scan((first, second)):
                    name = f"{first}/{second}/{leaf}"
                    if VALUE_NAME.match(name) and stat.S_ISREG(mode):
                        if mode & 0o077 and uid == os.geteuid():
                            self._make_private(name)
                        yield name

    def reclaim(self, referenced: Callable[[str], bool]) -> int:
        """Delete every value file no row names (`referenced(name)` is False) and no writer holds; returns how many."""
        removed = 0
        for name in list(self.names()):
            if referenced(name):
                continue
            try:
                fd, _ = self.open(name)
            except CacheCorruptionError:
                continue
            try:
                if time.time() - os.fstat(fd).st_mtime < ORPHAN_GRACE_S:
                    continue
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Under the lock no writer can commit this file; a row committed since the scan keeps it.
                if not referenced(name):
                    removed += self.remove(name)
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            finally:
                os.close(fd)
        return removed

    def _parts(self, name: object) -> list[str]:
        if not isinstance(name, str) or not VALUE_NAME.match(name):
            raise CacheCorruptionError(f"cache.db names value file {name!r}, expected the form ab/cd/<28 hex>.val.")
        return name.split("/")

    @contextlib.contextmanager
    def _parent(self, parts: list[str], create: bool) -> Iterator[int]:
        """A descriptor of the folder holding `parts[-1]`, each level opened without following symlinks."""
        fds = []
        try:
            fd = self._root
            for part in parts[:-1]:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o700, dir_fd=fd)
                fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                fds.append(fd)
            yield fd
        finally:
            for fd in fds:
                os.close(fd)

    def _scan(self, parts: tuple[str, ...]) -> list[tuple[str, int, int]]:
        """`(name, st_mode, st_uid)` of each entry of folder `parts` (symlinks not followed); [] if it is gone."""
        try:
            with self._parent([*parts, ""], create=False) as fd, os.scandir(fd) as entries:
                found = [(entry.name, entry.stat(follow_symlinks=False)) for entry in entries]
        except OSError:
            return []
        return [(name, info.st_mode, info.st_uid) for name, info in found]

    def _make_private(self, name: str) -> None:
        with contextlib.suppress(OSError, CacheCorruptionError):
            fd, _ = self.open(name)
            try:
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)


_THREAD_LOCKS: dict[tuple[int, int], threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


class WriteLock:
    """Writers' turns at a store directory: among this process's threads, whichever store instance they write
    through, a lock per directory (so they wait in line rather than poll), and among processes an exclusive flock
    on `LOCK_FILE`. `hold(timeout)` waits at most `timeout` seconds, then raises TimeoutError."""

    def __init__(self, files: ValueFiles) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            self._fd = os.open(LOCK_FILE, flags, 0o600, dir_fd=files._root)
        except OSError as error:
            raise StoreError(f"cannot open {files.directory / LOCK_FILE}: {error.strerror}; delete it if it is not a "
                             "regular file (the store only holds caches).") from None
        if not stat.S_ISREG(os.fstat(self._fd).st_mode):
            os.close(self._fd)
            raise StoreError(f"{files.directory / LOCK_FILE} is not a regular file; delete it (the store only holds "
                             "caches).")
        info = os.fstat(files._root)
        with _THREAD_LOCKS_GUARD:
            self._lock = _THREAD_LOCKS.setdefault((info.st_dev, info.st_ino), threading.Lock())

    @contextlib.contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=timeout):
            raise TimeoutError(f"another writer of this process held the store for {timeout} s")
        try:
            pause = 0.0005
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"another process held the store for {timeout} s") from None
                    time.sleep(pause)
                    pause = min(2 * pause, 0.01)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Staging:
    """Two reusable host buffers for layers that cannot be read straight into their destination (compact storage,
    a CUDA cache): pinned for CUDA, so the host-to-device copy runs asynchronously.

    Buffers alternate; before one is reused, the copy that last read it must be done (`done(event)` records it,
    `take` waits on it), so layer l+1 is read while layer l's copy is in flight. One instance per thread.
    """

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._events: list[object | None] = [None, None]
        self._next = 0

    def take(self, nbytes: int) -> tuple[int, torch.Tensor]:
        """`(slot, buffer)`: a `[nbytes]` uint8 host tensor no pending copy reads."""
        slot, self._next = self._next, 1 - self._next
        event, self._events[slot] = self._events[slot], None
        if event is not None:
            event.synchronize()
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < nbytes:
            # Grown to the next MiB-multiple so small increases do not reallocate (pinning memory is slow).
            size = -(-nbytes // 2**20) * 2**20
            buffer = self._buffers[slot] = torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)
        return slot, buffer[:nbytes]

    def done(self, slot: int, event: object) -> None:
        """Record the event that completes when the copy out of `slot`'s buffer has finished."""
        self._events[slot] = event
