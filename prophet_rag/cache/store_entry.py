"""Reading one stored entry: its value file opened safely (store_files.py), its header checked, then its layers
read straight into the request's cache, each checked against its tag while it is still in the CPU cache (codec.py).

`EntryReader` reads for one store; `StoredEntry` is an entry opened for reading layer by layer, which reports back to
the store it came from (`EntryOwner`): a failed entry is discarded there, and every read is counted.
"""

from __future__ import annotations

import os
import threading
from typing import Protocol

import torch

from prophet_rag.cache import codec, store_files
from prophet_rag.cache.codec import EntryMeta, Header, Sealer
from prophet_rag.cache.store_files import Staging, ValueFiles
from prophet_rag.errors import CacheCorruptionError, InvalidRequestError


class KeepEntry(Exception):
    """An entry this store cannot check (MAC without a key): a miss that leaves it for the stores that can."""


class EntryOwner(Protocol):
    """The store an entry was opened from (`store.KVStore`)."""

    def discard(self, key: str, error: Exception, filename: object = None) -> bool:
        """Count `error` against `key` and delete its entry (if it still names `filename`; else it was evicted
        meanwhile and counts as a miss); True when it was deleted."""

    def entry_read(self, key: str, nbytes: int, complete: bool) -> None:
        """`nbytes` more of `key`'s entry were read and checked; `complete` when that read its last unread layer."""


class EntryReader:
    """Opens a store's value files and reads their layers, checked with the store's `sealer`; reused staging
    buffers are kept per thread."""

    def __init__(self, files: ValueFiles, sealer: Sealer, max_entry_bytes: int) -> None:
        self.files, self.sealer, self.max_entry_bytes = files, sealer, max_entry_bytes
        self._local = threading.local()

    def open_file(self, filename: str, row_size: int) -> tuple[int, Header]:
        """`(fd, header)` of a value file whose size matches its row and its header and whose header tag holds."""
        fd, size = self.files.open(filename)
        try:
            if size > self.max_entry_bytes:
                raise CacheCorruptionError(f"value file is {size} bytes, over max_entry_bytes; not read.")
            if size != row_size:
                raise CacheCorruptionError(f"value file is {size} bytes, its row records {row_size}.")
            prefix = bytearray(min(size, 2**16))
            store_files.read_exact(fd, memoryview(prefix), 0)
            _, header_size, kind = codec.read_frame(prefix)
            if kind == codec.MAC and self.sealer.kind == codec.CHECKSUM:
                raise KeepEntry
            if len(prefix) < header_size <= min(size, codec.MAX_HEADER_BYTES):
                prefix.extend(bytes(header_size - len(prefix)))
                store_files.read_exact(fd, memoryview(prefix)[2**16 :], 2**16)
            header = codec.parse_header(bytes(prefix), self.sealer)
            if size != header.file_size:
                raise CacheCorruptionError(f"value file is {size} bytes, its header announces {header.file_size}.")
            return fd, header
        except BaseException:
            os.close(fd)
            raise

    def staging(self, pinned: bool) -> Staging:
        name = "pinned" if pinned else "staging"
        staging = getattr(self._local, name, None)
        if staging is None:
            staging = Staging(pinned)
            setattr(self._local, name, staging)
        return staging

    def read_layer(self, fd: int, header: Header, layer: int, out: torch.Tensor, finite_check: bool,
                   staging: Staging | None = None) -> list[torch.Tensor]:
        """Read layer `layer` of the entry into `out` `[2, T, H_kv, D]` and check its tag; returns the sums that
        `codec.all_finite` checks (none without `finite_check`), taken while the blocks are still in cache.

        A lossless layer bound for contiguous CPU blocks is read straight into them; anything else goes through a
        reused host buffer (pinned for CUDA, with an asynchronous copy) and `codec.dequantize`.
        """
        offset = header.data_offset + layer * header.layer_bytes
        hasher = self.sealer.hasher()
        direct = (out.device.type == "cpu" and header.storage_dtype == out.dtype
                  and out[0].is_contiguous() and out[1].is_contiguous())
        if direct:
            store_files.read_hashed(fd, [_bytes_view(out[0]), _bytes_view(out[1])], offset, hasher)
        else:
            staging = staging or self.staging(pinned=out.is_cuda)
            slot, buffer = staging.take(header.layer_bytes)
            store_files.read_hashed(fd, [memoryview(buffer.numpy())], offset, hasher)
        self.sealer.verify(hasher.digest(), header.layer_tags[layer], f"layer {layer}")
        if not direct:
            region = buffer.to(out.device, non_blocking=True) if out.is_cuda else buffer
            if out.is_cuda:
                event = torch.cuda.Event()
                event.record()
                staging.done(slot, event)
            codec.dequantize(region, header, out)
        return [*codec.finite_sums(out[0]), *codec.finite_sums(out[1])] if finite_check else []


