"""Engines in several processes and threads sharing one store directory answer exactly as one engine answering the
same requests serially.

One engine per thread, so that the engines race on the store; one engine shared by many threads is
test_shared_engine.py's matter."""

import copy
import hashlib
import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from prophet_rag.config import GenerationConfig, StoreConfig
from prophet_rag.engine import ProphetEngine
from tiny import tiny_model, tiny_tokenizer

PROCESSES, THREADS = 2, 2
DOCS = [f"Record {i}: the turbine hall of site {i} holds {10 + 3 * i} turbines and {i % 4} spare rotors."
        for i in range(8)]
GEN = GenerationConfig(max_new_tokens=3, eos_token_ids=(10**6,))


def _requests(worker: int) -> list[tuple[list[str], str]]:
    """Overlapping requests in a worker-specific order, so workers read and write the same entries concurrently."""
    requests = [([DOCS[(2 * i + j) % len(DOCS)] for j in range(3)], f"How many turbines at site {i}?")
                for i in range(4)]
    return requests[worker:] + requests[:worker]


def _fingerprint(answer) -> tuple:
    logits = answer.first_token_logits.contiguous().view(torch.uint8).numpy().tobytes()
    return answer.token_ids, hashlib.sha256(logits).hexdigest()


def _engine(directory) -> ProphetEngine:
    return ProphetEngine(tiny_model("llama"), copy.deepcopy(tiny_tokenizer()), store=StoreConfig(directory=directory))


def _worker(directory, worker, results):
    """Runs in a spawned process: THREADS threads, each with its own engine, answer this worker's requests."""
    torch.set_num_threads(1)
    engines = [_engine(directory) for _ in range(THREADS)]
    free, local = list(engines), threading.local()

    def run(request):
        if not hasattr(local, "engine"):
            local.engine = free.pop()
        docs, query = request
        return query, docs, _fingerprint(local.engine.answer(docs, query, generation=GEN, return_logits=True))

    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(run, _requests(worker) * 2))
    stats = [engine.store.stats() for engine in engines]
    for engine in engines:
        engine.close()
    results.put((answers, sum(s.corrupt for s in stats), sum(s.timeouts for s in stats)))


def test_processes_and_threads_on_one_store_answer_like_a_serial_engine(tmp_path):
    with _engine(tmp_path / "serial") as serial:
        expected = {(query, tuple(docs)): _fingerprint(serial.answer(docs, query, generation=GEN,
                                                                     return_logits=True))
                    for docs, query in _requests(0)}
    shared = tmp_path / "shared"
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(shared, w, results)) for w in range(PROCESSES)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    answered = 0
    for answers, corrupt, timeouts in outcomes:
        assert (corrupt, timeouts) == (0, 0)
        for query, docs, fingerprint in answers:
            assert fingerprint == expected[(query, tuple(docs))], query
            answered += 1
    assert answered == PROCESSES * 2 * len(expected)
