"""Plain helpers shared by the store tests (importable from spawned worker processes too)."""

from __future__ import annotations

import hashlib
import sqlite3
import struct
from pathlib import Path

import torch

from prophet_rag.chunk_kv import ChunkKV
from prophet_rag.codec import MAGIC, EntryMeta
from prophet_rag.keys import chunk_key, kv_spec

FILE_TOKENS = 80
"""With `head_dim=16` and fp32 a chunk of this many tokens encodes to ~41 KiB, above diskcache's 32 KiB
threshold, so its value lives in its own file."""


def make_chunk(num_tokens=5, layers=2, heads=2, head_dim=4, dtype=torch.float32, seed=0, start=3) -> ChunkKV:
    """A random chunk: `kv` [layers, 2, num_tokens, heads, head_dim], positions `start..start+num_tokens`."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(layers, 2, num_tokens, heads, head_dim, generator=gen).to(dtype)
    token_ids = torch.randint(0, 50_000, (num_tokens,), generator=gen, dtype=torch.int64)
    positions = torch.arange(start, start + num_tokens, dtype=torch.int64)
    return ChunkKV(token_ids=token_ids, positions=positions, kv=kv)


def file_chunk(seed=0) -> ChunkKV:
    return make_chunk(num_tokens=FILE_TOKENS, head_dim=16, seed=seed)


def meta_for(chunk: ChunkKV, model_fp="a" * 64, tokenizer_fp="b" * 64) -> EntryMeta:
    return EntryMeta(model_fp=model_fp, tokenizer_fp=tokenizer_fp, kv_spec=kv_spec(chunk.kv.dtype))


def key_for(chunk: ChunkKV, meta: EntryMeta) -> str:
    return chunk_key(meta.model_fp, meta.tokenizer_fp, meta.kv_spec, chunk.token_ids, ())


def assert_same_chunk(got: ChunkKV, want: ChunkKV) -> None:
    """Bitwise equality, dtype included (NaN-safe: compares raw bytes)."""
    assert got.kv.dtype == want.kv.dtype and got.kv.shape == want.kv.shape
    assert torch.equal(got.kv.contiguous().view(torch.uint8), want.kv.contiguous().view(torch.uint8))
    assert torch.equal(got.token_ids, want.token_ids)
    assert torch.equal(got.positions, want.positions)


def db_row(directory: Path, key: str) -> dict | None:
    """The diskcache `Cache` row of `key` (raw str key)."""
    con = sqlite3.connect(Path(directory) / "cache.db")
    try:
        con.row_factory = sqlite3.Row
        row = con.execute("SELECT * FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchone()
        return None if row is None else dict(row)
    finally:
        con.close()


def update_row(directory: Path, key: str, **columns) -> None:
    con = sqlite3.connect(Path(directory) / "cache.db")
    try:
        assignments = ", ".join(f"{name} = ?" for name in columns)
        with con:
            con.execute(f"UPDATE Cache SET {assignments} WHERE key = ?", (*columns.values(), key))
    finally:
        con.close()


def value_path(directory: Path, key: str) -> Path:
    """The value file of `key`'s entry."""
    row = db_row(directory, key)
    assert row is not None and row["filename"], f"{key} has no value file: {row}"
    return Path(directory) / row["filename"]


def frame(body: bytes, version: int) -> bytes:
    """A value with a valid checksum around an arbitrary body (codec's frame), to reach checks past the digest."""
    head = struct.pack("<4sIQ", MAGIC, version, len(body)) + body
    return head + hashlib.blake2b(head, digest_size=32).digest()
