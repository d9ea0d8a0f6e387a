"""Where a request's time to first token goes under concurrent clients, in one process (issue 21).

    python benchmarks/trace_batched_ttft.py --clients 1 --requests 6
    python benchmarks/trace_batched_ttft.py --clients 8 --requests 16 --prefill-priority 0

An engine on the embedded model (a temporary store, warmed with the requests' documents) answers bench_serve.py's
requests from `--clients` threads, each sending its next request as its last ends. For each request it prints when
it started, its TTFT, how long its thread waited for the compute lock and for its passes (time in `run_passes`, the
lock waits after them included), and the engine's own phase times; then every batched step: when it started, how
long it took, its decode rows, its prefill passes and their rows. A diagnostic: it wraps the batcher's methods.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import make_requests

from prophet_rag.compute import batcher, lock
from prophet_rag.config import MODEL_DTYPES, BatchConfig, GenerationConfig, StoreConfig
from prophet_rag.engine import ProphetEngine
from prophet_rag.engine.loading import model_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prefill-priority", type=int, default=BatchConfig().prefill_priority)
    parser.add_argument("--dtype", default="auto", choices=("auto", *MODEL_DTYPES),
                        help="the model's dtype (a `serve --workers` worker on bf16: --dtype bfloat16, with "
                             "OMP_NUM_THREADS=1 and --clients 4)")
    args = parser.parse_args()

    engine = ProphetEngine.from_pretrained(
        dtype=model_dtype(args.dtype),
        store=StoreConfig(directory=Path(tempfile.mkdtemp())),
        batch=BatchConfig(max_batch=16, prefill_priority=args.prefill_priority),
        generation=GenerationConfig(max_new_tokens=args.max_tokens))
    bodies = make_requests(max(args.requests, 8), 3, 1.0, 0)
    question = [body["messages"][0]["content"] for body in bodies]
    for i, body in enumerate(bodies[:8]):  # the store warm, as bench_serve's reference pass leaves it
        engine.answer(body["documents"], question[i])

    waits: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    start = [0.0]
    steps: list[tuple[float, float, int, int, int]] = []

    def timed(name, real):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                waits[threading.get_ident()][name] += time.perf_counter() - t
        return wrapper

    lock.ComputeLock._acquire = timed("lock", lock.ComputeLock._acquire)
    batcher.DecodeBatcher.run_passes = timed("passes", batcher.DecodeBatcher.run_passes)
    real_step = batcher.DecodeBatcher._step

    def step(self, batch, passes):
        t = time.perf_counter()
        out = real_step(self, batch, passes)
        items = [item for waiting in passes for item in waiting.items]
        steps.append((t - start[0], time.perf_counter() - t, len(batch), len(items),
                      sum(int(item.rows.numel()) for item in items)))
        return out

    batcher.DecodeBatcher._step = step
    pending, mutex, results = list(range(args.requests)), threading.Lock(), []

    def client() -> None:
        while True:
            with mutex:
                if not pending:
                    return
                i = pending.pop(0)
            me = threading.get_ident()
            waits[me].clear()
            t = time.perf_counter()
            stream = engine.stream(bodies[i]["documents"], question[i])
            deltas = iter(stream)
            next(deltas)
            ttft, waited = time.perf_counter() - t, dict(waits[me])
            for _ in deltas:
                pass
            results.append((i, t - start[0], ttft, waited, stream.answer.stats))

    start[0] = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start[0]
    print(f"{args.clients} clients, {args.requests} requests: {wall:.2f} s, {args.requests / wall:.3f} requests/s")
    for i, began, ttft, waited, stats in sorted(results, key=lambda r: r[1]):
        print(f"request {i:2d} started {began:6.2f} TTFT {ttft:5.2f} lock wait {waited.get('lock', 0):5.2f} "
              f"in run_passes {waited.get('passes', 0):5.2f} | load {stats.load_s:.2f} select {stats.select_s:.2f} "
              f"recompute {stats.recompute_s:.2f}")
    ttfts = sorted(r[2] for r in results)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    print(f"TTFT p50 {statistics.median(ttfts):.2f} p95 {p95:.2f}")
    print("steps: started s, took s, decode rows, passes, pass rows")
    for began, took, rows, passes, pass_rows in steps:
        print(f"  {began:.2f} {took:.3f} {rows} {passes} {pass_rows}")


if __name__ == "__main__":
    main()
