"""Two engine replicas on Ray Serve sharing one redis-server: what one replica computes, the other loads; a replica
killed mid-load costs clients a retryable error at most; Redis killed leaves answers identical.

    .venv/bin/python benchmarks/replicas_check.py                       # the embedded SmolLM2-135M
    .venv/bin/python benchmarks/replicas_check.py --model DIR --docs 6 --clients 3 --rounds 2

Steps, on a local Ray instance with a redis-server on a free loopback port (both started and stopped here):
1. One replica (A) behind the endpoint answers every request once (each request: `--per-request` documents of the
   corpus, a question, greedy): every document is computed by A and written to A's tiers and to Redis. These answers
   are the reference.
2. Deployed again with two replicas (Ray Serve replaces A by a replica of the same rank, which keeps A's disk store,
   and starts B, rank 1, with an empty disk store of its own). The same requests are sent until B has answered each
   one (the `X-Prophet-Replica-Rank` header names the replica): printed are how many of B's answers equal the
   reference, and the documents B served that it had never seen, each of which must be a cache hit (B's own tiers
   were empty: a remote hit), with the misses (must be 0).
3. `--clients` threads send `--rounds` rounds of the requests; while they run, the actor of the rank-0 replica is
   killed once it has answered one (Serve starts a replacement). Steps 2 and 3 use the first half of the requests. Each
   client retries a call that raises a retryable `ServerUnavailableError` (as `ProphetClient(max_retries=...)`
   does); printed are the requests completed, the retryable errors clients saw, any other error (must be 0) and the
   answers that differ from the reference (must be 0).
4. redis-server killed: B answers the other half of the requests, whose documents it has never seen (so it computes
   them, and its writes to the dead server fail): its answers compared with the reference.
5. Every request through `ProphetClient` (what `ChatProphet(base_url=...)` uses), streamed through Ray's proxy.
"""

from __future__ import annotations

import argparse
import atexit
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from prophet_rag.client import ProphetClient
from prophet_rag.config import GenerationConfig, SelectionConfig, StoreConfig
from prophet_rag.errors import ServerError, ServerUnavailableError
from prophet_rag.serve.config import ServeConfig

TOPICS = ["bakery", "harbour", "observatory", "library", "vineyard", "foundry", "orchard", "lighthouse", "mill",
          "archive", "garden", "workshop"]


def corpus(n: int) -> list[str]:
    return [f"Record {i}: the {TOPICS[i % len(TOPICS)]} of district {i} was founded in {1900 + 7 * i} and employs "
            f"{12 + 5 * i} people; its director is named Person{i} and it opens at {6 + i % 5} in the morning."
            for i in range(n)]


def requests_over(docs: list[str], per_request: int) -> list[tuple[list[str], str]]:
    requests = []
    for i in range(0, len(docs), per_request):
        group = docs[i:i + per_request]
        requests.append((group, f"When was the {TOPICS[i % len(TOPICS)]} of district {i} founded?"))
    return requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        sys.exit("redis-server is missing: `make install` installs it (apt-get install redis-server).")
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("redis-server did not start")


class Endpoint:
    """Requests to the Ray Serve endpoint, with the replica that answered each."""

    def __init__(self, url: str, max_tokens: int) -> None:
        self.url = f"{url}/v1/chat/completions"
        self.max_tokens = max_tokens
        self.http = httpx.Client(timeout=600)

    def ask(self, docs: list[str], question: str) -> tuple[str, dict, str, str]:
        """(answer, statistics, replica id, replica rank); raises `ServerError` subclasses as `ProphetClient` maps
        them."""
        body = {"model": "x", "messages": [{"role": "user", "content": question}], "documents": docs,
                "max_tokens": self.max_tokens, "temperature": 0}
        try:
            response = self.http.post(self.url, json=body)
        except httpx.TransportError as error:
            raise ServerUnavailableError(f"connection: {type(error).__name__}") from None
        if response.status_code != 200:
            is_ours = response.headers.get("content-type", "").startswith("application/json") and "error" in (
                response.json())
            error = ServerError if is_ours and response.status_code not in (503, 429) else ServerUnavailableError
            raise error(f"{response.status_code}: {response.text[:200]}", response.status_code)
        reply = response.json()
        return (reply["choices"][0]["message"]["content"], reply["prophet_rag"], response.headers["x-prophet-replica"],
                response.headers["x-prophet-replica-rank"])


