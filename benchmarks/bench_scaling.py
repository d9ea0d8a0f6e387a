"""TTFT and peak memory of each method as the context grows, against the prefill `model.generate` runs (issue 23).

    python benchmarks/bench_scaling.py                    # embedded SmolLM2-135M, 1K/2K/4K/8K tokens, CPU
    python benchmarks/bench_scaling.py --model PATH --lengths 2048,4096 --out docs/results/ttft-scaling/qwen

Each length L is a prompt of at most L - 1 tokens (the prompt and the one generated token fit a window of L), built
from bench_ttft's filler documents: whole documents of about `--doc-tokens` tokens, as many as fit. The methods are
bench_ttft's runners: `hf_last` is `model(input_ids, logits_to_keep=1)` on the engine's prompt ids (the prefill
`generate` runs, the baseline of every ratio), the others the engine's `answer` for one token against a warm store.

Time: one process for all lengths runs every method once untimed at the first length (allocator, thread pools,
first-call set-up; the store is warm at every length, its chunks just ingested), then at each length `--repeats`
rounds with the methods interleaved, so a noisy shared machine slows them alike; the table shows medians.

Memory: peak resident set size (RSS), measured in a fresh subprocess per (length, method), because in one shared
process the peak of a method cannot be told apart from memory an earlier method left in the allocator's free lists.
The subprocess loads the engine on the same (already warm) store, builds the same prompt, makes the weights resident
and runs `hf_last` once on the prompt's first 32 tokens (the runtime's first-call set-up). Then it resets the
kernel's high-water mark (writing 5 to /proc/self/clear_refs sets VmHWM to the current VmRSS, Linux >= 4.0), reads
VmRSS as the baseline, runs the method once and reads VmHWM: the exact peak RSS of that run, with no sampling gap.
The table shows that peak (the whole process: weights, runtime and the method's own memory), the peak above the
baseline, and the peak's ratio to `hf_last`'s at the same length. RSS counts file pages the process maps (store
reads through mmap) as well as its own allocations. The method's run in the subprocess is its first on this prompt,
so one-time allocations of its code path count: an upper bound on a warm run's peak.

Writes OUT.json (every run's time, the medians, the memory figures, the machine's load average) and OUT.png (ratio to
hf_last against length, and TTFT against length, per method).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from bench_ttft import BASELINES, QUERY, make_documents, run_method  # sibling script: its folder is on sys.path

from prophet_rag import ProphetEngine, StoreConfig, methods

BASELINE = "hf_last"
DEFAULT_METHODS = "hf_last,full,reuse,prophet,prophet_focus"
DEFAULT_LENGTHS = "1024,2048,4096,8192"
_MB = 2**20


# ---- arguments ----------------------------------------------------------------------------------------------------

def parse_lengths(text: str) -> list[int]:
    """Comma list of context lengths in tokens, each >= 64, returned sorted without repeats."""
    try:
        lengths = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--lengths takes token counts separated by commas, e.g. 1024,2048; got {text!r}") from None
    if not lengths or lengths[0] < 64:
        raise ValueError(f"--lengths needs at least one length, each >= 64 tokens; got {text!r}")
    return lengths


def parse_methods(text: str) -> list[str]:
    """Comma list of methods: Hugging Face baselines or the engine's methods; `hf_last` must be among them."""
    chosen = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    known = set(BASELINES) | set(methods.REGISTRY)
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    if BASELINE not in chosen:
        raise ValueError(f"--methods must include {BASELINE}: every ratio is against it")
    return chosen


# ---- peak RSS -----------------------------------------------------------------------------------------------------

def status_bytes(status_text: str, field: str) -> int:
    """A memory field of /proc/<pid>/status (given in kB there) in bytes."""
    found = re.search(rf"^{field}:\s+(\d+) kB$", status_text, re.MULTILINE)
    if found is None:
        raise ValueError(f"no {field} line in the process status")
    return int(found.group(1)) * 1024


def _own_status(field: str) -> int:
    return status_bytes(Path("/proc/self/status").read_text(), field)


@dataclass(frozen=True)
class PeakRss:
    base_bytes: int
    """VmRSS when the high-water mark was reset, just before the measured call."""
    peak_bytes: int
    """VmHWM after the call: the most resident memory the process held during it."""

    @property
    def above_base_bytes(self) -> int:
        return self.peak_bytes - self.base_bytes


