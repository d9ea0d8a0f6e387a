"""Serving throughput and latency: N concurrent clients against `prophet-rag serve`, batched and not, and against
plain Hugging Face `generate` behind the same server code (issue 21).

    python benchmarks/bench_serve.py                                  # embedded SmolLM2-135M, CPU, 2 threads
    python benchmarks/bench_serve.py --levels 1,2,4,8,16 --requests 16 --max-tokens 32 --out bench-results/serve
    python benchmarks/bench_serve.py --device cuda --threads 8
    python benchmarks/bench_serve.py --requests 8 --max-tokens 16 --hf-levels 1,8     # shorter, on a busy machine

Real server processes (three by default; `python -m prophet_rag.cli serve`, uvicorn, each with a temporary store and
`OMP_NUM_THREADS=--threads`), all up at once and loaded one at a time:

- `batched`: the engine with continuous batching (`--max-batch`, default 16: every client's request decoded in one
  forward pass per step, and the prefill passes of requests prefilling together run in those steps too);
- `decode-only`: the same with `--no-batch-prefills`: decode steps batched, each prefill's passes run alone between
  them (the engine before prefill batching; not run unless named in `--servers`);
- `workers`: the batched server as `--workers` (default 2) processes behind the one port, each on an equal share of
  `--threads` (1 each by default: one process per core; not run unless named in `--servers`). Its mean decode batch
  is not shown: /metrics answers for whichever worker took the connection;
- `serial`: the same engine with batching off (`--max-batch 1`: one request at a time, the others queued);
- `hf`: `--backend hf`, plain `model.generate` on the flattened prompt, one request at a time, no reuse.

The requests are RAG requests over the demo's six documents (prophet_rag/data/demo_docs.json): request i asks the
question of a document drawn by Zipf popularity (exponent `--zipf`), with that document and `--docs - 1` others,
also drawn by popularity, as its retrieved documents; greedy, up to `--max-tokens` tokens, streamed. Each server
first answers every request once, one by one (the reference answers; this also fills its store, so the measured
levels run on a warm store, as a server that has seen its corpus does). Then for each concurrency level, the three
servers in turn (their order rotating from level to level) get the first `--requests` requests (at least one per
client) from that many client threads, each client sending its next request as soon as its last one ends;
`--repeats` rounds over the levels, and the table shows each figure's median over the rounds.

Per level and server it prints: requests/s and completion tokens/s (over the level's wall time), TTFT p50/p95
(request sent to the first text delta of the stream), end-to-end p50/p95 (to `[DONE]`), the chunk hit rate the
server reported in its answers (`prophet_rag.cache_hits / (hits + misses)`), the mean decode batch size (from
/metrics: decode rows / decode steps during the level), and how many answers equal the server's reference answer
(greedy, so all of them should). Then the issue's targets, from this run. `--out` writes JSON and markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import httpx

from prophet_rag.config import MODEL_DTYPES

SERVERS = {
    "batched": lambda args: ["--max-batch", str(args.max_batch)],
    "decode-only": lambda args: ["--max-batch", str(args.max_batch), "--no-batch-prefills"],
    "serial": lambda args: ["--max-batch", "1"],
    "workers": lambda args: ["--max-batch", str(args.max_batch), "--workers", str(args.workers)],
    "hf": lambda args: ["--backend", "hf", "--max-batch", "1"],
}


def demo_corpus() -> tuple[list[str], list[str]]:
    data = json.loads(resources.files("prophet_rag.data").joinpath("demo_docs.json").read_text(encoding="utf-8"))
    return data["documents"], [q["question"] for q in data["questions"]]


def make_requests(count: int, docs_per_request: int, zipf: float, seed: int) -> list[dict]:
    """`count` chat bodies: question j with document j (j drawn by Zipf popularity) and other popular documents."""
    documents, questions = demo_corpus()
    rng = random.Random(seed)
    ranking = list(range(len(documents)))
    rng.shuffle(ranking)  # which documents are popular
    weights = [1.0 / (rank + 1) ** zipf for rank in range(len(ranking))]
    bodies = []
    for _ in range(count):
        chosen: list[int] = []
        while len(chosen) < docs_per_request:
            doc = rng.choices(ranking, weights)[0]
            if doc not in chosen:
                chosen.append(doc)
        bodies.append({"messages": [{"role": "user", "content": questions[chosen[0]]}],
                       "documents": [documents[i] for i in chosen]})
    return bodies


class Server:
    def __init__(self, name: str, extra: list[str], args: argparse.Namespace, root: Path, port: int) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        home = root / name
        home.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        if args.home:
            env["PROPHET_RAG_HOME"] = args.home
        dtype = name.partition("@")[2] or args.dtype
        command = [sys.executable, "-m", "prophet_rag.cli", "serve", "--port", str(port), "--store", str(home / "kv"),
                   "--device", args.device, "--dtype", dtype, "--max-new-tokens", str(args.max_tokens),
                   "--log-level", "warning",
                   "--max-queue", "64", "--queue-timeout", "3600", "--request-timeout", "3600", *extra]
        self.log = home / "server.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not healthy after {timeout_s} s")

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def ask(client: httpx.Client, url: str, body: dict, max_tokens: int) -> dict:
    """One streamed request: its text, TTFT (to the first text delta), time to the response headers, end-to-end
    time, tokens, chunk hits, the worker that answered and the engine's own TTFT and its Stage I and II parts."""
    payload = {**body, "model": "bench", "temperature": 0, "max_tokens": max_tokens, "stream": True,
               "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, text, stats, usage = None, [], {}, {}
    with client.stream("POST", f"{url}/v1/chat/completions", json=payload, timeout=600) as response:
        response.raise_for_status()
        worker, headers = response.headers.get("X-Prophet-Worker"), time.perf_counter() - start
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            for choice in event.get("choices") or ():
                delta = choice["delta"].get("content")
                if delta:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text.append(delta)
            stats = event.get("prophet_rag") or stats
            usage = event.get("usage") or usage
    end = time.perf_counter() - start
    return {"text": "".join(text), "ttft_s": ttft if ttft is not None else end, "e2e_s": end,
            "tokens": usage.get("completion_tokens", 0), "hits": stats.get("cache_hits", 0),
            "misses": stats.get("cache_misses", 0), "worker": worker, "headers_s": headers,
            "engine_ttft_s": stats.get("ttft_s", 0.0), "select_s": stats.get("select_s", 0.0),
            "recompute_s": stats.get("recompute_s", 0.0)}


def run_level(server: Server, bodies: list[dict], clients: int, max_tokens: int) -> tuple[float, list[dict]]:
    """`bodies` sent by `clients` threads (`ask`), each sending its next as its last ends; (wall seconds, results in
    the bodies' order, each with `sent_s`: when it was sent)."""
    pending = list(enumerate(bodies))
    results: list[dict | None] = [None] * len(bodies)
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client() as client:
            while True:
                with lock:
                    if not pending:
                        return
                    i, body = pending.pop(0)
                sent = time.perf_counter() - start
                results[i] = {**ask(client, server.url, body, max_tokens), "sent_s": sent}

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(clients)]:
            future.result()
    return time.perf_counter() - start, results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(name: str, clients: int, wall: float, results: list[dict], reference: list[str],
              batch: float | None) -> dict:
    hits, misses = sum(r["hits"] for r in results), sum(r["misses"] for r in results)
    ttft, e2e = [r["ttft_s"] for r in results], [r["e2e_s"] for r in results]
    per_worker = Counter(r["worker"] for r in results if r["worker"] is not None)
    return {"server": name, "clients": clients, "requests": len(results), "wall_s": wall,
            "requests_per_s": len(results) / wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": percentile(ttft, 0.95),
            "e2e_p50_s": statistics.median(e2e), "e2e_p95_s": percentile(e2e, 0.95),
            "hit_rate": hits / (hits + misses) if hits + misses else 0.0, "mean_batch": batch,
            "same_as_serial": sum(r["text"] == ref for r, ref in zip(results, reference, strict=False)),
            "per_worker": sorted(per_worker.values(), reverse=True)}


