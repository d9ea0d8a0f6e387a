"""Ingest throughput: `cache ingest` in this process, and on a local Ray instance with 1 and with 2 workers.

    python benchmarks/bench_ingest.py                          # embedded SmolLM2-135M, 48 documents of ~300 tokens
    python benchmarks/bench_ingest.py --docs 200 --doc-tokens 500 --model path/to/model

A corpus of deterministic filler documents (bench_ttft.make_documents) is written as .txt files and ingested four
times, each into an empty store: by `ingest.ingest_files` with one engine in this process, on torch's default threads
and on 1 thread (what each of 2 workers gets), then by `ingest.ingest_files_on_ray` with 1 worker on all CPUs and
with 2 workers sharing them. tokens/s is the chunks' tokens over the compute phase (first chunk handed to prefill
to last result; model loading and Ray start-up not counted, they are in the total). Every run must store the same
keys; entries computed on the same number of torch threads are compared byte for byte (CPU kernels split float
reductions by thread count).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from pathlib import Path

import torch
from bench_ttft import make_documents  # sibling script: python puts this folder on sys.path

from prophet_rag import ProphetEngine, StoreConfig, ingest


def _entries(directory: Path) -> dict[str, bytes]:
    con = sqlite3.connect(directory / "cache.db")
    try:
        rows = con.execute("SELECT key, filename FROM Cache WHERE raw = 1").fetchall()
    finally:
        con.close()
    return {key: (directory / name).read_bytes() for key, name in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--docs", type=int, default=48, help="documents in the corpus")
    parser.add_argument("--doc-tokens", type=int, default=300, help="tokens per document (about)")
    args = parser.parse_args()
    ray = ingest.import_ray()
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        corpus = root / "corpus"
        corpus.mkdir()
        rows = []
        default_threads = torch.get_num_threads()
        for threads in sorted({default_threads, 1}, reverse=True):
            # One thread too: what each of the 2 workers runs on, so Ray's scaling shows apart from threading's.
            torch.set_num_threads(threads)
            store = root / f"single-{threads}"
            start = time.perf_counter()
            with ProphetEngine.from_pretrained(args.model, store=StoreConfig(directory=store)) as engine:
                load_s = time.perf_counter() - start
                if not rows:
                    # make_documents stops at a token total; ask for twice the corpus and keep --docs documents.
                    docs = make_documents(engine.tokenizer, 2 * args.docs * args.doc_tokens, args.doc_tokens)
                    for i, text in enumerate(docs[: args.docs]):
                        (corpus / f"doc-{i:05d}.txt").write_text(text, encoding="utf-8")
                    files = ingest.text_files(corpus)
                summary = ingest.ingest_files(engine, files, show_progress=False)
            summary.total_s += load_s
            rows.append(("single process", 1, threads, summary, store))
        torch.set_num_threads(default_threads)
        single = rows[0][3]
        ingest.connect(ray, None, cpus)
        try:
            for workers in (1, 2):
                per_worker = max(1, cpus // workers)
                store = root / f"ray-{workers}"
                summary = ingest.ingest_files_on_ray(files, args.model, StoreConfig(directory=store), workers=workers,
                                                     cpus_per_worker=per_worker, show_progress=False)
                rows.append((f"Ray, {workers} worker{'s' * (workers > 1)}", workers, per_worker, summary, store))
        finally:
            ray.shutdown()
        print(f"{len(files)} documents, {single.tokens} tokens; {cpus} CPUs on this machine; "
              f"model {args.model or 'embedded SmolLM2-135M-Instruct'}\n")
        print(f"{'run':<16} {'torch threads':<15} {'chunks':>6} {'tokens':>7} {'compute s':>9} {'tokens/s':>9} "
              f"{'total s':>8}")
        for label, processes, per_process, summary, _ in rows:
            layout = f"{processes} x {per_process}"
            print(f"{label:<16} {layout:<15} {summary.computed:>6} {summary.tokens:>7} {summary.compute_s:>9.2f} "
                  f"{summary.tokens_per_s:>9.0f} {summary.total_s:>8.1f}")
        stored = [_entries(store) for *_, store in rows]
        same_keys = all(set(found) == set(stored[0]) for found in stored)
        print(f"\nsame keys in every store: {same_keys}")
        by_threads = {per_process: found for (label, _, per_process, _, _), found in zip(rows, stored, strict=True)
                      if label == "single process"}
        for (label, _, per_process, _, _), found in zip(rows, stored, strict=True):
            if label != "single process":
                print(f"{label}: entries byte-identical to the single-process run's on {per_process} thread(s): "
                      f"{found == by_threads[per_process]}")
        if not same_keys or any(row[3].failed for row in rows):
            raise SystemExit("a run stored other keys or failed files")


if __name__ == "__main__":
    main()
