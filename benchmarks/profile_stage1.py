"""Per-phase time and launch counts of the question's pass (Stage I), the recomputation and a decode step.

    python benchmarks/profile_stage1.py --random-llama3-8b --device cuda --tokens 16000   # the issue's shape
    python benchmarks/profile_stage1.py --tokens 1000                                     # embedded model, CPU

Stage I two ways on the same stitched cache: the engine's path (`scoring.query_relevance`: forward_rows with one
fused stage1_attention call per layer) and `cuda_graphs.GraphedPasses` (the same pass captured as a CUDA graph;
eager on CPU). Then Stage II (forward_rows over the top `--ratio` of the
context plus the question), the question alone (what `reuse` runs) and one decode step, eager and graphed.
Per phase: median wall time over `--repeats` (CUDA synchronised), then one run under torch.profiler: GPU kernels
executed, host launch calls (cudaLaunchKernel, cuLaunchKernel, cudaGraphLaunch: what a graph saves) and top-level
aten ops.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from bench_ttft import make_documents, random_llama3_8b  # sibling script: python puts this folder on sys.path
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from prophet_rag import ProphetEngine, StoreConfig
from prophet_rag.compute.cuda_graphs import GraphedPasses
from prophet_rag.compute.scoring import query_relevance
from prophet_rag.compute.stitched import forward_rows
from prophet_rag.selection.request import budget_for, top_slots

LAUNCH_CALLS = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch"}


def timed(fn: Callable[[], object], repeats: int, cuda: bool) -> float:
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def counts(fn: Callable[[], object], cuda: bool) -> tuple[int, int, int]:
    """(GPU kernels executed, host launch calls, top-level aten ops) of one run of `fn`."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA)
    launches = sum(1 for e in events if e.name in LAUNCH_CALLS)
    ops = sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)
    return kernels, launches, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--random-llama3-8b", action="store_true", help="Llama-3-8B shape, random bf16 weights")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --random-llama3-8b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=4000, help="context tokens (documents only)")
    parser.add_argument("--doc-tokens", type=int, default=250)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as store_dir, torch.inference_mode():
        store = StoreConfig(directory=store_dir, size_limit_bytes=64 * 2**30, max_entry_bytes=8 * 2**30)
        if args.random_llama3_8b:
            model, tokenizer = random_llama3_8b(args.device, args.tokenizer)
            engine = ProphetEngine(model, tokenizer, store=store, hot_cache_bytes=64 * 2**30)
        else:
            engine = ProphetEngine.from_pretrained(args.model, device=args.device, store=store,
                                                   hot_cache_bytes=64 * 2**30)
        adapter = engine.adapter
        docs = make_documents(engine.tokenizer, args.tokens, args.doc_tokens)
        layout = engine.builder.layout(docs, "Which clerk kept the keys to archive room 121?")
        order = list(range(len(layout.chunk_ids)))
        cache, _ = engine.prefiller.assemble(layout, order, layout.total_tokens + 64)
        suffix = cache.append_tokens(layout.suffix_ids.to(adapter.device))
        passes = GraphedPasses(adapter, cache)
        scores = query_relevance(adapter, cache, suffix, "prophet", None)
        selected = top_slots(scores, budget_for(args.ratio, int(scores.numel())), cache.prefix_len)
        stage2_rows = torch.cat([selected, suffix])

        phases: dict[str, Callable[[], object]] = {
            "stage1 (fused kernel)": lambda: query_relevance(adapter, cache, suffix, "prophet", None),
            "stage1 graphed": lambda: passes.stage1(suffix, "prophet", None),
            "stage2 recompute": lambda: forward_rows(adapter, cache, stage2_rows),
            "question only (reuse)": lambda: forward_rows(adapter, cache, suffix),
            "question only graphed": lambda: passes.forward(suffix),
        }
        results = {}
        for name, fn in phases.items():
            fn()  # warm-up: Triton compiles, graphs are captured
            results[name] = (timed(fn, args.repeats, cuda), *counts(fn, cuda))
        # Decode: the token's slot is rewritten by every run, so repeating it is harmless.
        forward_rows(adapter, cache, suffix)
        row = cache.append_tokens(torch.tensor([int(layout.suffix_ids[-1])], device=adapter.device))
        for name, fn in (("decode step", lambda: forward_rows(adapter, cache, row)),
                         ("decode graphed", lambda: passes.forward(row))):
            fn()
            results[name] = (timed(fn, args.repeats, cuda), *counts(fn, cuda))

        device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
        print(f"{engine.model_name} on {device}; context {layout.context_tokens} tokens, question "
              f"{suffix.numel()} tokens, ratio {args.ratio} ({selected.numel()} rows); median of {args.repeats}\n")
        print(f"{'phase':<24}{'ms':>10}{'GPU kernels':>13}{'launch calls':>14}{'aten ops':>10}")
        for name, (seconds, kernels, launches, ops) in results.items():
            print(f"{name:<24}{1e3 * seconds:>10.2f}{kernels:>13}{launches:>14}{ops:>10}")
        engine.close()


if __name__ == "__main__":
    main()
