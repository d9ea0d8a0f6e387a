"""Answers over a live but slow shared tier: what a request waits when every Redis reply comes late.

    python benchmarks/remote_slow.py                        # replies 0.9 s late, 12 requests
    python benchmarks/remote_slow.py --delay 0.3 --requests 6

A real redis-server (`make install` installs it) holds every chunk the requests need, written by an engine with a
direct connection; a second engine, whose local tiers are empty, answers the requests through a proxy that holds
each command `--delay` seconds before passing it on (under `remote_timeout_s`, so no operation fails), with the
default `remote_request_budget_s`, breaker settings and a 2 s timeout. Every request has documents of its own, so
each of its chunks misses locally and is asked of the server. Tiny random-weight Llama (tests/tiny.py). Prints each
request's wall time, the same requests answered with no shared tier at all (recomputed), and the shared tier's
counters; every answer is compared with the recomputed one.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "cache" / "remote"))

from prophet_rag.config import GenerationConfig, StoreConfig
from prophet_rag.engine import ProphetEngine
from redis_processes import RedisServer, SlowProxy
from tiny import tiny_model, tiny_tokenizer

GEN = GenerationConfig(max_new_tokens=3, eos_token_ids=(10**6,))
KEY_ENV = "PROPHET_RAG_BENCH_REMOTE_KEY"


def _requests(count: int) -> list[tuple[list[str], str]]:
    return [([f"Site {i}-{j}: the turbine hall holds {10 + 7 * i + j} turbines and {j} rotors." for j in range(3)],
             f"How many turbines are at site {i}?") for i in range(count)]


def _engine(directory: Path, url: str | None) -> ProphetEngine:
    remote = {} if url is None else {"remote_url": url, "auth_key_env": KEY_ENV, "remote_timeout_s": 2.0}
    return ProphetEngine(tiny_model("llama"), copy.deepcopy(tiny_tokenizer()),
                         store=StoreConfig(directory=directory, **remote))


def _timed(engine: ProphetEngine, requests) -> tuple[list[float], list[list[int]]]:
    times, tokens = [], []
    for docs, query in requests:
        start = time.perf_counter()
        tokens.append(engine.answer(docs, query, generation=GEN).token_ids)
        times.append(time.perf_counter() - start)
    return times, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=float, default=0.9, help="seconds each command is held by the proxy")
    parser.add_argument("--requests", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ[KEY_ENV] = "ab" * 32
    requests = _requests(args.requests)
    binary = "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else "redis-server"
    with tempfile.TemporaryDirectory(prefix="prophet-remote-slow-") as tmp:
        root = Path(tmp)
        server = RedisServer(binary, root / "redis")
        proxy = SlowProxy(server.port, args.delay)
        try:
            with _engine(root / "writer", server.url) as writer:
                writer.ingest([doc for docs, _ in requests for doc in docs])
            with _engine(root / "recompute", None) as alone:
                recomputed, expected = _timed(alone, requests)
            with _engine(root / "reader", proxy.url) as reader:
                waited, got = _timed(reader, requests)
                stats = reader.cache.stats()["remote"]
        finally:
            proxy.close()
            server.stop()
    print(f"\n{args.requests} requests, each reply {args.delay} s late, remote_timeout_s=2.0, other settings default")
    print("per request (s): " + " ".join(f"{t:.2f}" for t in waited))
    print(f"over the slow server: median {statistics.median(waited):.2f} s, max {max(waited):.2f} s, "
          f"total {sum(waited):.1f} s")
    print(f"recomputed, no shared tier: median {statistics.median(recomputed):.2f} s, max {max(recomputed):.2f} s")
    print(f"answers differing from the recomputed ones: {sum(a != b for a, b in zip(got, expected, strict=True))}")
    print("shared tier: " + ", ".join(f"{name} {getattr(stats, name)}" for name in
                                      ("hits", "misses", "failures", "breaker_skips", "breaker_opens", "skipped")
                                      + tuple(n for n in ("over_budget", "over_budget_skips") if hasattr(stats, n))))


if __name__ == "__main__":
    main()
