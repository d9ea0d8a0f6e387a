"""Several processes writing one directory, and threads sharing one store, leave only valid entries."""

import multiprocessing
from concurrent.futures import ThreadPoolExecutor

from kvstore_helpers import assert_same_chunk, file_chunk, meta_for, value_files
from prophet_rag.cache.store import KVStore
from prophet_rag.config import StoreConfig

WORKERS = 4
SHARED_SEED = 100
OWN_PER_WORKER = 3


def _config(directory) -> StoreConfig:
    return StoreConfig(directory=directory, size_limit_bytes=2**26, max_entry_bytes=2**20)


def _seeds(worker: int) -> list[int]:
    return [SHARED_SEED] + [1000 * worker + i for i in range(OWN_PER_WORKER)]


def _writer(directory, worker, barrier, results):
    """Runs in a spawned process: store the shared chunk and this worker's own chunks, read them all back."""
    meta = meta_for()
    with KVStore(_config(directory)) as store:
        barrier.wait(timeout=60)
        stored = [store.put(*file_chunk(seed), meta) for seed in _seeds(worker)]
        read = [store.get(file_chunk(seed)[0], meta) is not None for seed in _seeds(worker)]
        stats = store.stats()
        results.put((worker, stored, read, stats.timeouts, stats.corrupt))


OPENS_PER_WORKER = 25


def _opener(directory, barrier, results):
    """Runs in a spawned process: open and close the store repeatedly, as engines starting together do."""
    barrier.wait(timeout=60)
    failures = []
    for _ in range(OPENS_PER_WORKER):
        try:
            KVStore(_config(directory)).close()
        except Exception as error:  # the test reports every kind of failure
            failures.append(repr(error))
    results.put(failures)


def test_processes_opening_one_store_at_once_all_succeed(store_dir):
    # diskcache's setup connection has timeout 0; our pragmas on it once failed with "database is locked".
    store_dir.mkdir(mode=0o700)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_opener, args=(store_dir, barrier, results)) for w in range(WORKERS)]
    for proc in procs:
        proc.start()
    failures = [failure for _ in procs for failure in results.get(timeout=300)]
    for proc in procs:
        proc.join(timeout=60)
    assert failures == []


def test_concurrent_writers_leave_every_entry_valid(store_dir):
    store_dir.mkdir(mode=0o700)
    ctx = multiprocessing.get_context("spawn")  # fork after torch has run threads can deadlock
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(store_dir, w, barrier, results)) for w in range(WORKERS)]
    for proc in procs:
        proc.start()
    outcomes = sorted(results.get(timeout=300) for _ in procs)  # spawning imports torch: slow on a busy CI
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0

    for worker, stored, read, timeouts, corrupt in outcomes:
        assert all(stored) and all(read), (worker, stored, read)
        assert (timeouts, corrupt) == (0, 0)
    meta = meta_for()
    with KVStore(_config(store_dir)) as store:
        seeds = sorted({seed for w in range(WORKERS) for seed in _seeds(w)})
        assert len(store) == len(seeds) == 1 + WORKERS * OWN_PER_WORKER
        for seed in seeds:
            ref, chunk = file_chunk(seed)
            assert_same_chunk(store.get(ref, meta), chunk)
        report = store.verify()
        assert (report.checked, report.ok, report.removed, report.orphans) == (len(seeds), len(seeds), 0, 0)
        # Losing `add`s discard their value files: exactly one file per entry remains.
        assert len(value_files(store_dir)) == len(seeds)


def test_threads_share_one_store(store):
    meta = meta_for()
    chunks = [file_chunk(seed) for seed in range(6)]

    def put_then_get(item):
        ref, chunk = item
        assert store.put(ref, chunk, meta)
        return [store.get(ref, meta) for _ in range(5)]

    with ThreadPoolExecutor(max_workers=6) as pool:
        for (_, chunk), got in zip(chunks * 2, pool.map(put_then_get, chunks * 2), strict=True):
            for item in got:
                assert_same_chunk(item, chunk)
    stats = store.stats()
    assert (stats.hits, stats.entries, stats.corrupt, stats.timeouts) == (60, 6, 0, 0)
