"""Bounded soak: faults injected at random into a live store while engines answer requests concurrently.

    python benchmarks/reliability.py          # 1000 faults, no key: accidental faults + inconsistent forgeries
    python benchmarks/reliability.py --key    # with an authentication key: every forgery included
    python benchmarks/reliability.py --faults 200 --workers 3 --max-seconds 300

Tiny random-weight models (tests/tiny.py), several engines (one per thread, each with its own connections and
tokenizer) on one store directory. Worker threads answer random requests without pause; the injector thread repeats:
answer a request (so its entries are stored), damage one of its entries or the directory around them, answer it
again, and check that the damage was refused (or, for damage outside the entries, neutralised). Every answer is
compared with a serial run on a clean store: the same token ids, and first-token logits within LOGITS_ATOL. Prints:

  faults injected   entry faults + environment faults
  detected          entry faults whose entry was refused on read (counted corrupt/incompatible/unauthenticated)
  neutralised       environment faults made harmless: orphan files reclaimed, Settings rows dropped on the next
                    open, planted pickles never run, special files refused
  wrong answers     answers that differ from the clean serial run
  crashes           requests that raised
  hangs             requests that did not finish within --hang-seconds

It stops by itself after --faults faults or --max-seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import copy
import os
import pickle
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import diskcache
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kvstore_helpers import forged_bytes
from prophet_rag.cache import codec, store_files
from prophet_rag.cache.store import KVStore
from prophet_rag.config import GenerationConfig, StoreConfig
from prophet_rag.engine import ProphetEngine
from tiny import tiny_model, tiny_tokenizer

GEN = GenerationConfig(max_new_tokens=3, eos_token_ids=(10**6,))
KEY_ENV = "PROPHET_RAG_SOAK_KEY"
DOCS = [f"Site {i}: the turbine hall holds {10 + 7 * i} turbines, {i % 5} spare rotors and a {c} door. " * (1 + i % 2)
        for i, c in enumerate(["red", "blue", "green", "grey", "white", "black", "brown", "pink", "gold", "teal"])]
QUERIES = [f"How many turbines are at site {i}?" for i in range(10)]

ENTRY_FAULTS = ("flip-header", "flip-data", "truncate", "zero-fill", "append", "delete-file", "swap-values",
                "other-model", "pickle-value", "null-value", "size-column", "fifo", "sparse-20GiB", "symlink",
                "forged-positions", "forged-token-ids", "forged-nan", "forged-inf", "forged-dropped-head",
                "forged-doubled-layers", "forged-model-fp")
KEYED_ONLY = ("forged-consistent",)
"""Other finite KV under the real key with every field consistent: only a key can refuse it (README)."""
ENV_FAULTS = ("orphan-file", "settings-row", "pickle-key-row", "junk-file")
SETTINGS = [("disk_evil", 1), ("sqlite_temp_store_directory", "'/tmp/soak-outside'"), ("size", -1e9),
            ("sqlite_mmap_size", 2**30), ("eviction_policy", "none"), ("close", 1)]


class Touch:
    """Unpickling this creates `path`: a planted payload must never run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


LOGITS_ATOL = 1e-4
"""Chunks computed in one batch differ from chunks computed alone in the last bits (~1e-7 here), so which chunks a
cold request computes together moves its logits that much; damaged or forged KV moves them by orders more."""


def _requests(rng: random.Random, count: int) -> list[tuple[list[str], str]]:
    return [([DOCS[i] for i in rng.sample(range(len(DOCS)), 3)], rng.choice(QUERIES)) for _ in range(count)]


