"""The store under load without faults: engines answering at once on one small store that evicts all the time, while
`verify` and `clear` run beside them, checked against a serial run on a clean store.

    python benchmarks/store_load.py                                   # 4 engines, 60 s, a store of ~6 entries
    python benchmarks/store_load.py --engines 2 --max-seconds 20      # a quick look

Tiny random-weight Llama (tests/tiny.py), one engine per thread (each its own store connections and tokenizer) on one
store directory whose `size_limit_bytes` holds about `--entries` chunks, so nearly every request evicts. A
maintenance thread runs `verify` and `clear` in turn on a store of its own; a sampler walks the directory every few
milliseconds. Nothing is damaged on purpose, so any refusal is a false one. Prints:

  answers           requests answered; wrong: token ids or first-token logits (beyond LOGITS_ATOL) that differ from
                    the clean serial run; crashes: requests that raised
  corrupt           entries the engines counted as corrupt (a read racing eviction is a miss, not corruption)
  verify            runs, entries it removed (none is damaged), runs that failed
  clear             runs, runs that failed (the store's database was busy)
  peak bytes        the most bytes the sampler found in the directory, against size_limit_bytes
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from prophet_rag.cache.store import KVStore
from prophet_rag.config import GenerationConfig, StoreConfig
from prophet_rag.engine import ProphetEngine
from tiny import tiny_model, tiny_tokenizer

GEN = GenerationConfig(max_new_tokens=3, eos_token_ids=(10**6,))
LOGITS_ATOL = 1e-4
DOCS = [f"Site {i}: the turbine hall holds {10 + 7 * i} turbines, {i % 5} rotors and {i % 3} cranes. " * (1 + i % 2)
        for i in range(24)]
QUERIES = [f"How many turbines are at site {i}?" for i in range(24)]


def _bytes_on_disk(directory: Path) -> int:
    total = 0
    for folder, _, names in os.walk(directory):  # os.walk skips folders that vanish during the walk
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:  # gone since the folder was listed
                continue
    return total


class Load:
    def __init__(self, args, root: Path) -> None:
        rng = random.Random(args.seed)
        self.args = args
        self.requests = [([DOCS[i] for i in rng.sample(range(len(DOCS)), 3)], rng.choice(QUERIES))
                         for _ in range(args.requests)]
        self.build_lock, self.lock = threading.Lock(), threading.Lock()
        self.stop = threading.Event()
        self.results, self.maintenance = Counter(), Counter()
        self.peak = 0
        print(f"computing {len(self.requests)} reference answers on a clean store ...", flush=True)
        clean = root / "clean"
        with self._engine(StoreConfig(directory=clean)) as engine:
            self.expected = [engine.answer(d, q, generation=GEN, return_logits=True) for d, q in self.requests]
        files = list(clean.rglob("*.val"))
        entry = sum(f.stat().st_size for f in files) // len(files)
        self.store = StoreConfig(directory=root / "kv", size_limit_bytes=args.entries * entry + 2**16,
                                 max_entry_bytes=4 * entry)
        self.engines: list[ProphetEngine] = []

    def _engine(self, store: StoreConfig) -> ProphetEngine:
        with self.build_lock:  # tiny_model seeds torch's global generator: concurrent builds would mix weights
            return ProphetEngine(tiny_model("llama"), copy.deepcopy(tiny_tokenizer()), store=store)

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        engine = self._engine(self.store)
        with self.lock:
            self.engines.append(engine)
        while not self.stop.is_set():
            index = rng.randrange(len(self.requests))
            docs, query = self.requests[index]
            try:
                got, want = engine.answer(docs, query, generation=GEN, return_logits=True), self.expected[index]
                deviation = (got.first_token_logits - want.first_token_logits).abs().max().item()
                outcome = "ok" if got.token_ids == want.token_ids and deviation <= LOGITS_ATOL else "wrong"
            except Exception as error:  # every exception out of answer() is a crash to count
                outcome = "crash"
                print(f"crash: {type(error).__name__}: {error}", flush=True)
            with self.lock:
                self.results[outcome] += 1

    def maintain(self) -> None:
        with KVStore(self.store) as store:
            while not self.stop.is_set():
                for action in ("verify", "clear"):
                    try:
                        if action == "verify":
                            self.maintenance["verify removed"] += store.verify().removed
                        else:
                            store.clear()
                    except Exception as error:  # a failed run is what is counted
                        self.maintenance[f"{action} failed"] += 1
                        print(f"{action} failed: {error}", flush=True)
                    self.maintenance[action] += 1
                    self.stop.wait(0.2)

    def sample(self) -> None:
        directory = self.store.directory
        while not self.stop.is_set():
            self.peak = max(self.peak, _bytes_on_disk(directory))
            time.sleep(0.002)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=int, default=4, help="threads, one engine each, on the one store")
    parser.add_argument("--requests", type=int, default=40, help="distinct requests (3 of 24 documents each)")
    parser.add_argument("--entries", type=int, default=6, help="the store's size limit, in average entries")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="prophet-load-") as tmp:
        load = Load(args, Path(tmp))
        threads = [threading.Thread(target=load.worker, args=(i,)) for i in range(args.engines)]
        threads += [threading.Thread(target=load.maintain), threading.Thread(target=load.sample)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        load.stop.wait(args.max_seconds)
        load.stop.set()
        for thread in threads:
            thread.join()
        stats = [engine.store.stats() for engine in load.engines]
        for engine in load.engines:
            engine.close()
    limit = load.store.size_limit_bytes
    m = load.maintenance
    print(f"\n{args.engines} engines on one store of {limit} bytes (~{args.entries} entries), "
          f"{time.monotonic() - start:.0f} s")
    print(f"answers: {sum(load.results.values())}, wrong: {load.results['wrong']}, crashes: {load.results['crash']}")
    print(f"store: hits {sum(s.hits for s in stats)}, misses {sum(s.misses for s in stats)}, "
          f"evicted {sum(s.evicted for s in stats)}, corrupt {sum(s.corrupt for s in stats)}, "
          f"timeouts {sum(s.timeouts for s in stats)}")
    print(f"verify: {m['verify']} runs, {m['verify removed']} entries removed, {m['verify failed']} failed")
    print(f"clear: {m['clear']} runs, {m['clear failed']} failed")
    print(f"peak bytes: {load.peak} ({100 * (load.peak - limit) / limit:+.0f}% of size_limit_bytes)")


if __name__ == "__main__":
    main()
