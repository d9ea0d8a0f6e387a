"""Store data path bandwidth: put, warm get and cold get, next to this machine's memcpy bandwidth in the same run.

    python benchmarks/bench_store.py                          # SmolLM2-135M shape (30 layers, 3 KV heads, fp32)
    python benchmarks/bench_store.py --llama3-8b --tokens 4096  # Llama-3-8B shape (32 layers, 8 KV heads, bf16)
    python benchmarks/bench_store.py --storage lossless bfloat16 --key

Each configuration (storage encoding x with/without an authentication key) stores `--entries` chunks, then reads
them back the way the engine does: into a pre-touched `[L, 2, T, H_kv, D]` view of a larger stitched cache
(`KVStore.get(ref, meta, out)`). GB/s count the KV bytes delivered into the cache (the model's dtype), so a compact
encoding reads fewer bytes from the file for the same figure. Phases:

  memcpy xN  torch copy between two touched buffers of one entry's size on N threads, best of `--repeats`; the
             ratios are to the faster of 1 and all CPUs (the bar: >= 50%)
  preadv     os.preadv of each value file's tensor region into the cache, no checks (the I/O floor)
  put        encode, checksum or MAC, write and commit (once, into the empty store)
  get warm   files in the page cache
  get cold   page cache dropped first (fsync, then posix_fadvise(POSIX_FADV_DONTNEED) on every value file)

Best of `--repeats` passes over all entries for each phase; the memcpy figure is re-measured before each
configuration so that its ratio compares numbers taken under the same load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from prophet_rag.cache.codec import EntryMeta
from prophet_rag.cache.keys import chunk_key
from prophet_rag.cache.store import KVStore
from prophet_rag.cache.tier import ChunkRef
from prophet_rag.compute.chunk_kv import ChunkKV
from prophet_rag.config import StoreConfig

SINK = torch.arange(1, 5)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _memcpy_gbs(nbytes: int, repeats: int, threads: int) -> float:
    """Copy bandwidth between two touched buffers of `nbytes`, with `threads` torch threads."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    torch.set_num_threads(threads)
    try:
        return nbytes / _best(lambda: dst.copy_(src), repeats) / 1e9
    finally:
        torch.set_num_threads(1)