class Soak:
    def __init__(self, args, directory: Path):
        self.args = args
        self.directory = directory / "kv"
        self.rng = random.Random(args.seed)
        self.requests = _requests(self.rng, args.requests)
        self.store = StoreConfig(directory=self.directory, size_limit_bytes=2**30, max_entry_bytes=2**26,
                                 auth_key_env=KEY_ENV if args.key else None)
        self.sentinel = directory / "pickle-ran"
        self.lock = threading.Lock()
        self.build_lock = threading.Lock()
        self.results = Counter()
        self.faults = Counter()
        self.detected = Counter()
        self.neutralised = Counter()
        self.stop = threading.Event()
        self.pending_env: list[tuple[str, object]] = []
        self.last_fault = None
        self.engines: list[ProphetEngine] = []
        print(f"computing {len(self.requests)} reference answers on a clean store ...", flush=True)
        with self._engine(StoreConfig(directory=directory / "clean")) as clean:
            self.expected = [clean.answer(d, q, generation=GEN, return_logits=True) for d, q in self.requests]
        with self._engine(StoreConfig(directory=directory / "other-model"), seed=1) as other:
            other.ingest(DOCS)
            self.foreign = list((directory / "other-model").rglob("*.val"))

    def _engine(self, store: StoreConfig | None = None, seed: int = 0) -> ProphetEngine:
        # tiny_model seeds torch's global generator: concurrent builds would mix weights. One engine per thread, so
        # that the engines race on the store (one engine shared by threads: benchmarks/stress_concurrency.py).
        with self.build_lock:
            engine = ProphetEngine(tiny_model("llama", seed=seed), copy.deepcopy(tiny_tokenizer()),
                                   store=store or self.store)
        if store is None:
            with self.lock:
                self.engines.append(engine)
        return engine

    def refusals(self) -> int:
        """Entries refused by any engine on the live store so far."""
        with self.lock:
            engines = list(self.engines)
        total = 0
        for engine in engines:
            stats = engine.store.stats()
            total += stats.corrupt + stats.incompatible + stats.unauthenticated
        return total

    # ---- requests ----------------------------------------------------------------------------------------------

    def ask(self, engine: ProphetEngine, index: int) -> None:
        """Answer request `index` with a deadline, and record how it went."""
        docs, query = self.requests[index]
        pool = ThreadPoolExecutor(1)
        future = pool.submit(engine.answer, docs, query, generation=GEN, return_logits=True)
        try:
            got, want = future.result(timeout=self.args.hang_seconds), self.expected[index]
            deviation = (got.first_token_logits - want.first_token_logits).abs().max().item()
            outcome = "ok" if got.token_ids == want.token_ids and deviation <= LOGITS_ATOL else "wrong"
            if outcome == "wrong":
                print(f"wrong answer to request {index}: tokens {got.token_ids} vs {want.token_ids}, logits off by "
                      f"{deviation:.2e}, hits {got.stats.cache_hits}; last fault: {self.last_fault}", flush=True)
        except FutureTimeout:
            outcome = "hang"
        except Exception as error:  # every exception out of answer() is a crash to count
            outcome = "crash"
            print(f"crash: {type(error).__name__}: {error}", flush=True)
        pool.shutdown(wait=False)  # a hung request keeps its thread; the soak goes on
        with self.lock:
            self.results[outcome] += 1

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        with self._engine() as engine:
            while not self.stop.is_set():
                self.ask(engine, rng.randrange(len(self.requests)))

    # ---- faults ------------------------------------------------------------------------------------------------

    def _db(self, statement: str, *args) -> list:
        con = sqlite3.connect(self.directory / "cache.db", timeout=30)
        try:
            with con:
                return con.execute(statement, args).fetchall()
        finally:
            con.close()

    def _row(self, key: str):
        rows = self._db("SELECT filename, size FROM Cache WHERE key = ? AND raw = 1", key)
        return rows[0] if rows else None

    def _rewrite(self, key: str, name: str, data: bytes) -> None:
        path = self.directory / name
        path.unlink(missing_ok=True)
        path.write_bytes(data)
        self._db("UPDATE Cache SET size = ? WHERE key = ?", len(data), key)

    def _forge(self, key: str, name: str, kind: str) -> None:
        path = self.directory / name
        data = path.read_bytes()
        sealer = codec.Sealer(None)
        _, _, tag_kind = codec.read_frame(data)
        header = codec.parse_header(data, sealer if tag_kind == codec.CHECKSUM else self._key_sealer())
        shape = header.shape
        kv = torch.randn(shape, generator=torch.Generator().manual_seed(self.rng.randrange(2**31)))
        kv = kv.to(header.kv_dtype)
        changes = {
            "forged-positions": dict(sink_ids=torch.arange(len(header.sink_ids) + 1)),
            "forged-token-ids": dict(token_ids=header.token_ids.flip(0) + 1),
            "forged-nan": dict(kv=kv.index_fill(2, torch.tensor([0]), float("nan"))),
            "forged-inf": dict(kv=kv.index_fill(2, torch.tensor([0]), float("-inf"))),
            "forged-dropped-head": dict(kv=kv[:, :, :, :1].contiguous()),
            "forged-doubled-layers": dict(kv=torch.cat([kv, kv])),
            "forged-model-fp": dict(fields={"model_fp": "0" * 64}),
            "forged-consistent": {},
        }[kind]
        # The forger has the codec, not the key: tags are recomputed with the checksum.
        self._rewrite(key, name, forged_bytes(header, changes.pop("kv", kv), sealer, **changes))

    def _key_sealer(self) -> codec.Sealer:
        return codec.Sealer(codec.derive_key(os.environ[KEY_ENV].encode()))

    def inject_entry_fault(self, kind: str, key: str, name: str) -> None:
        path = self.directory / name
        data = path.read_bytes()
        rng = self.rng
        if kind == "flip-header" or kind == "flip-data":
            header_size = codec.read_frame(data)[1]  # the padding after it is never read: no fault there
            lo, hi = (0, header_size) if kind == "flip-header" else (codec.ALIGN, len(data))
            damaged = bytearray(data)
            damaged[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
            self._rewrite(key, name, bytes(damaged))
        elif kind == "truncate":
            path.write_bytes(data[: rng.randrange(len(data))])  # the row keeps the old size
        elif kind == "zero-fill":
            self._rewrite(key, name, bytes(len(data)))
        elif kind == "append":
            self._rewrite(key, name, data + os.urandom(rng.randrange(1, 64)))
        elif kind == "delete-file":
            path.unlink()
        elif kind == "swap-values":
            others = self._db("SELECT filename FROM Cache WHERE raw = 1 AND filename IS NOT NULL AND key != ?", key)
            if not others:
                self._rewrite(key, name, bytes(len(data)))
                return
            other = rng.choice(others)[0]
            other_data = (self.directory / other).read_bytes()
            self._rewrite(key, name, other_data)
        elif kind == "other-model":
            self._rewrite(key, name, rng.choice(self.foreign).read_bytes())
        elif kind == "pickle-value":
            payload = pickle.dumps(Touch(str(self.sentinel)))
            self._db("UPDATE Cache SET mode = ?, filename = NULL, value = ? WHERE key = ?",
                     diskcache.core.MODE_PICKLE, payload, key)
        elif kind == "null-value":
            self._db("UPDATE Cache SET mode = ?, filename = NULL, value = NULL WHERE key = ?",
                     diskcache.core.MODE_RAW, key)
        elif kind == "size-column":
            self._db("UPDATE Cache SET size = ? WHERE key = ?", rng.choice([-1, 0, 10**12, len(data) + 1]), key)
        elif kind == "fifo":
            path.unlink()
            os.mkfifo(path, 0o600)
        elif kind == "sparse-20GiB":
            os.truncate(path, 20 * 2**30)
            self._db("UPDATE Cache SET size = ? WHERE key = ?", 20 * 2**30, key)
        elif kind == "symlink":
            others = [p for p in self.directory.rglob("*.val") if p != path and p.is_file()]
            path.unlink()
            path.symlink_to(rng.choice(others) if others else Path("/etc/hostname"))
        else:
            self._forge(key, name, kind)

    def inject_env_fault(self, kind: str) -> None:
        rng = self.rng
        if kind == "orphan-file":
            files = [p for p in self.directory.rglob("*.val") if p.is_file() and not p.is_symlink()]
            name = f"{rng.randrange(256):02x}/{rng.randrange(256):02x}/{os.urandom(14).hex()}.val"
            target = self.directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if files:
                shutil.copy(rng.choice(files), target)
            else:
                target.write_bytes(b"x" * 1000)
            old = time.time() - 3600
            os.utime(target, (old, old))
            self.pending_env.append((kind, target))
        elif kind == "settings-row":
            row = rng.choice(SETTINGS)
            self._db("INSERT OR REPLACE INTO Settings (key, value) VALUES (?, ?)", *row)
            self.pending_env.append((kind, row))
        elif kind == "pickle-key-row":
            payload = pickle.dumps(Touch(str(self.sentinel)))
            self._db("INSERT INTO Cache (key, raw, store_time, access_time, size, mode, filename, value)"
                     " VALUES (?, 0, 0, 0, 0, ?, NULL, ?)", payload + os.urandom(8), diskcache.core.MODE_PICKLE,
                     payload)
            self.pending_env.append((kind, None))
        elif kind == "junk-file":
            junk = self.directory / f"{rng.randrange(256):02x}" / f"junk-{os.urandom(4).hex()}"
            junk.parent.mkdir(parents=True, exist_ok=True)
            os.mkfifo(junk) if rng.random() < 0.5 else junk.write_bytes(b"junk")
            self.pending_env.append((kind, junk))

    def settle_env_faults(self) -> None:
        """Open the store once more (what a restarted engine does) and check every pending environment fault."""
        with KVStore(self.store):
            pass
        settings = dict(self._db("SELECT key, value FROM Settings"))
        for kind, what in self.pending_env:
            if kind == "orphan-file":
                ok = not what.exists()
            elif kind == "settings-row":  # dropped, or (a setting diskcache defines) overwritten with the pinned value
                ok = settings.get(what[0], object()) != what[1]
            else:  # planted pickles never ran; junk beside the entries is never read
                ok = not self.sentinel.exists()
            self.neutralised[kind] += ok
        self.pending_env.clear()

    def injector(self) -> None:
        kinds = ENTRY_FAULTS + (KEYED_ONLY if self.args.key else ())
        deadline = time.monotonic() + self.args.max_seconds
        with self._engine() as engine:
            total = 0
            while total < self.args.faults and time.monotonic() < deadline:
                total += 1
                if self.rng.random() < self.args.env_share:
                    kind = self.rng.choice(ENV_FAULTS)
                    self.inject_env_fault(kind)
                    self.faults[kind] += 1
                else:
                    self._entry_round(engine, self.rng.choice(kinds))
                if total % 25 == 0:
                    self.settle_env_faults()
                    print(f"  {total} faults, answers {dict(self.results)}", flush=True)
            self.settle_env_faults()
        self.stop.set()

    def _entry_round(self, engine: ProphetEngine, kind: str) -> None:
        index = self.rng.randrange(len(self.requests))
        self.ask(engine, index)  # its entries are stored now
        docs, query = self.requests[index]
        layout = engine.builder.layout(docs, query)
        ref = self.rng.choice([engine.cache.ref(ids, engine.sink_ids) for ids in layout.chunk_ids])
        row = self._row(ref.key)
        before = self.refusals()
        try:
            if row is None or row[0] is None:
                raise FileNotFoundError(ref.key)
            self.inject_entry_fault(kind, ref.key, row[0])
            self.last_fault = (kind, index)
        except FileNotFoundError:
            return  # a worker is re-storing this entry right now; the next round damages another one
        self.faults[kind] += 1
        self.ask(engine, index)
        # One fault in flight: a refusal by any engine (this one's read, or a worker's) is this fault's.
        self.detected[kind] += self.refusals() > before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="threads answering requests alongside the injector")
    parser.add_argument("--requests", type=int, default=16, help="distinct requests (3 of 10 documents each)")
    parser.add_argument("--key", action="store_true", help="configure an authentication key (forgeries included)")
    parser.add_argument("--env-share", type=float, default=0.15, help="share of faults outside the entries")
    parser.add_argument("--hang-seconds", type=float, default=120.0)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ[KEY_ENV] = "soak-key-" + "0123456789abcdef" * 3
    torch.set_num_threads(1)
    store_files.ORPHAN_GRACE_S = 60.0  # planted orphans are dated an hour back; a writer's file is seconds old
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="prophet-soak-") as tmp:
        soak = Soak(args, Path(tmp))
        workers = [threading.Thread(target=soak.worker, args=(1000 + i,), daemon=True) for i in range(args.workers)]
        for thread in workers:
            thread.start()
        soak.injector()
        for thread in workers:
            thread.join(args.hang_seconds)
        stuck = sum(thread.is_alive() for thread in workers)
        pickle_ran = soak.sentinel.exists()
    entry = sum(soak.faults[k] for k in ENTRY_FAULTS + KEYED_ONLY)
    env = sum(soak.faults[k] for k in ENV_FAULTS)
    mode = "with an authentication key" if args.key else "without a key (forgeries: inconsistent ones only)"
    print(f"\nsoak {mode}: {time.monotonic() - start:.0f} s, {args.workers} worker threads + injector")
    print(f"  {'fault':<24} {'injected':>8} {'detected':>8}")
    for kind in ENTRY_FAULTS + KEYED_ONLY + ENV_FAULTS:
        if soak.faults[kind]:
            caught = soak.detected[kind] if kind not in ENV_FAULTS else soak.neutralised[kind]
            print(f"  {kind:<24} {soak.faults[kind]:>8} {caught:>8}")
    print(f"\nfaults injected: {entry + env} ({entry} entry, {env} environment)")
    print(f"detected: {sum(soak.detected.values())} of {entry} entry faults refused on read; "
          f"neutralised: {sum(soak.neutralised.values())} of {env} environment faults")
    print(f"answers: {sum(soak.results.values())}, wrong answers: {soak.results['wrong']}, "
          f"crashes: {soak.results['crash']}, hangs: {soak.results['hang'] + stuck}, "
          f"planted pickle ran: {pickle_ran}")


if __name__ == "__main__":
    main()