def peak_rss(call) -> tuple[object, PeakRss]:
    """Run `call()` with the kernel's RSS high-water mark reset just before it; its result and the peak."""
    Path("/proc/self/clear_refs").write_text("5")
    base = _own_status("VmRSS")
    result = call()
    return result, PeakRss(base, _own_status("VmHWM"))


# ---- the summary --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    length: int
    method: str
    median_s: float
    x_hf_last: float
    peak_mb: float | None
    above_base_mb: float | None
    peak_x_hf_last: float | None


def summarize(length: int, times: dict[str, list[float]], peaks: dict[str, PeakRss] | None) -> list[Row]:
    """One row per method: median TTFT, its ratio to hf_last's median, peak RSS and its ratio to hf_last's."""
    medians = {m: statistics.median(t) for m, t in times.items()}
    rows = []
    for method, median in medians.items():
        if peaks:
            rss = peaks[method]
            memory = (rss.peak_bytes / _MB, rss.above_base_bytes / _MB, rss.peak_bytes / peaks[BASELINE].peak_bytes)
        else:
            memory = (None, None, None)
        rows.append(Row(length, method, median, median / medians[BASELINE], *memory))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [f"{'length':>7} {'method':<14}{'TTFT s':>9}{'x hf_last':>11}{'peak RSS MB':>13}{'above base':>12}"
             f"{'peak x hf_last':>16}"]
    for r in rows:
        memory = (f"{r.peak_mb:>13.0f}{r.above_base_mb:>12.0f}{r.peak_x_hf_last:>16.3f}" if r.peak_mb is not None
                  else f"{'-':>13}{'-':>12}{'-':>16}")
        lines.append(f"{r.length:>7} {r.method:<14}{r.median_s:>9.3f}{r.x_hf_last:>11.3f}{memory}")
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ratio_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = record["lengths"]
    for method in record["methods"]:
        prompts = [run["prompt_tokens"] for run in runs]
        ratio_ax.plot(prompts, [run["methods"][method]["x_hf_last"] for run in runs], marker="o", label=method)
        time_ax.plot(prompts, [run["methods"][method]["median_s"] for run in runs], marker="o", label=method)
    for ax in (ratio_ax, time_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.grid(True, alpha=0.3)
    ratio_ax.set_ylabel("TTFT / hf_last TTFT")
    time_ax.set_ylabel("median TTFT (s)")
    time_ax.set_yscale("log")
    ratio_ax.legend(fontsize=8)
    fig.suptitle(f"{record['model']}, {record['device']}, ratio {record['ratio']}, "
                 f"median of {record['repeats']} interleaved repeats", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- runs ---------------------------------------------------------------------------------------------------------

def documents_for(engine: ProphetEngine, length: int, doc_tokens: int) -> tuple[list[str], torch.Tensor]:
    """Whole filler documents, as many as keep the prompt (with the query) under `length` tokens, and its ids."""
    if length > engine.context_window:
        raise ValueError(f"length {length} is over {engine.model_name}'s context window of {engine.context_window} "
                         "tokens; drop it from --lengths")
    docs = make_documents(engine.tokenizer, length, doc_tokens)
    while docs:
        ids = engine.builder.layout(docs, QUERY).joined_ids()
        if ids.numel() < length:
            return docs, ids[None]
        docs.pop()
    raise ValueError(f"no document of about {doc_tokens} tokens fits a prompt under {length} tokens; "
                     "lower --doc-tokens or raise the length")


def open_engine(model: str | None, store_dir: str) -> ProphetEngine:
    return ProphetEngine.from_pretrained(model, device="cpu", store=StoreConfig(directory=store_dir))


def time_methods(engine: ProphetEngine, chosen: list[str], docs: list[str], ids: torch.Tensor, ratio: float,
                 repeats: int, warm_up: bool) -> dict[str, list[float]]:
    if warm_up:  # untimed: allocator, thread pools, each method's first-call set-up
        for method in chosen:
            run_method(engine, method, docs, QUERY, ids, ratio)
    times: dict[str, list[float]] = {m: [] for m in chosen}
    for _ in range(repeats):
        for method in chosen:
            times[method].append(run_method(engine, method, docs, QUERY, ids, ratio)[0])
    return times


def probe(args: argparse.Namespace) -> None:
    """The subprocess side of the memory measurement: one run of one method, its peak RSS printed as JSON."""
    engine = open_engine(args.model, args.store)
    docs, ids = documents_for(engine, args.probe_length, args.doc_tokens)
    with torch.inference_mode():
        for parameter in engine.adapter.model.parameters():
            parameter.sum()  # every weight page resident before the baseline is read
    run_method(engine, BASELINE, docs, QUERY, ids[:, :32], args.ratio)  # the runtime's first-call set-up, cheaply
    (_, stats), peak = peak_rss(lambda: run_method(engine, args.probe_method, docs, QUERY, ids, args.ratio))
    engine.close()
    if stats is not None and stats.cache_misses:
        raise RuntimeError(f"{args.probe_method} missed {stats.cache_misses} chunks: the store was not warm")
    print(json.dumps(asdict(peak)))


def measure_peak(args: argparse.Namespace, store_dir: str, length: int, method: str) -> PeakRss:
    command = [sys.executable, __file__, "--probe-method", method, "--probe-length", str(length), "--store", store_dir,
               "--ratio", str(args.ratio), "--doc-tokens", str(args.doc_tokens), "--threads", str(args.threads)]
    if args.model:
        command += ["--model", args.model]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the memory probe for {method} at {length} tokens failed:\n{done.stderr[-3000:]}")
    return PeakRss(**json.loads(done.stdout.strip().splitlines()[-1]))


def run(args: argparse.Namespace) -> dict:
    chosen = parse_methods(args.methods)
    lengths = parse_lengths(args.lengths)
    record: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "methods": chosen,
                    "ratio": args.ratio, "repeats": args.repeats, "torch": torch.__version__,
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores", "lengths": []}
    with tempfile.TemporaryDirectory() as store_dir:
        engine = open_engine(args.model, store_dir)
        record["model"] = engine.model_name
        record["device"] = f"CPU, {torch.get_num_threads()} threads"
        print(f"model {engine.model_name} on {record['device']}; torch {torch.__version__}; ratio {args.ratio}, "
              f"median of {args.repeats} interleaved repeats", flush=True)
        for length in lengths:
            docs, ids = documents_for(engine, length, args.doc_tokens)
            engine.ingest(docs)
            load_before = os.getloadavg()
            started = time.perf_counter()
            times = time_methods(engine, chosen, docs, ids, args.ratio, args.repeats, warm_up=not record["lengths"])
            timed_s = time.perf_counter() - started
            peaks = None if args.no_memory else {m: measure_peak(args, store_dir, length, m) for m in chosen}
            rows = summarize(length, times, peaks)
            print(f"\n{length} tokens: prompt {ids.numel()}, {len(docs)} documents, timing {timed_s:.0f} s, "
                  f"load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
            print(format_table(rows), flush=True)
            record["lengths"].append({
                "length": length, "prompt_tokens": int(ids.numel()), "documents": len(docs), "timing_s": timed_s,
                "load_average_before": load_before, "load_average_after": os.getloadavg(),
                "methods": {r.method: {"times_s": times[r.method], "median_s": r.median_s, "x_hf_last": r.x_hf_last,
                                       **({"rss": asdict(peaks[r.method]), "peak_x_hf_last": r.peak_x_hf_last}
                                          if peaks else {})}
                            for r in rows}})
            if args.out:  # after every length, so a run stopped early keeps what it measured
                save(record, args.out)
        engine.close()
    return record


def save(record: dict, out: str) -> None:
    json_path, png_path = Path(out + ".json"), Path(out + ".png")  # not with_suffix: names may hold dots (qwen2.5)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, png_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma list of context lengths in tokens")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list; must include {BASELINE}")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--doc-tokens", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="time only, no peak-RSS subprocesses")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    parser.add_argument("--probe-method", help=argparse.SUPPRESS)
    parser.add_argument("--probe-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe_method:
        probe(args)
        return
    try:
        parse_methods(args.methods)
        parse_lengths(args.lengths)
    except ValueError as error:
        parser.error(str(error))
    run(args)
    if args.out:
        print(f"\nwrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
