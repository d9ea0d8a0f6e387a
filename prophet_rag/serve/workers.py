"""Engine worker processes behind one port: `prophet-rag serve --workers N` on a CPU.

Each worker is a process of its own (uvicorn's workers: one listening socket, each process accepting connections
from it) that loads its own engine on its share of the CPUs (`threads_per_worker`) and serves the same app as
`prophet-rag serve`. All of them open the same store directory (the store is safe to share between processes), so a
document one worker has computed is a disk hit for the others; each keeps its own memory tiers and its own batcher.
uvicorn restarts a worker that dies; the requests it held fail, the others' go on. Each response names its worker
(`X-Prophet-Worker`: the process id). `/health` and `/metrics` answer for the worker that took the connection:
scrape each worker's figures through its own connections, or serve one process where one set of figures matters.

Why processes rather than threads: torch runs its CPU ops on GNU OpenMP, and libgomp stops spin-waiting (its idle
workers sleep, and every small op waits to wake one) as soon as it manages more threads than the machine has CPUs,
which two threads that each ran parallel ops already make it do on 2 cores. Inside one server the request threads
and the batcher's thread all compute: a batched decode step of 8 requests took 167 ms on a second computing thread
against 98 ms on the only one (benchmarks/RESULTS.md, "Worker processes"; docs/serve.md). One thread per
process on each CPU never gets there: on 2 cores two one-thread workers answer 8 clients about 1.5x faster than one
two-thread process (3.10 against 2.08 requests/s), and one client slower (0.92 against 1.38).

The spec reaches the workers as a file only this user can read (it holds the API key), named by an environment
variable: uvicorn starts each worker as a fresh interpreter that imports `app`.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path

from prophet_rag.errors import InvalidRequestError
from prophet_rag.serve.config import ReplicaSpec

SPEC_ENV = "PROPHET_RAG_WORKER_SPEC"
WORKER_HEADER = "X-Prophet-Worker"
"""Names the worker process that answered (its pid), as `X-Prophet-Replica` names a Ray Serve replica."""
SPEC_FILE = "spec.pickle"


def threads_per_worker(workers: int, cpus: int) -> int:
    """torch threads of each of `workers` processes sharing `cpus` threads: an equal share, at least one."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidRequestError(f"--workers must be a whole number >= 1, got {workers!r}.")
    return max(1, cpus // workers)


def run(spec: ReplicaSpec, workers: int, *, host: str, port: int, log_level: str) -> None:
    """Serve `spec` from `workers` processes on `host:port` until SIGINT or SIGTERM."""
    import uvicorn

    folder = Path(tempfile.mkdtemp(prefix="prophet-rag-workers-"))  # 0700: the spec holds the API key
    try:
        path = folder / SPEC_FILE
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            pickle.dump(spec, out)
        # Each worker is a fresh interpreter: OpenMP reads its thread count when torch loads.
        os.environ.update({SPEC_ENV: str(path), "OMP_NUM_THREADS": str(spec.threads)})
        uvicorn.run(f"{__name__}:app", factory=True, workers=workers, host=host, port=port, log_level=log_level,
                    timeout_graceful_shutdown=30)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def app():
    """A worker's app (uvicorn's factory): its own engine from the spec that `run` wrote, closed with the app."""
    from prophet_rag.serve.app import create_app, name_responses

    with open(os.environ[SPEC_ENV], "rb") as spec_file:  # written by this server's own `run`, mode 0600
        spec: ReplicaSpec = pickle.load(spec_file)
    served = create_app(spec.build_engine(), spec.serve, owns_engine=True)
    name_responses(served, {WORKER_HEADER: str(os.getpid())})
    return served
