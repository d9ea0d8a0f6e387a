"""Time the Triton query-path kernels against their torch references on a CUDA device.

Sizes default to Llama-3-8B (32 layers, 32 query heads, 8 KV heads, head_dim 128), contexts of 8K and 16K tokens,
64 question tokens and 20% of the context recomputed. Each measurement is the median of `--repeats` runs timed with
CUDA events after `--warmup` runs, with the L2 cache flushed before every run. Without CUDA it says so and exits 0.

    python benchmarks/bench_kernels.py [--contexts 8192 16384] [--dtype bf16] [--peak-gbs 3350] [--queries 21]

stage1_attention also times `separate`: the two kernels it fuses (sparse_attention + query_scores), one after the
other on the same inputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch

from prophet_rag.kernels.query_scores import query_scores_ref, query_scores_triton
from prophet_rag.kernels.rope_shift import rope_shift_ref, rope_shift_triton
from prophet_rag.kernels.sparse_attention import sparse_attention_ref, sparse_attention_torch, sparse_attention_triton
from prophet_rag.kernels.stage1_attention import stage1_attention_ref, stage1_attention_triton

KERNELS = ("rope_shift", "query_scores", "sparse_attention", "stage1_attention")


def median_ms(fn: Callable[[], object], warmup: int, repeats: int, flush: torch.Tensor) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        flush.zero_()  # evict the previous run's data from L2 (50 MiB on an H100): every run starts cold
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


def bench_rope_shift(args, n: int, timer) -> list[tuple]:
    """All layers' keys of a `[L, 2, N, Hkv, D]` cache, shifted by a per-chunk delta (in place, read + write)."""
    kv = torch.randn(args.layers, 2, n, args.kv_heads, args.head_dim, device="cuda", dtype=args.dtype)
    keys = kv[:, 0]
    delta = torch.randint(-20000, 20000, (n // 512 + 1,))[torch.arange(n) // 512].cuda()  # 512-token chunks
    freq = 1.0 / 500000.0 ** (torch.arange(0, args.head_dim, 2, device="cuda", dtype=torch.float32) / args.head_dim)
    expected, actual = keys.clone(), keys.clone()
    rope_shift_ref(expected, delta, freq)
    rope_shift_triton(actual, delta, freq)
    err = rel_err(actual, expected)
    moved = 2 * keys.numel() * keys.element_size()
    rows = []
    for name, fn in (("triton", rope_shift_triton), ("torch", rope_shift_ref)):
        ms = timer(lambda fn=fn: fn(keys, delta, freq))
        gbs = moved / ms / 1e6
        peak = f" ({100 * gbs / args.peak_gbs:.0f}% of peak)" if args.peak_gbs else ""
        rows.append((name, ms, f"{gbs:8.0f} GB/s{peak}", err))
    return rows


def bench_query_scores(args, n: int, timer) -> list[tuple]:
    """One layer: S question tokens against N context keys. TFLOP/s counts one Q.K^T (the kernel computes it twice)."""
    q = torch.randn(args.queries, args.q_heads, args.head_dim, device="cuda", dtype=args.dtype)
    k = torch.randn(n, args.kv_heads, args.head_dim, device="cuda", dtype=args.dtype)
    scale = args.head_dim**-0.5
    outs = {name: (torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")) for name in ("triton", "torch")}
    query_scores_ref(q, k, scale, *outs["torch"])
    query_scores_triton(q, k, scale, *outs["triton"])
    err = max(rel_err(a, e) for a, e in zip(outs["triton"], outs["torch"], strict=True))
    flops = 2 * args.queries * args.q_heads * n * args.head_dim
    rows = []
    for name, fn in (("triton", query_scores_triton), ("torch", query_scores_ref)):
        ms = timer(lambda fn=fn, name=name: fn(q, k, scale, *outs[name]))
        rows.append((name, ms, f"{flops / ms / 1e9:8.1f} TFLOP/s", err))
    return rows


def bench_sparse_attention(args, n: int, timer) -> list[tuple]:
    """One layer: a random `--recompute` fraction of the N positions (unsorted) attends to all keys before it."""
    rows_n = int(n * args.recompute)
    q_pos = torch.randperm(n, device="cuda")[:rows_n]
    k_pos = torch.arange(n, device="cuda")
    q = torch.randn(rows_n, args.q_heads, args.head_dim, device="cuda", dtype=args.dtype)
    k, v = (torch.randn(n, args.kv_heads, args.head_dim, device="cuda", dtype=args.dtype) for _ in range(2))
    scale = args.head_dim**-0.5
    err = rel_err(
        sparse_attention_triton(q, k, v, q_pos, k_pos, scale), sparse_attention_ref(q, k, v, q_pos, k_pos, scale)
    )
    flops = 4 * args.q_heads * args.head_dim * float((q_pos + 1).sum())  # Q.K^T and P.V over the visible keys
    rows = []
    for name, fn in (("triton", sparse_attention_triton), ("torch", sparse_attention_torch)):
        ms = timer(lambda fn=fn: fn(q, k, v, q_pos, k_pos, scale))
        rows.append((name, ms, f"{flops / ms / 1e9:8.1f} TFLOP/s", err))
    return rows


def bench_stage1_attention(args, n: int, timer) -> list[tuple]:
    """One Stage I layer: S question tokens after N context keys; output over all N + S keys and both scores.

    `triton` is the fused kernel; `separate` is what it replaces, sparse_attention_triton then query_scores_triton.
    TFLOP/s counts the attention (Q.K^T + P.V over N + S keys) plus one Q.K^T over the context.
    """
    s, keys = args.queries, n + args.queries
    q = torch.randn(s, args.q_heads, args.head_dim, device="cuda", dtype=args.dtype)
    k, v = (torch.randn(keys, args.kv_heads, args.head_dim, device="cuda", dtype=args.dtype) for _ in range(2))
    k_pos = torch.arange(keys, device="cuda")
    q_pos = k_pos[n:]
    scale = args.head_dim**-0.5
    outs = {name: (torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")) for name in ("triton", "torch")}

    def separate(prophet, norm):
        out = sparse_attention_triton(q, k, v, q_pos, k_pos, scale)
        query_scores_triton(q, k[:n], scale, prophet, norm)
        return out

    def fused(prophet, norm):
        return stage1_attention_triton(q, k, v, q_pos, k_pos, scale, n, prophet, norm)

    def reference(prophet, norm):
        return stage1_attention_ref(q, k, v, q_pos, k_pos, scale, n, prophet, norm)

    got, expected = fused(*outs["triton"]), reference(*outs["torch"])
    err = max(rel_err(a, e) for a, e in zip((got, *outs["triton"]), (expected, *outs["torch"]), strict=True))
    flops = 2 * s * args.q_heads * args.head_dim * (2 * keys + n)
    rows = []
    for name, fn in (("triton", fused), ("separate", separate), ("torch", reference)):
        ms = timer(lambda fn=fn: fn(*outs["triton"]))
        rows.append((name, ms, f"{flops / ms / 1e9:8.1f} TFLOP/s", err))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--contexts", nargs="+", type=int, default=[8192, 16384])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=64, help="question tokens for query_scores, stage1_attention")
    parser.add_argument("--recompute", type=float, default=0.2, help="fraction of rows for sparse_attention")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--peak-gbs", type=float, default=None, help="device memory bandwidth, for rope_shift's %%")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device, nothing to time (the Triton kernels target GPUs). Skipped.")
        return 0
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    torch.manual_seed(0)
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    timer = lambda fn: median_ms(fn, args.warmup, args.repeats, flush)  # noqa: E731
    benches = {
        "rope_shift": bench_rope_shift,
        "query_scores": bench_query_scores,
        "sparse_attention": bench_sparse_attention,
        "stage1_attention": bench_stage1_attention,
    }
    print(f"device: {torch.cuda.get_device_name()}  dtype: {args.dtype}  median of {args.repeats} (L2 flushed)")
    print(f"{'kernel':<17} {'context':>7} {'impl':<8} {'ms':>9} {'throughput':<28} {'speedup':>8} {'rel err':>9}")
    for kernel in args.kernels:
        for n in args.contexts:
            rows = benches[kernel](args, n, timer)
            ref_ms = next(ms for name, ms, _, _ in rows if name == "torch")
            for name, ms, throughput, err in rows:
                print(f"{kernel:<17} {n:>7} {name:<8} {ms:9.3f} {throughput:<28} {ref_ms / ms:7.2f}x {err:9.2e}")
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
