"""The engine's compute lock: one model computation at a time, granted in the order callers asked for it.

An engine shared by many threads (a server's worker pool, LangChain's `.batch`, the integrations' `ainvoke`, which
run engine calls in threads) runs each request's prefill and each decode step under this lock. The model's forward
mutates nothing; the lock bounds what concurrency costs (one request's activations at a time, not one set per
thread; no CPU cores oversubscribed by several intra-op thread pools) and runs every computation exactly as a serial
run does. Everything else of a request (validation, tokenization, detokenization, handing text to the consumer) runs
outside it. A batching scheduler can later replace it.

First come, first served: a plain `threading.Lock` lets a thread that releases it take it straight back, so one
stream's decode loop could starve the others. Reentrant: chunk computation takes it inside a prefill that holds it.
"""

from __future__ import annotations

import threading
from collections import deque


class ComputeLock:
    """A reentrant lock granted in arrival order. Use as a context manager."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._waiting: deque[object] = deque()
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            ticket = object()
            self._waiting.append(ticket)
            try:
                while self._owner is not None or self._waiting[0] is not ticket:
                    self._cond.wait()
            except BaseException:  # interrupted while waiting: give the place up, or the queue stalls behind it
                self._waiting.remove(ticket)
                self._cond.notify_all()
                raise
            self._waiting.popleft()
            self._owner, self._depth = me, 1

    def __exit__(self, *exc_info) -> None:
        with self._cond:
            assert self._owner == threading.get_ident(), "released by a thread that does not hold it"
            self._depth -= 1
            if not self._depth:
                self._owner = None
                self._cond.notify_all()