def medians(rows: list[dict], levels: list[int], names: list[str]) -> list[dict]:
    """One row per (clients, server): each figure's median over the rounds; answers the same in every round."""
    out = []
    for clients in levels:
        for name in names:
            runs = [r for r in rows if r["clients"] == clients and r["server"] == name]
            if not runs:
                continue
            merged = {key: statistics.median(r[key] for r in runs) for key in runs[0]
                      if key not in ("server", "clients", "requests", "round", "mean_batch", "same_as_serial",
                                     "prefills_together", "per_worker")}
            batches = [r["mean_batch"] for r in runs if r["mean_batch"] is not None]
            out.append({"server": name, "clients": clients, "requests": sum(r["requests"] for r in runs),
                        **merged, "mean_batch": statistics.median(batches) if batches else None,
                        "same_as_serial": sum(r["same_as_serial"] for r in runs)})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| clients | server | req/s | tok/s | TTFT p50 s | TTFT p95 s | e2e p50 s | e2e p95 s | hit rate | "
             "mean batch | same as serial |", "| --- " * 11 + "|"]
    for r in rows:
        batch = f"{r['mean_batch']:.2f}" if r["mean_batch"] is not None else ""
        lines.append(f"| {r['clients']} | {r['server']} | {r['requests_per_s']:.3f} | {r['tokens_per_s']:.2f} | "
                     f"{r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} | {r['e2e_p50_s']:.2f} | {r['e2e_p95_s']:.2f} | "
                     f"{r['hit_rate']:.2f} | {batch} | {r['same_as_serial']}/{r['requests']} |")
    return "\n".join(lines)


