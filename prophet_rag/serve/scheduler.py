"""Admission and concurrency for the server: a bounded queue in front of up to `max_in_flight` engine workers.

The event loop never runs the engine. `Scheduler.submit` queues a request (or refuses it at once with
`OverloadedError` when the queue is full) and returns its `Job`; a worker thread takes it, starts it on the engine
(`engine.stream_chat`, which checks the request before any compute) and hands each text delta back to the event
loop. A job cancelled while it waits leaves the queue at once; one cancelled while it runs stops at its next
delta, and its generator is closed, so no further forward pass runs for it.

The workers are where batching comes from: the engine decodes every request its callers are running together, one
forward pass per step (continuous batching, `compute/batcher.py`), so `max_in_flight` workers give batches of up to
`max_in_flight` requests (bounded by the engine's own `BatchConfig.max_batch`). This is the interface the server
relies on (`submit`, `Job.started`, iterating a job, `Job.answer`, `Job.cancel`, `queue_depth`, `in_flight`,
`workers`, `close`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from prophet_rag.config import GenerationConfig
from prophet_rag.errors import OverloadedError
from prophet_rag.results import Answer
from prophet_rag.structured import Grammar, Tool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineRequest:
    """One chat request for `engine.stream_chat`: messages (one content may hold `layout.DOCUMENTS`), documents."""

    messages: tuple[Mapping[str, Any], ...]
    documents: tuple[str, ...]
    generation: GenerationConfig
    method: str | None = None
    ratio: float | None = None
    transient: tuple[bool, ...] = ()
    """Per document: one-off text, computed and never stored."""
    transient_prefix: bool = False
    tools: tuple[Tool, ...] = ()
    grammar: Grammar | None = None
    """What the answer must match: a response format's, or the tool calls' that `tool_choice` asks for."""

    def extras(self) -> dict[str, Any]:
        """`stream_chat`'s keyword arguments beyond a plain chat, only those this request sets: a backend without
        tools or one-off text (`--backend hf`) is never sent what it cannot take."""
        extras: dict[str, Any] = {"transient": self.transient if any(self.transient) else (),
                                  "transient_prefix": self.transient_prefix, "tools": self.tools,
                                  "grammar": self.grammar}
        return {name: value for name, value in extras.items() if value}


class Job:
    """A request's life in the scheduler, seen from the event loop that submitted it.

    `await job.started()` returns once a worker has started it (or raises the engine's error for a bad request);
    then `async for delta in job` gives its text, after which `job.answer` holds the `Answer`. `job.cancel()` may be
    called at any time, from any thread, and more than once.
    """

    def __init__(self, request: EngineRequest, loop: asyncio.AbstractEventLoop, withdraw) -> None:
        self.request = request
        self._loop = loop
        self._withdraw = withdraw
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.answer: Answer | None = None
        self.submitted_at = time.perf_counter()
        self.first_output_at: float | None = None
        """When the first delta (or the end, if there was no text) reached the event loop."""

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()
        self._withdraw(self)

    async def started(self) -> None:
        kind, value = await self._events.get()
        if kind == "error":
            raise value
        assert kind == "started", kind

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            kind, value = await self._events.get()
            if kind == "started":  # iterated without awaiting `started` first
                continue
            if self.first_output_at is None:
                self.first_output_at = time.perf_counter()
            if kind == "delta":
                yield value
            elif kind == "done":
                self.answer = value
                return
            else:
                assert kind == "error", kind
                raise value

    def _emit(self, kind: str, value: Any = None) -> None:
        """From a worker thread: hand an event to the event loop (a loop that has closed cancels the job)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:
            self._cancelled.set()


class Scheduler:
    """Up to `max_in_flight` worker threads running requests on `engine` one at a time each, and up to `max_queue`
    requests waiting for them (first come, first served).

    Workers start as requests need them. A worker that finds nothing waiting waits for the next request only while no
    other worker does, and otherwise ends: a request goes to the one waiting worker, so at light load the same thread
    runs every request, and after a burst one thread is left. That is for torch: each thread that runs its parallel
    ops keeps an OpenMP pool of its own, and once GNU OpenMP manages more threads than the machine has CPUs its idle
    workers stop spin-waiting, so every small op waits to wake one, until the threads that hold the pools end. With
    requests handed round the workers in turn, the server answered one client in 1.44 s end to end, in this order
    1.21 s; with the idle workers of an eight-client burst kept, one client got 0.80 requests/s after the burst
    against 1.30 before it (`benchmarks/bench_serve.py`, 2 cores; see `compute/batcher.py`)."""

    def __init__(self, engine, *, max_in_flight: int = 8, max_queue: int = 32) -> None:
        self._engine = engine
        self.max_in_flight, self.max_queue = max_in_flight, max_queue
        self._waiting: deque[Job] = deque()
        self._running = 0
        self._closed = False
        self._mutex = threading.RLock()
        self._idle: list[threading.Condition] = []
        """The waiting worker's wake-up condition (on `_mutex`); more than one only for a moment."""
        self._workers: set[threading.Thread] = set()
        self._names = itertools.count()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a worker."""
        with self._mutex:
            return len(self._waiting)

    @property
    def in_flight(self) -> int:
        """Requests running on the engine."""
        with self._mutex:
            return self._running

    @property
    def workers(self) -> int:
        """Worker threads alive: those running requests, and at most one waiting for the next."""
        with self._mutex:
            return len(self._workers)

    def submit(self, request: EngineRequest) -> Job:
        """Queue `request`; raises `OverloadedError` when `max_queue` requests already wait and no worker is free."""
        job = Job(request, asyncio.get_running_loop(), self._withdraw)
        with self._mutex:
            if self._closed:
                raise OverloadedError("the server is shutting down; retry on another replica.")
            free = self.max_in_flight - self._running
            if len(self._waiting) >= self.max_queue + max(free, 0):
                raise OverloadedError(f"{self._running} requests are running and {len(self._waiting)} waiting, the "
                                      "most this server queues; retry later.")
            self._waiting.append(job)
            if self._idle:
                self._idle.pop().notify()
            elif len(self._workers) < self.max_in_flight:
                worker = threading.Thread(target=self._work, name=f"prophet-rag-worker-{next(self._names)}",
                                          daemon=True)
                self._workers.add(worker)
                worker.start()
        return job

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel every waiting job and stop the workers once their running jobs end."""
        with self._mutex:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            for wake in self._idle:
                wake.notify()
            self._idle.clear()
            workers = list(self._workers)
        for job in waiting:
            job._cancelled.set()
            job._emit("error", OverloadedError("the server is shutting down; retry on another replica."))
        for worker in workers:
            worker.join(timeout_s)

    def _withdraw(self, job: Job) -> None:
        with self._mutex:
            if job in self._waiting:
                self._waiting.remove(job)

    def _work(self) -> None:
        wake = threading.Condition(self._mutex)
        with self._mutex:
            job = self._next(wake)
        while job is not None:
            try:
                self._run(job)
            finally:
                with self._mutex:
                    self._running -= 1
                    job = self._next(wake)

    def _next(self, wake: threading.Condition) -> Job | None:
        """Under `_mutex`: this worker's next job, once one waits; None when the worker ends instead (the scheduler
        is closing, or another worker already waits for the next request)."""
        while not self._waiting:
            if self._closed or self._idle:
                self._workers.discard(threading.current_thread())
                return None
            self._idle.append(wake)
            wake.wait()
            if wake in self._idle:  # woken by `close`, or spuriously
                self._idle.remove(wake)
        self._running += 1
        return self._waiting.popleft()

    def _run(self, job: Job) -> None:
        request = job.request
        try:
            stream = self._engine.stream_chat(list(request.messages), list(request.documents), method=request.method,
                                              ratio=request.ratio, generation=request.generation, **request.extras())
        except Exception as error:  # the handler answers it: 400 for a bad request, 500 otherwise
            job._emit("error", error)
            return
        job._emit("started")
        deltas = iter(stream)
        try:
            for delta in deltas:
                if job.cancelled:
                    return
                job._emit("delta", delta)
            job._emit("done", stream.answer)
        except Exception as error:
            log.exception("request failed while generating")
            job._emit("error", error)
        finally:
            deltas.close()  # a cancelled job's generator stops here: no further forward pass