class StoredEntry:
    """An open entry whose header passed every check: read its layers with `read_layers`, then close it.

    A context manager holding the value file open, so eviction or deletion by another process does not cut a read
    short. `token_ids`, `positions` and `shape` describe the chunk; the tensor bytes are checked layer by layer.
    """

    def __init__(self, owner: EntryOwner, reader: EntryReader, key: str, filename: str, fd: int, header: Header,
                 meta: EntryMeta) -> None:
        self._owner, self._reader, self.key, self._filename, self._fd = owner, reader, key, filename, fd
        self.header, self._meta = header, meta
        self._read: set[int] = set()
        self._failed = False

    @property
    def token_ids(self) -> torch.Tensor:
        return self.header.token_ids

    @property
    def positions(self) -> torch.Tensor:
        return self.header.positions

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """`[L, 2, T, H_kv, D]`."""
        return self.header.shape

    @property
    def num_layers(self) -> int:
        return self.header.num_layers

    def read_layers(self, start: int, stop: int, out: torch.Tensor) -> None:
        """Read layers `[start, stop)` into `out[start:stop]` (`out` is `[L, 2, T, H_kv, D]` in the engine's KV
        dtype, on the CPU or a CUDA device) and verify them: their tags, and without a key their finiteness.

        On failure the entry is deleted and counted, and CacheCorruptionError is raised: `out[start:stop]` then
        holds unchecked bytes that the caller must recompute. On a CUDA `out` the copies are queued on the current
        stream, so work queued after this call sees the layers.
        """
        if tuple(out.shape) != self.shape or out.dtype != self._meta.kv_dtype or out.device.type not in ("cpu", "cuda"):
            raise InvalidRequestError(
                f"out must be {self._meta.kv_dtype} {self.shape} on the CPU or a CUDA device, got {out.dtype} "
                f"{tuple(out.shape)} on {out.device}."
            )
        if not 0 <= start <= stop <= self.num_layers:
            raise InvalidRequestError(f"layers [{start}, {stop}) are outside [0, {self.num_layers}).")
        if self._failed or self._fd < 0:
            raise InvalidRequestError("this entry failed or is closed; open it again.")
        # With a key the MAC proves this store wrote the entry, and `put` refuses non-finite KV.
        finite_check = self._reader.sealer.kind == codec.CHECKSUM
        try:
            sums = []
            for layer in range(start, stop):
                sums += self._reader.read_layer(self._fd, self.header, layer, out[layer], finite_check)
            if not codec.all_finite(sums):
                raise CacheCorruptionError(f"layers [{start}, {stop}) hold NaN or infinite values.")
        except (CacheCorruptionError, OSError) as error:
            self._failed = True
            if isinstance(error, OSError):
                error = CacheCorruptionError(f"value file cannot be read: {error.strerror}.")
            self._owner.discard(self.key, error, self._filename)
            raise error from None
        before = len(self._read)
        self._read.update(range(start, stop))
        complete = len(self._read) == self.num_layers > before
        self._owner.entry_read(self.key, (stop - start) * self.header.layer_bytes, complete)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> StoredEntry:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _bytes_view(block: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    return memoryview(block.view(torch.uint8).reshape(-1).numpy())
