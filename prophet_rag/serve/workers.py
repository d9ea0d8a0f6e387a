"""Engine worker processes behind one port: `prophet-rag serve --workers N` on a CPU.

Each worker is a process of its own that loads its own engine on its share of the CPUs (`threads_per_worker`) and
serves the same app as `prophet-rag serve`, on a Unix socket in a folder only this user can open. The supervisor
(this process) listens on the port once every worker has loaded, and hands each connection to the worker holding
the fewest (`balancer.Balancer`): the kernel's choice among workers sharing one socket left bursts split 1/7 and 2/6.
All workers open the same store directory (the store is safe to share between processes), so a document one worker
has computed is a disk hit for the others; each keeps its own memory tiers and its own batcher. The supervisor
restarts a worker that dies; the requests it held fail, the others' go on, and new connections go to the live
workers meanwhile. A worker that exits while the server starts (a model that cannot load) fails the command. Each
response names its worker (`X-Prophet-Worker`: the process id). `/health` and `/metrics` answer for the worker that
took the connection: scrape each worker's figures through its own connections, or serve one process where one set
of figures matters.

Why processes rather than threads: torch runs its CPU ops on GNU OpenMP, and libgomp stops spin-waiting (its idle
workers sleep, and every small op waits to wake one) as soon as it manages more threads than the machine has CPUs,
which two threads that each ran parallel ops already make it do on 2 cores. Inside one server the request threads
and the batcher's thread all compute: a batched decode step of 8 requests took 167 ms on a second computing thread
against 98 ms on the only one (benchmarks/RESULTS.md, "Worker processes"; docs/serve.md). One thread per
process on each CPU never gets there: on 2 cores two one-thread workers answer 8 clients about 1.5x faster than one
two-thread process (3.10 against 2.08 requests/s), and one client slower (0.92 against 1.38).

The spec reaches the workers as a file only this user can read (it holds the API key), named by an environment
variable: each worker is a fresh interpreter (multiprocessing's spawn) that imports `app`.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from prophet_rag.errors import InvalidRequestError, ProphetRAGError
from prophet_rag.serve.balancer import Balancer
from prophet_rag.serve.config import ReplicaSpec

log = logging.getLogger(__name__)

SPEC_ENV = "PROPHET_RAG_WORKER_SPEC"
WORKER_HEADER = "X-Prophet-Worker"
"""Names the worker process that answered (its pid), as `X-Prophet-Replica` names a Ray Serve replica."""
SPEC_FILE = "spec.pickle"
GRACE_S = 30
"""Seconds a worker told to stop may take to finish the requests it holds (uvicorn's graceful shutdown)."""
_SOCKET_PATH_MAX = 100
"""Bytes of a Unix socket's path that every platform takes (Linux: 107, macOS: 103)."""
_RESTART_DELAY_S = 1.0
"""Before starting again a worker that died while loading: a failure that repeats does not spin."""


def threads_per_worker(workers: int, cpus: int) -> int:
    """torch threads of each of `workers` processes sharing `cpus` threads: an equal share, at least one."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidRequestError(f"--workers must be a whole number >= 1, got {workers!r}.")
    return max(1, cpus // workers)


def run(spec: ReplicaSpec, workers: int, *, host: str, port: int, log_level: str) -> None:
    """Serve `spec` from `workers` processes on `host:port` until SIGINT or SIGTERM."""
    folder = Path(tempfile.mkdtemp(prefix="prophet-rag-workers-"))  # 0700: the spec holds the API key
    try:
        sockets = [str(folder / f"{index}.sock") for index in range(workers)]
        if len(os.fsencode(sockets[-1])) > _SOCKET_PATH_MAX:
            raise ProphetRAGError(f"the workers' sockets would be at {sockets[-1]}, too long a path for a Unix "
                                  "socket; set TMPDIR to a shorter folder (such as /tmp).")
        path = folder / SPEC_FILE
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            pickle.dump(spec, out)
        # Each worker is a fresh interpreter: OpenMP reads its thread count when torch loads.
        os.environ.update({SPEC_ENV: str(path), "OMP_NUM_THREADS": str(spec.threads)})
        asyncio.run(_supervise(sockets, host=host, port=port, log_level=log_level))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _supervise(sockets: list[str], *, host: str, port: int, log_level: str) -> None:
    """Start a worker per socket, listen once all are up, restart any that dies; on SIGINT or SIGTERM stop listening,
    let the workers finish what they hold (`GRACE_S`) and return."""
    loop = asyncio.get_running_loop()
    stopping, serving = asyncio.Event(), asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    balancer = Balancer(sockets)
    processes: list[multiprocessing.process.BaseProcess | None] = [None] * len(sockets)
    keepers = [asyncio.create_task(_keep(index, path, log_level, balancer, processes, serving, stopping))
               for index, path in enumerate(sockets)]
    server = None
    try:
        all_up = asyncio.ensure_future(balancer.all_up())
        stop = asyncio.ensure_future(stopping.wait())
        await asyncio.wait([all_up, stop, *keepers], return_when=asyncio.FIRST_COMPLETED)
        for task in (all_up, stop):
            task.cancel()
        failed = [keeper for keeper in keepers if keeper.done() and keeper.exception() is not None]
        if failed:
            raise failed[0].exception()
        if not stopping.is_set():
            serving.set()
            server = await asyncio.start_server(balancer.handle, host, port)
            print(f"prophet-rag: {len(sockets)} workers serving on http://{host}:{port} (Ctrl+C to stop)",
                  file=sys.stderr, flush=True)
            await stopping.wait()
    finally:
        stopping.set()
        if server is not None:
            server.close()  # no new connections; those relayed end as their workers finish them
        for process in processes:
            if process is not None and process.is_alive():
                process.terminate()  # SIGTERM: uvicorn's graceful shutdown
        await asyncio.gather(*keepers, return_exceptions=True)


async def _keep(index: int, path: str, log_level: str, balancer: Balancer,
                processes: list[multiprocessing.process.BaseProcess | None], serving: asyncio.Event,
                stopping: asyncio.Event) -> None:
    """Worker `index`'s life: started, marked up once its socket answers, marked down when it exits, started again
    until the server stops. Raises `ProphetRAGError` when it exits before the server has started serving (a model
    that cannot load fails the command instead of restarting forever)."""
    context = multiprocessing.get_context("spawn")
    while not stopping.is_set():
        process = context.Process(target=_serve_worker, args=(path, log_level, os.getpid()),
                                  name=f"prophet-rag-worker-{index}")
        process.start()
        processes[index] = process
        up = await _until_up(process, path, stopping)
        if up:
            await balancer.mark(index, True)
        await _exited(process, stopping)
        await balancer.mark(index, False)
        if stopping.is_set():
            return
        if not serving.is_set():
            raise ProphetRAGError(f"worker {index} exited with code {process.exitcode} while the server was starting;"
                                  " its error is above.")
        log.warning("worker %d (pid %d) exited with code %s; starting another", index, process.pid,
                    process.exitcode)
        if not up:
            await asyncio.sleep(_RESTART_DELAY_S)


async def _until_up(process: multiprocessing.process.BaseProcess, path: str, stopping: asyncio.Event) -> bool:
    """Whether `process` came to accept connections on `path` (its model loaded) before it exited or the server
    stopped."""
    while process.is_alive() and not stopping.is_set():
        try:
            _, writer = await asyncio.open_unix_connection(path)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return True
    return False


async def _exited(process: multiprocessing.process.BaseProcess, stopping: asyncio.Event) -> None:
    """Once `process` has exited; after the server starts stopping, at most `GRACE_S` more (plus a margin) before
    it is killed."""
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    loop.add_reader(process.sentinel, lambda: ended.done() or ended.set_result(None))
    try:
        stop = asyncio.ensure_future(stopping.wait())
        await asyncio.wait([ended, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not ended.done():
            try:
                await asyncio.wait_for(asyncio.shield(ended), GRACE_S + 5)
            except TimeoutError:
                process.kill()
                await ended
    finally:
        loop.remove_reader(process.sentinel)
    process.join()


def _serve_worker(socket_path: str, log_level: str, supervisor: int) -> None:
    """A worker process: the app on `socket_path` until SIGTERM, or until its supervisor is gone."""
    import uvicorn

    os.setpgrp()  # a terminal's Ctrl+C reaches the supervisor alone, which stops the workers once
    threading.Thread(target=_end_with, args=(supervisor,), daemon=True).start()
    uvicorn.run(f"{__name__}:app", factory=True, uds=socket_path, log_level=log_level,
                timeout_graceful_shutdown=GRACE_S)


def _end_with(supervisor: int) -> None:
    """Stop this worker (SIGTERM to itself) once its supervisor has died: an orphan would hold a model's memory."""
    while os.getppid() == supervisor:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def app():
    """A worker's app (uvicorn's factory): its own engine from the spec that `run` wrote, closed with the app."""
    from prophet_rag.serve.app import create_app, name_responses

    with open(os.environ[SPEC_ENV], "rb") as spec_file:  # written by this server's own `run`, mode 0600
        spec: ReplicaSpec = pickle.load(spec_file)
    served = create_app(spec.build_engine(), spec.serve, owns_engine=True)
    name_responses(served, {WORKER_HEADER: str(os.getpid())})
    return served
