"""Plain helpers shared by the store and reliability tests (importable from spawned worker processes too)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import torch

from prophet_rag.cache.codec import EntryMeta
from prophet_rag.cache.keys import chunk_key
from prophet_rag.cache.tier import ChunkRef
from prophet_rag.compute.chunk_kv import ChunkKV

LAYERS, HEADS, HEAD_DIM = 2, 2, 4
SINK = torch.tensor([1, 2, 3])


def meta_for(dtype=torch.float32, storage="lossless", model_fp="a" * 64, tokenizer_fp="b" * 64, layers=LAYERS,
             heads=HEADS, head_dim=HEAD_DIM) -> EntryMeta:
    return EntryMeta(model_fp, tokenizer_fp, dtype, layers, heads, head_dim, storage)


WIDE = meta_for(head_dim=16)
"""Its 80-token entries are 44 KiB: a 4 KiB header, then 80 tokens x 2 layers x 2 heads x 16 x fp32 x (K, V)."""


def make_chunk(num_tokens=5, meta: EntryMeta | None = None, seed=0, sink=SINK) -> tuple[ChunkRef, ChunkKV]:
    """A random chunk of `meta`'s shape computed behind `sink`, and its ref: `kv` [L, 2, num_tokens, H_kv, D]."""
    meta = meta or meta_for()
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(meta.num_layers, 2, num_tokens, meta.num_kv_heads, meta.head_dim, generator=gen)
    token_ids = torch.randint(0, 50_000, (num_tokens,), generator=gen, dtype=torch.int64)
    ref = ref_for(token_ids, meta, sink)
    return ref, ChunkKV(token_ids=token_ids, positions=ref.positions, kv=kv.to(meta.kv_dtype))


def ref_for(token_ids: torch.Tensor, meta: EntryMeta, sink=SINK) -> ChunkRef:
    key = chunk_key(meta.model_fp, meta.tokenizer_fp, meta.kv_spec, token_ids, sink)
    return ChunkRef(key, token_ids, sink)


def file_chunk(seed=0, meta: EntryMeta | None = None) -> tuple[ChunkRef, ChunkKV]:
    """A chunk large enough that its layers span several read pieces when `store_files.PIECE_BYTES` is small."""
    return make_chunk(num_tokens=80, meta=meta, seed=seed)


def put(store, seed=0, meta: EntryMeta | None = None, num_tokens=80) -> tuple[ChunkRef, ChunkKV, EntryMeta]:
    meta = meta or meta_for()
    ref, chunk = make_chunk(num_tokens, meta, seed)
    assert store.put(ref, chunk, meta) is True
    return ref, chunk, meta


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


def sql(directory: Path, statement: str, *args) -> list:
    con = sqlite3.connect(Path(directory) / "cache.db")
    try:
        with con:
            return con.execute(statement, args).fetchall()
    finally:
        con.close()


def update_row(directory: Path, key: str, **columns) -> None:
    assignments = ", ".join(f"{name} = ?" for name in columns)
    sql(directory, f"UPDATE Cache SET {assignments} WHERE key = ?", *columns.values(), key)


def value_path(directory: Path, key: str) -> Path:
    """The value file of `key`'s entry."""
    row = db_row(directory, key)
    assert row is not None and row["filename"], f"{key} has no value file: {row}"
    return Path(directory) / row["filename"]


def value_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("*/*/*.val"))


def rewrite(path: Path, data: bytes) -> None:
    """Replace a value file's bytes, keeping its row's recorded size in step (so only the content is wrong)."""
    path.write_bytes(data)
    directory = path.parents[2]
    sql(directory, "UPDATE Cache SET size = ? WHERE filename = ?", len(data), str(path.relative_to(directory)))


def forged_bytes(header, kv: torch.Tensor, sealer=None, fields: dict | None = None, token_ids=None,
                 sink_ids=None) -> bytes:
    """An entry as an attacker with write access and the project's own codec would build it: `header`'s fields
    (with `fields` overriding them), `kv`'s raw bytes as the layers (any shape or values, unchecked), and every tag
    recomputed with `sealer` (the keyless checksum by default)."""
    import json
    import struct

    from prophet_rag.cache import codec

    sealer = sealer or codec.Sealer(None)
    token_ids = header.token_ids if token_ids is None else torch.as_tensor(token_ids)
    sink_ids = header.sink_ids if sink_ids is None else torch.as_tensor(sink_ids)
    values = {
        "model_fp": header.model_fp, "tokenizer_fp": header.tokenizer_fp, "kv_dtype": str(header.kv_dtype)[6:],
        "storage": header.storage, "num_layers": kv.shape[0], "num_kv_heads": kv.shape[3], "head_dim": kv.shape[4],
        "num_tokens": int(token_ids.numel()), "sink_tokens": int(sink_ids.numel()), **(fields or {}),
    }
    layers = [kv[layer].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() for layer in range(kv.shape[0])]
    text = json.dumps(values).encode()
    ids = token_ids.to(torch.int64).numpy().tobytes() + sink_ids.to(torch.int64).numpy().tobytes()
    tags = b"".join(sealer.tag(layer) for layer in layers)
    size = 20 + len(text) + len(ids) + len(tags) + sealer.tag_size
    head = struct.pack("<4sIIII", codec.MAGIC, 2, size, sealer.kind, len(text)) + text + ids + tags
    head += sealer.tag(head)
    return head + bytes(-len(head) % codec.ALIGN) + b"".join(layers)


def forge(directory: Path, ref: ChunkRef, kv: torch.Tensor, sealer=None, **changes) -> None:
    """Replace `ref`'s (keyless) entry with `forged_bytes` built from its own header."""
    from prophet_rag.cache import codec

    path = value_path(directory, ref.key)
    header = codec.parse_header(path.read_bytes(), codec.Sealer(None))
    rewrite(path, forged_bytes(header, kv, sealer, **changes))


def chunk_refs(engine) -> list[ChunkRef]:
    """The refs of `tiny.CHUNKS`' entries in `engine`'s store, in order."""
    from tiny import CHUNKS, QUERY

    layout = engine.builder.layout(CHUNKS, QUERY)
    return [engine.cache.ref(ids, engine.sink_ids) for ids in layout.chunk_ids]


def answer(engine):
    """`engine`'s answer to `tiny.QUERY` over `tiny.CHUNKS`: 4 greedy tokens, first-token logits kept."""
    from prophet_rag.config import GenerationConfig
    from tiny import CHUNKS, QUERY

    return engine.answer(CHUNKS, QUERY, generation=GenerationConfig(max_new_tokens=4, eos_token_ids=(10**6,)),
                         return_logits=True)
