"""Continuous batching: every running request's decode step, and the passes of the prefills waiting for one, run as
one forward pass per step.

A request first takes a place (`DecodeBatcher.admit`): at most `max_batch` requests hold one, so at most that many
stitched caches are alive; up to `max_waiting` more callers wait for one, first come first served, and a request
beyond those raises `OverloadedError`. Holding its place, the request is prefilled on its caller's thread and
chooses its first token there (no forward pass is needed for it); then `Admission.decode` hands it to the batcher.

The batcher's thread runs `batch.forward_passes` over every running request's next token and every pass a prefill
has handed it (`run_passes`: the question's Stage I pass, the selective forward), under the engine's compute lock, and
chooses each request's next token with that request's own `generate.Decoding` (`next_token`: its generator, its
constraint), outside the lock. Tokens reach the request's thread through a queue of its own, so a slow consumer
holds up no one. Requests join after their prefill and leave between steps: at an EOS id, at their token budget,
when their constraint allows nothing more, or when their consumer closes the token iterator (a stream closed, or
dropped, or stopped by a stop string), which the batcher sees before its next step. A place is given back once the
request has left the batch and its thread has let it go, so no more than `max_batch` caches are ever in use.

A prefill holds the compute lock while it assembles its cache, then parks on it while its pass waits for the next
step (`ComputeLock.park`): it keeps its place in line, and the batcher, once it has run the pass, unparks it, so its
next turn (choosing its rows, its first token) comes right after that step. The batcher asks for the lock only once it
has work: the prefills that asked for the lock before it (requests arriving together) have all handed over their
passes when the step starts, so their passes run together instead of one after another.

Prefills go first (`BatchConfig.prefill_priority`, as vLLM's scheduler favours prefills): a new request's first
token should not wait behind the running requests' decode steps. The batcher waits for the lock letting the
prefills that ask meanwhile go first (`ComputeLock.deferring`), and a step with prefill passes waiting runs them
without the decode rows. Either happens at most `prefill_priority` times in a row, so the decode steps are put off
by a bounded number of prefill turns; 0 restores arrival order, passes riding with the decode rows.

A pass with nothing to run with (no request decoding, no other prefill in line) runs at once on its own thread, and
a request decoding alone (no other decoding, no pass waiting) runs its steps on its own thread too, one as each
token is read, until another request or pass arrives; it then joins the batch for its next step. Each thread that
runs torch's parallel ops keeps an OpenMP pool of its own, and once GNU OpenMP manages more threads than the machine
has CPUs its idle workers stop spin-waiting, so every small op waits to wake one: on 2 cores the batcher's thread
decoded one request at 0.69x `model.generate`'s speed, its caller's thread at 1.03x (`benchmarks/bench_decode.py`),
and a batched step of 8 requests took 167 ms on a second thread against 98 ms on the only one computing. Serving
many requests on a CPU is faster from one process per core (`prophet-rag serve --workers`, serve/workers.py).
A pass of one request alone is what `forward_rows` computes (`batch.forward_passes`), so batching changes no
request's tokens. A request's or pass's own part of a step that raises (a stored block that cannot be read, its row
filter, its scoring) fails that request alone; the others' rows run on. What all rows share (the stacked
projections) fails the whole step. The thread runs only while some request is decoding or some pass waits, and
starts again with the next one.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from prophet_rag.compute.batch import Pass, forward_passes
from prophet_rag.compute.generate import Decoding
from prophet_rag.compute.lock import ComputeLock
from prophet_rag.compute.model_adapter import ModelAdapter
from prophet_rag.compute.stitched import StitchedCache
from prophet_rag.config import BatchConfig
from prophet_rag.errors import OverloadedError

log = logging.getLogger(__name__)

_END = object()
"""Put on a request's queue after its last token."""


