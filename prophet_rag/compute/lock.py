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
from collections.abc import Iterator
from contextlib import contextmanager


class ComputeLock:
    """A reentrant lock granted in arrival order. Use as a context manager.

    A waiter sleeps on a gate of its own, and a releasing holder hands the lock straight to the first waiter (one
    wake-up per hand-over, where a condition variable would wake every waiter to find the next).
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiting: deque[tuple[threading.Lock, int]] = deque()
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return
            if self._owner is None and not self._waiting:
                self._owner, self._depth = me, 1
                return
            gate = threading.Lock()
            gate.acquire()
            entry = (gate, me)
            self._waiting.append(entry)
        try:
            gate.acquire()  # released by the holder that hands the lock over
        except BaseException:  # interrupted: give the place up, or pass on the lock if it came meanwhile
            with self._mutex:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                    raise
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc_info) -> None:
        with self._mutex:
            assert self._owner == threading.get_ident(), "released by a thread that does not hold it"
            self._depth -= 1
            if self._depth:
                return
            if self._waiting:
                gate, self._owner = self._waiting.popleft()
                self._depth = 1
                gate.release()
            else:
                self._owner = None

    @property
    def contended(self) -> bool:
        """Whether some thread waits for the lock."""
        with self._mutex:
            return bool(self._waiting)

    @contextmanager
    def released(self) -> Iterator[None]:
        """Let the lock go, however deep it is held, while this thread waits for a computation run by another (its
        pass in a batched step); on leaving, wait in line for it again and hold it as deep as before."""
        with self._mutex:
            assert self._owner == threading.get_ident(), "released() by a thread that does not hold the lock"
            depth, self._depth = self._depth, 1
        self.__exit__(None, None, None)
        try:
            yield
        finally:
            self.__enter__()
            self._depth = depth  # only the owner changes its depth