def base(name: str) -> str:
    """The server kind of a `--servers` entry: "hf@bfloat16" is an hf server on bf16 weights."""
    return name.partition("@")[0]


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets at 8 clients, from this run's rows: each engine server against itself at one client and
    against each hf server (plain `generate`) at one client."""
    def row(server: str, clients: int) -> dict | None:
        return next((r for r in rows if r["server"] == server and r["clients"] == clients), None)

    names = list(dict.fromkeys(r["server"] for r in rows))
    hf_ones = [(name, row(name, 1)) for name in names if base(name) == "hf" and row(name, 1) is not None]
    out = []
    for name in names:
        eight, one = row(name, 8), row(name, 1)
        if base(name) == "hf" or eight is None or one is None:
            continue
        out.append(f"{name}, 8 clients / 1 client (the same requests one by one): "
                   f"{eight['requests_per_s'] / one['requests_per_s']:.2f}x requests/s (target >= 2.5x); TTFT p95 "
                   f"{eight['ttft_p95_s'] / one['ttft_p95_s']:.2f}x (target <= 2x; p95 at 8 / p50 at 1: "
                   f"{eight['ttft_p95_s'] / one['ttft_p50_s']:.2f}x)")
        out += [f"{name}, 8 clients / {hf} generate, 1 client: "
                f"{eight['requests_per_s'] / hf_one['requests_per_s']:.2f}x requests/s (target >= 4x)"
                for hf, hf_one in hf_ones]
    if not out:
        return ["(the targets need levels 1 and 8 of an engine server)"]
    batched, decode_only = row("batched", 8), row("decode-only", 8)
    if batched is not None and decode_only is not None:
        out.append(f"batched / decode-only (prefills not batched) at 8 clients: "
                   f"{batched['requests_per_s'] / decode_only['requests_per_s']:.2f}x requests/s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,2,4,8,16", help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=16, help="requests per level (at least one per client)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--docs", type=int, default=3, help="documents per request")
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the levels; the table shows medians")
    parser.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    parser.add_argument("--hf-levels", default=None,
                        help="the levels the hf server runs (default: all; it answers one request at a time at any)")
    parser.add_argument("--servers", default="batched,serial,hf",
                        help=f"a subset of {','.join(SERVERS)}; NAME@DTYPE loads that server's model in DTYPE "
                             "(hf@float32,batched@bfloat16)")
    parser.add_argument("--dtype", default="auto", choices=("auto", *MODEL_DTYPES),
                        help="every server's model dtype where its name does not say (default auto: fp32 on a CPU)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each server")
    parser.add_argument("--workers", type=int, default=2, help="the workers server's --workers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--home", default=None, help="PROPHET_RAG_HOME for the servers (where the model is)")
    parser.add_argument("--port", type=int, default=18300, help="first port; the servers take consecutive ones")
    parser.add_argument("--out", default=None, help="folder for serve.json and serve.md")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    hf_levels = [int(x) for x in args.hf_levels.split(",")] if args.hf_levels else levels
    names = args.servers.split(",")
    for name in names:
        kind, at, dtype = name.partition("@")
        if kind not in SERVERS or (at and dtype not in ("auto", *MODEL_DTYPES)):
            parser.error(f"--servers: {name!r} is not SERVER or SERVER@DTYPE with SERVER one of {', '.join(SERVERS)}")
    count = max(args.requests, max(levels))
    bodies = make_requests(count, args.docs, args.zipf, args.seed)
    print(f"bench_serve: servers {names}, levels {levels}, {args.requests} requests per level (at least one per "
          f"client; {count} for the serial reference), {args.docs} documents each, "
          f"max_tokens {args.max_tokens}, greedy, OMP_NUM_THREADS={args.threads}, device {args.device}, "
          f"load at start {os.getloadavg()[0]:.1f}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as root:
        servers = [Server(name, SERVERS[base(name)](args), args, Path(root), args.port + i)
                   for i, name in enumerate(names)]
        try:
            for server in servers:
                server.wait_healthy()
            reference = {}
            for server in servers:  # one by one: the reference answers, and a store that has seen the corpus
                with httpx.Client() as client:
                    reference[server.name] = [ask(client, server.url, body, args.max_tokens)["text"]
                                              for body in bodies]
            runs = [(round_, clients) for round_ in range(args.repeats) for clients in levels]
            for turn, (round_, clients) in enumerate(runs):
                order = servers[turn % len(servers):] + servers[: turn % len(servers)]
                for server in order:
                    if base(server.name) == "hf" and clients not in hf_levels:
                        continue
                    names_ = ("decode_steps", "decode_rows", "prefill_passes", "prefill_pass_steps")
                    before = [server.metric(f"prophet_rag_{n}_total") for n in names_]
                    sent = bodies[: max(args.requests, clients)]
                    wall, results = run_level(server, sent, clients, args.max_tokens)
                    steps, rows_, passes, pass_steps = (server.metric(f"prophet_rag_{n}_total") - b
                                                        for n, b in zip(names_, before, strict=True))
                    # A workers server's /metrics is one worker's: its counters say nothing of the level.
                    counted = base(server.name) != "workers"
                    batch = rows_ / steps if steps and counted else None
                    rows.append(summarize(server.name, clients, wall, results, reference[server.name], batch))
                    r = rows[-1]
                    r["round"] = round_
                    r["prefills_together"] = passes / pass_steps if pass_steps and counted else None
                    print(f"round {round_}  {clients:>2} clients  {server.name:<8} {r['requests_per_s']:.3f} req/s  "
                          f"{r['tokens_per_s']:.2f} tok/s  TTFT p50 {r['ttft_p50_s']:.2f} p95 {r['ttft_p95_s']:.2f}  "
                          f"e2e p50 {r['e2e_p50_s']:.2f} p95 {r['e2e_p95_s']:.2f}  hits {r['hit_rate']:.2f}  "
                          f"batch {batch if batch is None else round(batch, 2)}  "
                          f"prefills/step {r['prefills_together'] and round(r['prefills_together'], 2)}  "
                          f"same {r['same_as_serial']}/{r['requests']}"
                          + (f"  per worker {'/'.join(map(str, r['per_worker']))}" if r["per_worker"] else ""),
                          flush=True)
        finally:
            for server in servers:
                server.stop()
    table_rows = medians(rows, levels, names)
    table, checks = markdown(table_rows), targets(table_rows)
    print("\n" + table + "\n\n" + "\n".join(checks) + f"\n\nload at end {os.getloadavg()[0]:.1f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "serve.json").write_text(json.dumps({"args": vars(args), "runs": rows, "medians": table_rows,
                                                    "targets": checks}, indent=1))
        (out / "serve.md").write_text(table + "\n\n" + "\n".join(f"- {c}" for c in checks) + "\n")


if __name__ == "__main__":
    main()
