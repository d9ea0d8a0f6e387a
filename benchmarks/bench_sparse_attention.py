"""CPU time of the torch path `sparse_attention_torch` at SmolLM2-135M's shapes by rows per block (each block over
the keys up to its last row's position, those before its first row without a mask), and with the blocks the cost
model picks (`auto`, what the engine runs), against one plain causal attention over every row.

    python benchmarks/bench_sparse_attention.py --threads 2
    python benchmarks/bench_sparse_attention.py --positions rows.pt   # a saved `[rows]` int64 tensor of positions

Rows are drawn as ProphetKV picks them at 4K tokens: mostly runs of neighbouring tokens, denser towards the question
at the end (`recency`), or spread evenly (`uniform`). Plans are interleaved, each timed `--repeats` times; medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from prophet_rag.kernels.sparse_attention import plan_attention, sparse_attention_torch


def row_positions(kind: str, keys: int, rows: int, suffix: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted positions of `rows` context rows plus the last `suffix` positions (the question)."""
    context = keys - suffix
    if kind == "uniform":
        picked = torch.randperm(context, generator=gen)[:rows]
    else:  # weight rising with the square of the position, in runs of 4 neighbouring tokens
        runs = context // 4
        weight = (torch.arange(runs, dtype=torch.float64) + 1) ** 2
        starts = torch.multinomial(weight, rows // 4, replacement=False, generator=gen) * 4
        picked = (starts[:, None] + torch.arange(4)).flatten()
    return torch.cat([picked.sort().values, torch.arange(context, keys)])


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=4291)
    parser.add_argument("--rows", type=int, default=845)
    parser.add_argument("--suffix", type=int, default=21)
    parser.add_argument("--heads", default="9,3,64", help="query heads, KV heads, head dim")
    parser.add_argument("--blocks", default="auto,64,128,256,512",
                        help="rows per block, or auto: the partition the cost model picks (the engine's)")
    parser.add_argument("--positions", default=None, help="a torch.save'd `[rows]` tensor of row positions")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    q_heads, kv_heads, dim = (int(x) for x in args.heads.split(","))
    gen = torch.Generator().manual_seed(0)
    k_pos = torch.arange(args.keys)
    layouts = {"file": torch.load(args.positions)} if args.positions else {
        kind: row_positions(kind, args.keys, args.rows, args.suffix, gen) for kind in ("recency", "uniform")}
    k, v = torch.randn(args.keys, kv_heads, dim, generator=gen), torch.randn(args.keys, kv_heads, dim, generator=gen)
    scale = dim**-0.5
    causal_q = torch.randn(1, q_heads, args.keys, dim, generator=gen)
    kt, vt = k.transpose(0, 1)[None].contiguous(), v.transpose(0, 1)[None].contiguous()
    full = timed(lambda: F.scaled_dot_product_attention(causal_q, kt, vt, is_causal=True, scale=scale,
                                                        enable_gqa=True), args.repeats)
    print(f"keys {args.keys}, heads {q_heads}/{kv_heads}, dim {dim}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; causal attention over all {args.keys} rows: {full * 1e3:.1f} ms")
    for name, q_pos in layouts.items():
        q = torch.randn(q_pos.numel(), q_heads, dim, generator=gen)
        plans = {b: plan_attention(q_pos, k_pos, q.dtype, q_heads // kv_heads, kv_heads,
                                   None if b == "auto" else int(b)) for b in args.blocks.split(",")}
        times: dict[str, list[float]] = {b: [] for b in plans}
        for _ in range(args.repeats):  # plans interleaved
            for block, plan in plans.items():
                times[block].append(timed(partial(sparse_attention_torch, q, k, v, q_pos, k_pos, scale, plan), 1))
        for block, plan in plans.items():
            keys = sum(int(q_pos[b.rows].numel()) * b.keys for b in plan.blocks) / q_pos.numel()
            median = statistics.median(times[block])
            print(f"{name:8} rows {q_pos.numel():5} block {block:>4} ({len(plan.blocks):2} blocks, mean keys per row "
                  f"{keys:6.0f}, exact {float(q_pos.float().mean()) + 1:6.0f}) {median * 1e3:7.2f} ms "
                  f"({median / full:.3f} x causal)")


if __name__ == "__main__":
    main()
