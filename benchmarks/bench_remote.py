"""Shared-tier load bandwidth: the Redis tier beside the local disk store, on the same entries in the same run.

    python benchmarks/bench_remote.py                           # SmolLM2-135M shape, a redis-server started here
    python benchmarks/bench_remote.py --llama3-8b --tokens 2048
    python benchmarks/bench_remote.py --url redis://10.0.0.5:6379/0   # a server elsewhere (needs no password)

The entries are stored once in each tier, both keyed (a shared tier requires the MAC), then read back the way the
engine does, into a pre-touched view of a larger stitched cache (`get(ref, meta, out)`). Each repeat measures, in
turn, memcpy (one entry's size, on 1 and all CPUs), the disk store's warm get (files in the page cache) and the
remote tier's get, so the three see the same load; the best of `--repeats` is reported. GB/s count the KV bytes
delivered into the cache. Without `--url` a redis-server is started on a free loopback port and stopped at the end,
so the remote figure is loopback TCP plus the server, the client's parsing, the MAC and the copy: a network adds its
own bandwidth limit on top.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from bench_store import _best, _memcpy_gbs, _refs, apply_preset, shape_arguments

from prophet_rag.cache.codec import EntryMeta
from prophet_rag.cache.remote import RedisTier
from prophet_rag.cache.store import KVStore
from prophet_rag.config import StoreConfig


def _start_server(directory: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (make install installs it); or pass --url.")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(directory)], stdout=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


def run(args, url: str, directory: Path) -> None:
    dtype = getattr(torch, args.dtype)
    meta = EntryMeta("m" * 64, "t" * 64, dtype, args.layers, args.kv_heads, args.head_dim, args.storage)
    entries = _refs(args, meta)
    kv_bytes = entries[0][1].nbytes
    total = kv_bytes * len(entries)
    os.environ["BENCH_REMOTE_KEY"] = "k" * 64
    config = StoreConfig(directory=directory, size_limit_bytes=4 * total + 2**30, max_entry_bytes=2 * kv_bytes + 2**20,
                         kv_storage=args.storage, auth_key_env="BENCH_REMOTE_KEY", remote_url=url,
                         remote_timeout_s=30, remote_request_budget_s=600, remote_namespace=f"bench-{os.getpid()}")
    cache = torch.zeros(args.layers, 2, args.tokens + 64, args.kv_heads, args.head_dim, dtype=dtype)
    out = cache[:, :, 32 : 32 + args.tokens]
    with KVStore(config) as disk:
        remote = RedisTier(config, meta.model_fp)
        puts = {}
        for tier in (disk, remote):
            start = time.perf_counter()
            for ref, chunk in entries:
                assert tier.put(ref, chunk, meta)
            puts[tier.name] = total / (time.perf_counter() - start) / 1e9

        def get_all(tier):
            for ref, _ in entries:
                assert tier.get(ref, meta, out) is not None

        threads = sorted({1, os.cpu_count() or 1})
        best: dict[str, float] = {}
        for _ in range(args.repeats):  # interleaved: every phase sees the same background load
            for n in threads:
                best[f"memcpy x{n}"] = max(best.get(f"memcpy x{n}", 0.0), _memcpy_gbs(kv_bytes, 1, n))
            for tier in (disk, remote):
                best[f"{tier.name} get"] = max(best.get(f"{tier.name} get", 0.0),
                                               total / _best(lambda tier=tier: get_all(tier), 1) / 1e9)
        assert torch.equal(out, entries[-1][1].kv) or args.storage != "lossless"
        for stats in (disk.stats(), remote.stats()):
            assert stats.corrupt == stats.unauthenticated == stats.incompatible == 0, stats
        for ref, _ in entries:
            remote.delete(ref.key, meta.num_layers)
        remote.close()
    memcpy = max(best[f"memcpy x{n}"] for n in threads)
    print(f"\nstorage={args.storage}, MAC (keyed BLAKE3): {len(entries)} entries of {kv_bytes / 2**20:.1f} MiB KV, "
          f"best of {args.repeats} interleaved repeats")
    print(f"  {'phase':<12} {'GB/s':>7} {'x memcpy':>9}")
    rows = [*((f"memcpy x{n}", best[f"memcpy x{n}"]) for n in threads), ("disk put", puts["disk"]),
            ("remote put", puts["remote"]), ("disk get", best["disk get"]), ("remote get", best["remote get"])]
    for name, gbs in rows:
        print(f"  {name:<12} {gbs:7.2f} {gbs / memcpy:8.0%}")
    print(f"  remote get / disk get: {best['remote get'] / best['disk get']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_arguments(parser, entries=4)
    parser.add_argument("--storage", default="lossless", choices=("lossless", "bfloat16", "float8_e4m3"))
    parser.add_argument("--url", default=None, help="an existing server (default: start one on loopback)")
    args = parser.parse_args()
    apply_preset(args)
    torch.set_num_threads(1)  # both read paths copy on one thread (keyed BLAKE3 hashes on all CPUs)
    print(f"shape: {args.layers} layers x {args.kv_heads} KV heads x {args.head_dim} x {args.tokens} tokens, "
          f"{args.dtype}; torch {torch.__version__}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        server, url = (None, args.url) if args.url else _start_server(Path(tmp))
        try:
            run(args, url, Path(tmp) / "kv")
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)


if __name__ == "__main__":
    main()
