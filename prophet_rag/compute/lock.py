"""The engine's compute lock: one model computation at a time, granted in the order callers asked for it.

An engine shared by many threads (a server's worker pool, LangChain's `.batch`, the integrations' `ainvoke`, which
run engine calls in threads) runs each request's prefill and each decode step under this lock. The model's forward
mutates nothing; the lock bounds what concurrency costs (one request's activations at a time, not one set per
thread; no CPU cores oversubscribed by several intra-op thread pools) and runs every computation exactly as a serial
run does. Everything else of a request (validation, tokenization, detokenization, handing text to the consumer) runs
outside it.

First come, first served: a plain `threading.Lock` lets a thread that releases it take it straight back, so one
stream's decode loop could starve the others. Reentrant: chunk computation takes it inside a prefill that holds it.
Two exceptions to arrival order serve the batcher (compute/batcher.py): a caller may let a bounded number of later
callers go first (`deferring`: the decode steps let prefills by), and a thread whose computation another thread runs
(a prefill's pass in a batched step) keeps its place in line while it waits (`park` / `unpark`), so its next turn
comes right after that computation instead of behind whoever asked in the meantime.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class _Waiter:
    """A thread in line: its gate (released when the lock is handed to it), how many later callers it still lets go
    first, and whether it is parked (passed over until `unpark`)."""

    def __init__(self, ident: int, passes: int = 0, parked: bool = False) -> None:
        self.gate = threading.Lock()
        self.gate.acquire()
        self.ident, self.passes, self.parked = ident, passes, parked


class ComputeLock:
    """A reentrant lock granted in arrival order. Use as a context manager.

    A waiter sleeps on a gate of its own, and a releasing holder hands the lock straight to the next waiter (one
    wake-up per hand-over, where a condition variable would wake every waiter to find the next).
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiting: deque[_Waiter] = deque()
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> None:
        self._acquire(0)

    def __exit__(self, *exc_info) -> None:
        with self._mutex:
            assert self._owner == threading.get_ident(), "released by a thread that does not hold it"
            self._depth -= 1
            if not self._depth:
                self._hand_over()

    @contextmanager
    def deferring(self, passes: int) -> Iterator[None]:
        """Hold the lock, letting up to `passes` callers who ask for it while this thread waits go first."""
        self._acquire(passes)
        try:
            yield
        finally:
            self.__exit__(None, None, None)

    @property
    def contended(self) -> bool:
        """Whether some thread waits for the lock (a parked one does not count until it is unparked)."""
        with self._mutex:
            return any(not waiter.parked for waiter in self._waiting)

    def park(self) -> None:
        """Let the lock go, however deep it is held, while another thread runs a computation for this one (its pass
        in a batched step); return holding it again, as deep as before, once that thread has called `unpark` for
        this one and the lock comes to this thread's place in line, kept from the moment it was let go."""
        me = threading.get_ident()
        with self._mutex:
            assert self._owner == me, "park() by a thread that does not hold the lock"
            depth = self._depth
            waiter = _Waiter(me, parked=True)
            self._waiting.append(waiter)
            self._hand_over()
        self._wait(waiter)
        self._depth = depth  # only the owner changes its depth

    def unpark(self, ident: int) -> None:
        """The computation the parked thread `ident` waits for is done: its place in line counts again."""
        with self._mutex:
            for waiter in self._waiting:
                if waiter.ident == ident and waiter.parked:
                    waiter.parked = False
                    if self._owner is None:
                        self._hand_over()
                    return

    def _acquire(self, passes: int) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return
            if self._owner is None:  # a free lock has no waiter that could take it, only parked ones
                self._owner, self._depth = me, 1
                return
            waiter = _Waiter(me, passes)
            self._waiting.append(waiter)
        self._wait(waiter)

    def _wait(self, waiter: _Waiter) -> None:
        try:
            waiter.gate.acquire()  # released by the holder that hands the lock over
        except BaseException:  # interrupted: give the place up, or pass on the lock if it came meanwhile
            with self._mutex:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
                    raise
            self.__exit__(None, None, None)
            raise

    def _hand_over(self) -> None:
        """Under `_mutex`, the lock being let go: to the first waiter in line that is not parked and lets no one go
        first, else to the first one not parked; each deferring waiter passed over lets one fewer go first."""
        eligible = [waiter for waiter in self._waiting if not waiter.parked]
        if not eligible:
            self._owner, self._depth = None, 0
            return
        chosen = next((waiter for waiter in eligible if waiter.passes <= 0), eligible[0])
        for waiter in eligible:
            if waiter is chosen:
                break
            waiter.passes -= 1
        self._waiting.remove(chosen)
        self._owner, self._depth = chosen.ident, 1
        chosen.gate.release()