def wait_replicas(serve, count: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get("prophet-rag")
        if status is not None and status.status == "RUNNING":
            deployment = next(iter(status.deployments.values()))
            if deployment.replica_states.get("RUNNING", 0) == count:
                return
        time.sleep(0.5)
    sys.exit(f"{count} replicas were not running after {timeout_s} s")


def ask_b(endpoint: Endpoint, docs: list[str], question: str) -> tuple[str, dict, int]:
    """Ask until replica B (rank 1 on this node) answers: (answer, statistics, requests sent)."""
    for tries in range(1, 31):
        text, stats, _, rank = endpoint.ask(docs, question)
        if rank == "0.1":
            return text, stats, tries
    sys.exit("the router never sent this request to replica B in 30 tries")


def kill_replica(ray, replica_id: str) -> None:
    """SIGKILL-like: Ray kills the replica's actor process (Serve then starts a replacement)."""
    name = f"SERVE_REPLICA::prophet-rag#prophet-rag#{replica_id}"  # Serve's actor name: app#deployment#replica
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--per-request", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from prophet_rag.serve import replicas

    work = Path(tempfile.mkdtemp(prefix="replicas-check-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # on every exit, sys.exit included
    key = work / "store.key"
    key.write_text(secrets.token_hex(32))
    key.chmod(0o600)
    redis, redis_url = start_redis(work / "redis")
    store = StoreConfig(directory=work / "kv", auth_key_file=key, remote_url=redis_url, remote_timeout_s=0.5)
    spec = replicas.ReplicaSpec(args.model, "cpu", store, SelectionConfig(), GenerationConfig(max_new_tokens=16),
                                ServeConfig(max_in_flight=1, max_queue=16, queue_timeout_s=300), threads=1)
    port = free_port()
    requests = requests_over(corpus(args.docs), args.per_request)
    shared, held = requests[:(len(requests) + 1) // 2], requests[(len(requests) + 1) // 2:]
    print(f"model {args.model or 'embedded SmolLM2-135M'}, {args.docs} documents in {len(requests)} requests of "
          f"{args.per_request}, {args.max_tokens} new tokens, greedy; {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    try:
        ray.init(num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False, log_to_driver=False)
        endpoint = Endpoint(f"http://127.0.0.1:{port}", args.max_tokens)

        # 1. one replica computes every document
        began = time.perf_counter()
        replicas.start(spec, replicas.Scaling(1), host="127.0.0.1", port=port, address=None)
        print(f"[1] replica A up in {time.perf_counter() - began:.1f} s", flush=True)
        reference = []
        began = time.perf_counter()
        for docs, question in requests:
            text, stats, _, rank = endpoint.ask(docs, question)
            reference.append(text)
            assert rank == "0.0" and stats["cache_misses"] == len(docs), (rank, stats)
        print(f"[1] A answered {len(requests)} requests in {time.perf_counter() - began:.1f} s, computing all "
              f"{args.docs} documents (misses {args.docs})", flush=True)

        # 2. two replicas: B (rank 1) starts with empty tiers of its own; Serve replaces A by a rank-0 replica that
        # keeps A's disk store.
        began = time.perf_counter()
        serve.run(replicas.application(spec, replicas.Scaling(2)), name=replicas.APP_NAME, route_prefix="/")
        wait_replicas(serve, 2)
        print(f"[2] two replicas up in {time.perf_counter() - began:.1f} s", flush=True)
        seen_by_b: set[str] = set()
        new_hits = misses = same = tries = 0
        for (docs, question), expected in zip(shared, reference[:len(shared)], strict=True):
            text, stats, tried = ask_b(endpoint, docs, question)
            tries += tried
            new = [d for d in docs if d not in seen_by_b]
            seen_by_b.update(docs)
            misses += stats["cache_misses"]
            new_hits += len(new) if stats["cache_misses"] == 0 else 0
            same += text == expected
        print(f"[2] B answered {len(shared)} requests ({tries} sent in all): {new_hits}/{len(seen_by_b)} documents it "
              f"had never seen were cache hits, i.e. remote hits; misses {misses}; answers equal to A's "
              f"{same}/{len(shared)}", flush=True)

        # 3. kill A under load
        outcome = {"done": 0, "retryable": 0, "other": 0, "different": 0}
        lock = threading.Lock()
        victims: list[str] = []

        def client() -> None:
            mine = Endpoint(f"http://127.0.0.1:{port}", args.max_tokens)
            for _ in range(args.rounds):
                for j, (docs, question) in enumerate(shared):
                    while True:
                        try:
                            text, _, replica, rank = mine.ask(docs, question)
                        except ServerUnavailableError:
                            with lock:
                                outcome["retryable"] += 1
                            time.sleep(0.5)
                            continue
                        except ServerError:
                            with lock:
                                outcome["other"] += 1
                            break
                        with lock:
                            if rank == "0.0":  # the rank-0 replica: B (rank 1) stays for step 4
                                victims.append(replica)
                            outcome["done"] += 1
                            outcome["different"] += text != reference[j]
                        break

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        while not victims and any(thread.is_alive() for thread in threads):
            time.sleep(0.05)
        if not victims:
            sys.exit("the rank-0 replica answered none of the requests of step 3")
        time.sleep(0.5)  # let the replica take new requests too
        kill_replica(ray, victims[0])
        killed_at = time.perf_counter() - began
        for thread in threads:
            thread.join()
        total = args.clients * args.rounds * len(shared)
        print(f"[3] {args.clients} clients x {args.rounds} rounds = {total} requests; a replica killed at "
              f"{killed_at:.1f} s; "
              f"completed {outcome['done']}/{total} in {time.perf_counter() - began:.1f} s; retryable errors seen "
              f"{outcome['retryable']}; other errors {outcome['other']}; answers differing from the reference "
              f"{outcome['different']}", flush=True)

        # 4. kill Redis
        redis.kill()
        redis.wait()
        wait_replicas(serve, 2)  # Serve has replaced the killed replica by now
        same = misses = 0
        began = time.perf_counter()
        for (docs, question), expected in zip(held, reference[len(shared):], strict=True):
            text, stats, _ = ask_b(endpoint, docs, question)
            same += text == expected
            misses += stats["cache_misses"]
        print(f"[4] Redis killed: B computed the {misses} documents it had never seen; {same}/{len(held)} answers "
              f"equal to the reference ({time.perf_counter() - began:.1f} s)", flush=True)

        # 5. the client helpers' client, streaming through the proxy
        with ProphetClient(f"http://127.0.0.1:{port}/v1", generation=GenerationConfig(max_new_tokens=args.max_tokens),
                           max_retries=3) as client:
            same = sum("".join(client.stream_chat([{"role": "user", "content": question}], docs)) == expected
                       for (docs, question), expected in zip(requests, reference, strict=True))
        print(f"[5] ProphetClient, streaming through the endpoint: {same}/{len(requests)} answers equal to the "
              "reference", flush=True)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if redis.poll() is None:
            redis.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
