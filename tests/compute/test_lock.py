"""The engine's compute lock: one holder at a time, reentrant, granted in arrival order."""

import signal
import threading
import time

import pytest

from prophet_rag.compute.lock import ComputeLock


def _wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_the_lock_is_reentrant_within_a_thread():
    lock = ComputeLock()
    with lock, lock:
        pass
    with lock:  # released fully: taken again
        pass


def test_only_one_thread_holds_it_at_a_time():
    lock, inside, most = ComputeLock(), [0], [0]

    def work():
        for _ in range(200):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1


def test_waiters_get_it_in_arrival_order():
    lock, order = ComputeLock(), []

    def take(name):
        with lock:
            order.append(name)

    lock.__enter__()
    threads = []
    for name in range(5):
        threads.append(threading.Thread(target=take, args=(name,)))
        threads[-1].start()
        _wait_until(lambda n=name: len(lock._waiting) == n + 1)
    lock.__exit__(None, None, None)
    for thread in threads:
        thread.join()
    assert order == [0, 1, 2, 3, 4]


def test_a_thread_that_releases_it_queues_behind_a_waiter():
    # A stream's decode loop releases and takes the lock at every token: it must not keep it from others.
    lock, order = ComputeLock(), []
    lock.__enter__()
    waiter = threading.Thread(target=lambda: (lock.__enter__(), order.append("waiter"),
                                              lock.__exit__(None, None, None)))
    waiter.start()
    _wait_until(lambda: len(lock._waiting) == 1)
    lock.__exit__(None, None, None)
    with lock:
        order.append("releaser")
    waiter.join()
    assert order == ["waiter", "releaser"]



class _Interrupted(BaseException):
    pass


def _interrupt(signum, frame):
    raise _Interrupted


def test_a_waiter_interrupted_while_waiting_gives_its_place_up():
    # As Ctrl-C interrupts the main thread waiting for the lock: the queue must not stall behind its place.
    lock, holding, release = ComputeLock(), threading.Event(), threading.Event()

    def hold():
        with lock:
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(30)
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(_Interrupted):
            lock.__enter__()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(lock._waiting) == 0
    release.set()
    holder.join(30)
    taken = threading.Thread(target=lambda: lock.__enter__() or lock.__exit__(None, None, None))
    taken.start()
    taken.join(timeout=30)
    assert not taken.is_alive()


def _queue(lock, name, order, **options):
    """A thread that waits for the lock (deferring as `options` say) and records its turn; started and in line."""
    count = len(lock._waiting)

    def take():
        with lock.deferring(options["passes"]) if options else lock:
            order.append(name)

    thread = threading.Thread(target=take)
    thread.start()
    _wait_until(lambda: len(lock._waiting) == count + 1)
    return thread


def test_a_deferring_waiter_lets_at_most_its_count_of_later_callers_go_first():
    lock, order = ComputeLock(), []
    lock.__enter__()
    threads = [_queue(lock, "step", order, passes=2)] + [_queue(lock, n, order) for n in ("a", "b", "c")]
    lock.__exit__(None, None, None)
    for thread in threads:
        thread.join(30)
    assert order == ["a", "b", "step", "c"]


def test_a_parked_thread_keeps_its_place_and_comes_back_as_deep_as_it_held_the_lock():
    lock, order, depth = ComputeLock(), [], []

    def parked():
        with lock, lock:
            lock.park()
            order.append("parked")
            depth.append(lock._depth)

    lock.__enter__()
    first = _queue(lock, "first", order)
    lock.__exit__(None, None, None)
    _wait_until(lambda: order == ["first"])
    lock.__enter__()
    thread = threading.Thread(target=parked)
    thread.start()
    _wait_until(lambda: len(lock._waiting) == 1)
    lock.__exit__(None, None, None)  # the parked thread holds it ...
    _wait_until(lambda: lock._waiting and lock._waiting[0].parked)  # ... and lets it go, keeping its place
    with lock:  # a free lock with only a parked waiter is taken at once
        later = _queue(lock, "later", order)
        lock.unpark(thread.ident)
    for t in (first, thread, later):
        t.join(30)
    assert order == ["first", "parked", "later"] and depth == [2]
    assert lock._owner is None and not lock._waiting


def test_unparking_a_thread_while_the_lock_is_free_hands_it_over():
    lock, order = ComputeLock(), []

    def parked():
        with lock:
            lock.park()
            order.append("back")

    thread = threading.Thread(target=parked)
    thread.start()
    _wait_until(lambda: lock._waiting and lock._owner is None)
    assert not lock.contended  # a parked thread does not wait for the lock yet
    lock.unpark(thread.ident)
    thread.join(30)
    assert order == ["back"]


def test_park_by_a_thread_that_does_not_hold_the_lock_is_refused():
    with pytest.raises(AssertionError, match="does not hold"):
        ComputeLock().park()
