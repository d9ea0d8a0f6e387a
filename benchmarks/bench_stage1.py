"""CPU time of one layer's Stage I (`stage1_attention`): the two reference ops against the fused torch path.

    python benchmarks/bench_stage1.py --threads 2                 # SmolLM2-135M's heads, 21 question rows, 4K keys
    python benchmarks/bench_stage1.py --keys 8213 --context 8192

The two are interleaved, each call timed alone, `--repeats` times; medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prophet_rag.kernels.sparse_attention import plan_attention
from prophet_rag.kernels.stage1_attention import stage1_attention_ref, stage1_attention_torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=4291)
    parser.add_argument("--context", type=int, default=4270)
    parser.add_argument("--rows", type=int, default=21)
    parser.add_argument("--heads", default="9,3,64", help="query heads, KV heads, head dim")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    q_heads, kv_heads, dim = (int(x) for x in args.heads.split(","))
    gen = torch.Generator().manual_seed(0)
    k_pos, q_pos = torch.arange(args.keys), torch.arange(args.keys - args.rows, args.keys)
    q = torch.randn(args.rows, q_heads, dim, generator=gen)
    kv = torch.randn(args.keys, 2, kv_heads, dim, generator=gen)  # K and V interleaved, as in the stitched cache
    k, v, scale = kv[:, 0], kv[:, 1], dim**-0.5
    plan = plan_attention(q_pos, k_pos, q.dtype, q_heads // kv_heads, kv_heads)
    prophet = torch.zeros(args.context)
    paths = {"reference": lambda: stage1_attention_ref(q, k, v, q_pos, k_pos, scale, args.context, prophet, None),
             "torch": lambda: stage1_attention_torch(q, k, v, q_pos, k_pos, scale, args.context, prophet, None,
                                                     plan=plan)}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for fn in paths.values():
        fn()
    for _ in range(args.repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(f"rows {args.rows}, keys {args.keys}, context {args.context}, heads {q_heads}/{kv_heads}, dim {dim}, "
          f"{torch.get_num_threads()} threads")
    base = statistics.median(times["reference"])
    for name, ts in times.items():
        print(f"{name:10} {statistics.median(ts) * 1e3:7.2f} ms  {statistics.median(ts) / base:.3f} x reference")


if __name__ == "__main__":
    main()