def _refs(args, meta: EntryMeta) -> list[tuple[ChunkRef, ChunkKV]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(args.entries):
        ids = torch.randint(0, 50_000, (args.tokens,), generator=gen) + i
        kv = torch.randn(meta.num_layers, 2, args.tokens, meta.num_kv_heads, meta.head_dim, generator=gen)
        ref = ChunkRef(chunk_key(meta.model_fp, meta.tokenizer_fp, meta.kv_spec, ids, SINK), ids, SINK)
        out.append((ref, ChunkKV(ids, ref.positions, kv.to(meta.kv_dtype))))
    return out


def _value_files(store: KVStore) -> list[Path]:
    rows = store._con().execute("SELECT filename FROM Cache WHERE filename IS NOT NULL").fetchall()
    return [store.directory / name for (name,) in rows]


def _drop_page_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(args, storage: str, keyed: bool, directory: Path) -> None:
    dtype = getattr(torch, args.dtype)
    meta = EntryMeta("m" * 64, "t" * 64, dtype, args.layers, args.kv_heads, args.head_dim, storage)
    entries = _refs(args, meta)
    kv_bytes = entries[0][1].nbytes
    total = kv_bytes * len(entries)
    key_env = None
    if keyed:
        os.environ["BENCH_STORE_KEY"] = "k" * 64
        key_env = "BENCH_STORE_KEY"
    config = StoreConfig(directory=directory, size_limit_bytes=4 * total + 2**30, max_entry_bytes=2 * kv_bytes + 2**20,
                         kv_storage=storage, auth_key_env=key_env)
    # The engine's stitched cache: every chunk's slots are a view into one larger, already touched tensor.
    cache = torch.zeros(args.layers, 2, args.tokens + 64, args.kv_heads, args.head_dim, dtype=dtype)
    out = cache[:, :, 32 : 32 + args.tokens]
    # The store reads on one thread; a multi-threaded copy is the higher bar, and the ratios use the higher one.
    copies = {f"memcpy x{n}": _memcpy_gbs(kv_bytes, args.repeats, n) for n in sorted({1, os.cpu_count() or 1})}
    memcpy = max(copies.values())
    rows = list(copies.items())
    with KVStore(config) as store:
        start = time.perf_counter()
        for ref, chunk in entries:
            assert store.put(ref, chunk, meta)
        rows.append(("put", total / (time.perf_counter() - start) / 1e9))
        files = _value_files(store)
        stored = sum(p.stat().st_size for p in files)
        if storage == "lossless":
            rows.append(("preadv", total / _best(lambda: _preadv_all(store, entries, meta, out), args.repeats) / 1e9))

        def get_all():
            for ref, _ in entries:
                assert store.get(ref, meta, out) is not None

        rows.append(("get warm", total / _best(get_all, args.repeats) / 1e9))
        cold = float("inf")
        for _ in range(args.repeats):
            _drop_page_cache(files)
            cold = min(cold, _best(get_all, 1))
        rows.append(("get cold", total / cold / 1e9))
        assert torch.equal(out, entries[-1][1].kv) or storage != "lossless"
        stats = store.stats()
        assert stats.corrupt == stats.unauthenticated == stats.incompatible == 0, stats
    mode = "MAC (keyed BLAKE3)" if keyed else "checksum (XXH3) + finite check"
    print(f"\nstorage={storage}, {mode}: {len(entries)} entries of {kv_bytes / 2**20:.1f} MiB KV "
          f"({stored / len(entries) / 2**20:.1f} MiB stored each)")
    print(f"  {'phase':<10} {'GB/s':>7} {'x memcpy':>9}")
    for name, gbs in rows:
        print(f"  {name:<10} {gbs:7.2f} {gbs / memcpy:8.0%}")


def _preadv_all(store: KVStore, entries, meta: EntryMeta, out: torch.Tensor) -> None:
    """The I/O floor: each entry's tensor region read into the cache's blocks, nothing checked."""
    for ref, _ in entries:
        entry = store.open(ref, meta)
        with entry:
            offset = entry.header.data_offset
            for layer in range(meta.num_layers):
                blocks = [memoryview(out[layer, i].view(torch.uint8).numpy()).cast("B") for i in range(2)]
                os.preadv(entry._fd, blocks, offset)
                offset += entry.header.layer_bytes


def shape_arguments(parser: argparse.ArgumentParser, entries: int) -> None:
    """The entry shape and count options, shared with bench_remote.py (`apply_preset` after parsing)."""
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--llama3-8b", action="store_true", help="32 layers, 8 KV heads, head_dim 128, bf16")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per chunk")
    parser.add_argument("--entries", type=int, default=entries)
    parser.add_argument("--repeats", type=int, default=5)


def apply_preset(args: argparse.Namespace) -> None:
    if args.llama3_8b:
        args.layers, args.kv_heads, args.head_dim, args.dtype = 32, 8, 128, "bfloat16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_arguments(parser, entries=8)
    parser.add_argument("--storage", nargs="+", default=["lossless"],
                        choices=("lossless", "bfloat16", "float8_e4m3"))
    parser.add_argument("--key", action="store_true", help="also measure with an authentication key")
    parser.add_argument("--dir", default=None, help="store folder (default: a temporary folder under /tmp)")
    args = parser.parse_args()
    apply_preset(args)
    torch.set_num_threads(1)  # the store's read path is single-threaded (keyed BLAKE3 hashes on all CPUs)
    print(f"shape: {args.layers} layers x {args.kv_heads} KV heads x {args.head_dim} x {args.tokens} tokens, "
          f"{args.dtype}; torch {torch.__version__}, {os.cpu_count()} CPUs")
    for keyed in (False, True) if args.key else (False,):
        for storage in args.storage:
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                run(args, storage, keyed, Path(tmp) / "kv")


if __name__ == "__main__":
    main()