@dataclass(frozen=True)
class BatchStats:
    """What the batcher has done since it was built: `running` requests in the batch now, `admitted` holding a
    place, `waiting` for one; `steps` decode steps run and `rows` request-steps in them (`rows / steps` is the mean
    decode batch); `passes` prefill passes run in `pass_steps` steps (`passes / pass_steps` is how many ran
    together)."""

    running: int
    admitted: int
    waiting: int
    steps: int
    rows: int
    passes: int = 0
    pass_steps: int = 0


class _Running:
    """A request in the batch: its cache, its decoding rules, the token its next step takes, and its queue."""

    def __init__(self, admission: Admission, cache: StitchedCache, state: Decoding, token: int) -> None:
        self.admission, self.cache, self.state, self.token = admission, cache, state, token
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        """Set by the request's thread when it stops reading: the request leaves at once between steps, or after
        the step under way."""


class _Waiting:
    """A prefill's passes waiting for the next step (run in that order), the thread that parked on the compute lock
    for them, and then their results or the first error."""

    def __init__(self, items: Sequence[Pass]) -> None:
        self.items = list(items)
        self.thread = threading.get_ident()
        self.result: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.error: BaseException | None = None


class Admission:
    """A request's place (a context manager). Its holders are the request's thread and, while the request is in
    the batch, the batcher: the place is free again once both have let it go."""

    def __init__(self, batcher: DecodeBatcher) -> None:
        self._batcher = batcher
        self._holders = 1

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc_info) -> None:
        self._batcher._release(self)

    def decode(self, cache: StitchedCache, logits: torch.Tensor, state: Decoding) -> Iterator[int]:
        """The request's tokens, the first chosen from its prefill's `[vocab]` `logits` on this thread, the others
        by the batcher. Close the iterator to leave the batch early."""
        return self._batcher._decode(self, cache, logits, state)


