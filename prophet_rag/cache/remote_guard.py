"""The shared tier's guards against a slow or failing server: a request's time budget and the circuit breaker.

`RequestBudget` is one request's time on the server (`remote_request_budget_s`, a `tier.RequestState`): every round
trip it waits for is charged to it, and `OverBudget` ends an operation part way through once it is spent.
`CircuitBreaker` stops asking a server that failed `remote_breaker_failures` times in a row, for
`remote_breaker_cooldown_s`, then lets one operation probe it. `RedisTier` (remote.py) counts and logs what they decide.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class CircuitBreaker:
    """Closed, calls go through. After `failures` failed calls in a row it opens: `allow()` is False for
    `cooldown_s`; then it lets one call at a time probe the server, and the first success closes it again (a failed
    probe opens it for another cool-down)."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._threshold, self._cooldown, self._clock = failures, cooldown_s, clock
        self._failed = 0
        self._open_until: float | None = None
        self._probing = False
        self._lock = threading.Lock()
        self.opens = 0

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._open_until is not None

    def allow(self) -> bool:
        with self._lock:
            if self._open_until is None:
                return True
            if self._probing or self._clock() < self._open_until:
                return False
            self._probing = True
            return True

    def answered(self) -> None:
        """An operation answered in time, its request not yet over: a probe's answer closes the breaker on
        probation (one more failure opens it again), so the rest of the probing request uses the server, and the
        request's end within its budget (`succeeded`) clears it."""
        with self._lock:
            if self._probing:
                self._open_until, self._probing = None, False
                self._failed = self._threshold - 1

    def succeeded(self) -> None:
        with self._lock:
            self._failed, self._open_until, self._probing = 0, None, False

    def failed(self) -> bool:
        """Record a failure; True when it opened the breaker (from closed)."""
        with self._lock:
            self._failed += 1
            self._probing = False
            opening = self._open_until is None and self._failed >= self._threshold
            if opening or self._open_until is not None:
                self._open_until = self._clock() + self._cooldown
            self.opens += opening
            return opening


class OverBudget(Exception):
    """The request spent its time budget on the server part way through an operation."""


class RequestBudget:
    """One request's time on the server: `remote_request_budget_s`, less every round trip it waited for (a
    `tier.RequestState`). A request that answered within its budget closes the breaker when it ends: its early
    answers must not reset the count of failures in a row before its budget runs out."""

    def __init__(self, seconds: float, breaker: CircuitBreaker) -> None:
        self.left = seconds
        self.spent = False
        """Set once the budget is gone (and counted): the request no longer asks the server."""
        self.answered = False
        self._breaker = breaker
        self._since: float | None = None

    def finish(self) -> None:
        if self.answered and not self.spent:
            self._breaker.succeeded()

    def begin(self) -> None:
        self._since = time.monotonic()

    def end(self) -> None:
        """Charge the time since `begin`."""
        if self._since is not None:
            self.left -= time.monotonic() - self._since
            self._since = None

    def check(self) -> None:
        """Between the round trips of one operation: stop once the budget is gone."""
        if self._since is not None and self.left - (time.monotonic() - self._since) <= 0:
            raise OverBudget
