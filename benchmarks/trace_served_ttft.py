"""Where a served request's time to first token goes, and which worker answered it, under concurrent clients (issue 21).

    python benchmarks/trace_served_ttft.py                                   # workers@bfloat16, 8 clients, 6 rounds
    python benchmarks/trace_served_ttft.py --server batched --clients 4 --rounds 3

One real server (`bench_serve.py`'s `Server`: `python -m prophet_rag.cli serve`, a temporary store) answers
`bench_serve.py`'s requests once one by one (a warm store), then `--rounds` times from `--clients` client threads,
each sending its next request as its last ends (each client keeps its connection, as SDK clients do). For every
request it prints when it was sent, its TTFT at the client (to the first text delta), the time to the response
headers, the engine's own TTFT and its Stage I (`select_s`) and Stage II (`recompute_s`) parts from the answer's
statistics, its end-to-end time and the worker that answered (`X-Prophet-Worker`, last 3 digits); then the round's
requests/s, TTFT p50/p95 at the client and in the engine, and how the round's first `--clients` requests (the burst)
fell over the workers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="workers@bfloat16", help="a bench_serve.py server, NAME[@DTYPE]")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16, help="requests per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="the workers server's --workers")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--port", type=int, default=18450)
    args = parser.parse_args()
    if bench_serve.base(args.server) not in bench_serve.SERVERS:
        parser.error(f"--server: one of {', '.join(bench_serve.SERVERS)}, optionally @DTYPE")
    options = argparse.Namespace(threads=args.threads, home=None, device="cpu", dtype="auto",
                                 max_tokens=args.max_tokens, max_batch=16, workers=args.workers)
    bodies = bench_serve.make_requests(args.requests, 3, 1.1, 0)
    with tempfile.TemporaryDirectory(prefix="trace-served-") as root:
        server = bench_serve.Server(args.server, bench_serve.SERVERS[bench_serve.base(args.server)](options), options,
                                    Path(root), args.port)
        try:
            server.wait_healthy()
            with httpx.Client() as client:
                for body in bodies:
                    bench_serve.ask(client, server.url, body, args.max_tokens)
            for round_ in range(args.rounds):
                wall, results = bench_serve.run_level(server, bodies, args.clients, args.max_tokens)
                print(f"round {round_}: {len(bodies) / wall:.3f} req/s")
                for i, r in sorted(enumerate(results), key=lambda item: item[1]["sent_s"]):
                    print(f"  req {i:2d} w {(r['worker'] or '-')[-3:]} start {r['sent_s']:.2f} ttft {r['ttft_s']:.3f} "
                          f"hdr {r['headers_s']:.3f} eng {r['engine_ttft_s']:.3f} sel {r['select_s']:.3f} "
                          f"rec {r['recompute_s']:.3f} e2e {r['e2e_s']:.2f}")
                ttft, engine = [r["ttft_s"] for r in results], [r["engine_ttft_s"] for r in results]
                burst = Counter(r["worker"] for r in sorted(results, key=lambda r: r["sent_s"])[: args.clients])
                percentile = bench_serve.percentile
                print(f"  ttft p50 {statistics.median(ttft):.3f} p95 {percentile(ttft, 0.95):.3f}   engine ttft p50 "
                      f"{statistics.median(engine):.3f} p95 {percentile(engine, 0.95):.3f}   burst per worker "
                      f"{'/'.join(map(str, sorted(burst.values())))}", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