class DecodeBatcher:
    """Admits requests and decodes the admitted ones together; one per engine, sharing the engine's `lock`."""

    def __init__(self, adapter: ModelAdapter, lock: ComputeLock, config: BatchConfig | None = None) -> None:
        self._adapter, self._lock = adapter, lock
        self.config = config or BatchConfig()
        self._cond = threading.Condition()
        self._admitted = 0
        self._waiting: deque[object] = deque()
        self._running: list[_Running] = []
        self._stepping: list[_Running] = []
        """The requests of the step under way, whose caches the batcher's thread is using."""
        self._passes: list[_Waiting] = []
        self._thread: threading.Thread | None = None
        self._lone: _Running | None = None
        """The one request decoding on its own thread, while no other decodes and no pass waits (`_alone`)."""
        self._steps = self._rows = self._passes_run = self._pass_steps = 0

    def stats(self) -> BatchStats:
        with self._cond:
            running = len(self._running) + (self._lone is not None)
            return BatchStats(running, self._admitted, len(self._waiting), self._steps, self._rows, self._passes_run,
                              self._pass_steps)

    def admit(self) -> Admission:
        """A place for one request, once one is free and the callers who asked before have theirs; raises
        `OverloadedError` at once when `max_waiting` callers already wait."""
        limit = self.config.max_batch
        with self._cond:
            if self._admitted < limit and not self._waiting:
                self._admitted += 1
                return Admission(self)
            if len(self._waiting) >= self.config.max_waiting:
                raise OverloadedError(
                    f"the engine is decoding {self._admitted} requests (max_batch) and {len(self._waiting)} more "
                    "wait (max_waiting); retry later, or raise BatchConfig(max_batch=..., max_waiting=...).")
            ticket = object()
            self._waiting.append(ticket)
            try:
                while self._waiting[0] is not ticket or self._admitted >= limit:
                    self._cond.wait()
            except BaseException:  # interrupted while waiting: give the place in line up
                self._waiting.remove(ticket)
                self._cond.notify_all()
                raise
            self._waiting.popleft()
            self._admitted += 1
            self._cond.notify_all()  # the next in line may fit too
            return Admission(self)

    def _release(self, admission: Admission) -> None:
        with self._cond:
            self._let_go(admission)

    def _let_go(self, admission: Admission) -> None:
        """Under `_cond`: one holder of `admission` is done with it; the last one frees the place."""
        admission._holders -= 1
        if admission._holders == 0:
            self._admitted -= 1
            self._cond.notify_all()

    def _decode(self, admission: Admission, cache: StitchedCache, logits: torch.Tensor,
                state: Decoding) -> Iterator[int]:
        token = state.take(logits)
        if token is None:
            return
        if state.finished:
            yield token
            return
        request = _Running(admission, cache, state, token)
        with self._cond:
            admission._holders += 1
            lone = self._lone is None and self._alone()
            if lone:
                self._lone = request
            else:
                self._running.append(request)  # its next token comes from the next step
                self._start()
        try:
            yield token
            while lone:
                with self._cond:
                    lone = self._alone()
                    if not lone:  # another request or a prefill's pass came: decoded with them from now on
                        self._lone = None
                        self._running.append(request)
                        self._start()
                        break
                token = self._lone_step(request)
                if token is None:
                    return
                yield token
                if state.finished:
                    return
            while (item := request.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            with self._cond:
                request.cancelled = True
                if self._lone is request:
                    self._lone = None
                    self._let_go(admission)
                elif request in self._running and request not in self._stepping:
                    self._leave(request)  # between steps: its place is free at once

    def _alone(self) -> bool:
        """Under `_cond`: no request decoding in the batch, no pass waiting and no step under way, so the request
        decoding alone (`_lone`, if any) can run its steps on its own thread. Every thread that has run torch's
        parallel ops keeps its own OpenMP pool, and with more pool threads than CPUs GNU OpenMP's idle workers sleep
        at once, so each small op waits to wake one: the batcher's thread decoded one request 1.45x slower than its
        caller's thread would (`benchmarks/bench_decode.py`, 2 cores)."""
        return self._thread is None and not self._running and not self._passes

    def _lone_step(self, request: _Running) -> int | None:
        """The next token of the one request decoding, its step run on this thread, or None when it ends."""
        with self._lock.deferring(self.config.prefill_priority):
            outcome = self._step([request], [])[0]
        with self._cond:
            self._steps += 1
            self._rows += 1
        if isinstance(outcome, BaseException):
            raise outcome
        token = request.state.take(outcome)
        if token is not None:
            request.token = token
        return token

    def run_passes(self, items: Sequence[Pass]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What `forward_passes` returns for `items`, run in the next step, in that order, with the other requests'
        passes and decode rows. Called by a prefill holding the compute lock, which it parks on until the step is
        done. With no request decoding and no other prefill in line for the lock, the passes run at once on the
        caller's thread instead."""
        waiting = _Waiting(items)
        with self._lock:
            for item in items:
                if item.cache.layer_ready is not None:  # its stored blocks, in place before the step (a failed read
                    item.cache.layer_ready(self._adapter.spec.num_layers - 1)  # raises here, on the request's thread)
            with self._cond:
                alone = self._thread is None and self._lone is None and not self._lock.contended
                if alone:  # nothing to batch them with, and no one in line: run here, sparing two thread hand-offs
                    self._passes_run += len(items)
                    self._pass_steps += 1
                else:
                    self._passes.append(waiting)
                    self._start()
            if alone:
                return forward_passes(self._adapter, items)
            self._lock.park()  # back, holding the lock, once the step that ran the passes is over
        if waiting.error is not None:
            raise waiting.error
        assert waiting.result is not None
        return waiting.result

    def _start(self) -> None:
        """Under `_cond`: the batcher's thread runs, now that it has work."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="prophet-rag-decode", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        priority = self.config.prefill_priority
        held_back = 0  # steps in a row that ran prefill passes without the decode rows
        while True:
            with self._cond:
                if not self._running and not self._passes:
                    self._thread = None
                    return
            with self._lock.deferring(priority):  # prefills' turns under the lock go first, `priority` at most
                # The step's requests and passes are taken once the lock is held: the prefills that were in line
                # before it have handed over their passes by now.
                with self._cond:
                    for request in [r for r in self._running if r.cancelled]:
                        self._leave(request)  # it stopped reading during the last step
                    passes, self._passes = self._passes, []
                    hold = bool(passes) and bool(self._running) and held_back < priority
                    batch = self._stepping = [] if hold else list(self._running)
                held_back = held_back + 1 if hold else 0
                if not batch and not passes:
                    continue
                try:
                    outcomes = self._step(batch, passes)
                except Exception as error:  # what every row shares failed: every request and pass gets the error
                    log.exception("a batched step failed")
                    outcomes = [error] * (len(batch) + sum(len(waiting.items) for waiting in passes))
                given = len(batch)
                for waiting in passes:
                    mine, given = outcomes[given : given + len(waiting.items)], given + len(waiting.items)
                    failed = [outcome for outcome in mine if isinstance(outcome, BaseException)]
                    if failed:
                        waiting.error = failed[0]
                    else:
                        waiting.result = mine
                    # Its thread takes the lock next, at the place it kept, before this thread's next step.
                    self._lock.unpark(waiting.thread)
            if passes:
                with self._cond:
                    self._passes_run += sum(len(waiting.items) for waiting in passes)
                    self._pass_steps += 1
            self._deliver(batch, outcomes[: len(batch)])

    @torch.inference_mode()
    def _step(self, batch: list[_Running], passes: list[_Waiting]) -> list:
        """One forward pass: each running request's next token appended and run, and each waiting pass. Each one's
        outcome, the requests' first: a request's `[vocab]` logits, a pass's result, or the exception that its own
        part of the step raised (the others' parts run on unchanged)."""
        outcomes: list = []
        for request in batch:
            try:
                outcomes.append(Pass(request.cache, request.cache.append_tokens(
                    torch.tensor([request.token], device=self._adapter.device))))
            except Exception as error:
                outcomes.append(error)
        outcomes += [item for waiting in passes for item in waiting.items]
        ran = [i for i, item in enumerate(outcomes) if isinstance(item, Pass)]
        errors: list[Exception | None] = [None] * len(ran)
        results = forward_passes(self._adapter, [outcomes[i] for i in ran], errors=errors) if ran else []
        for i, result, error in zip(ran, results, errors, strict=True):
            outcomes[i] = result if error is None else error
        decoded = [i for i in range(len(batch)) if not isinstance(outcomes[i], BaseException)]
        if decoded:
            logits = self._adapter.logits(torch.cat([outcomes[i][0] for i in decoded]))
            for i, row in zip(decoded, logits, strict=True):
                outcomes[i] = row
        return outcomes

    def _deliver(self, batch: list[_Running], outcomes: list) -> None:
        """Each request's next token from its `outcomes` logits row, handed to its thread, or the exception its part
        of the step raised; finished and failed requests leave."""
        if not batch:
            return
        delivered, finished = [], []
        for request, row in zip(batch, outcomes, strict=True):
            try:
                if isinstance(row, BaseException):
                    raise row
                token = request.state.take(row)
            except Exception as error:  # its own part of the step, or its constraint, failed: it alone ends
                delivered.append((request, [error]))
                finished.append(request)
                continue
            if token is not None:
                request.token = token
            ends = token is None or request.state.finished
            delivered.append((request, [item for item in (token, _END if ends else None) if item is not None]))
            if ends:
                finished.append(request)
        with self._cond:
            self._steps += 1
            self._rows += len(batch)
            self._stepping = []
            for request in finished:
                self._leave(request)
        # After the finished requests have left: a caller that has its last token and starts another request at
        # once finds the place free.
        for request, items in delivered:
            for item in items:
                request.out.put(item)

    def _leave(self, request: _Running) -> None:
        """Under `_cond`: take `request` out of the batch and let its place go."""
        self._running.remove(request)
        self._let_go(request.admission)
