"""Is the choice of tokens what keeps ProphetKV@0.2 from full prefill on real passages? Selections that know what
ProphetKV cannot, run through the bench beside it (issue 24):

- `oracle_kv`: the tokens whose reused K and V deviate most from full prefill's, summed over layers (each layer's
  squared error over its mean squared norm), computed from a full prefill of the same ids inside the plan;
- `oracle_v`: the same on V alone (CacheBlend's criterion, at every layer and exact instead of at one check layer);
- `oracle_impact`: ProphetKV's attention score times that V deviation (the error a stale token puts into the
  question's attention output, to first order);
- `pstarts2`, `pstarts8`, `pstarts32`: ProphetKV with the first 2, 8 or 32 tokens of every chunk forced in (EPIC's
  observation that a chunk's first tokens deviate most), the rest of the budget by ProphetKV's scores.

    python oracle_selection.py bench --dataset musique musique_s.json --model QWEN_DIR --max-new-tokens 12 \\
        --no-plot --ratios 0.2 --methods full,prophet,oracle_kv,oracle_v,oracle_impact --store S --out OUT

The methods are registered for this process only (the arguments are `prophet-rag`'s); the oracles cost a full
prefill each, so their TTFT means nothing.
"""

from __future__ import annotations

import sys

import torch

import prophet_rag.bench.cli as bench_cli
import prophet_rag.bench.runner as bench_runner
import prophet_rag.methods as methods
from prophet_rag.cli import main
from prophet_rag.compute.scoring import query_relevance
from prophet_rag.selection.request import selected, top_slots

HERE = "__main__" if __name__ == "__main__" else __name__


def _full_kv(selection, cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, full prefill's K and V `[tokens, kv_heads, head_dim]` over the cache's ids at its positions."""
    ids, positions = cache.token_ids[: cache.length], cache.positions[: cache.length]
    with torch.inference_mode():
        out = selection.adapter.model(ids[None], position_ids=positions[None], use_cache=True, logits_to_keep=1)
    return [(layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)) for layer in out.past_key_values.layers]


def _deviation(selection, cache, parts: tuple[int, ...]) -> torch.Tensor:
    """`[C]` each chunk slot's squared K (part 0) and/or V (part 1) error against full prefill, per layer over that
    layer's mean squared norm, summed over layers."""
    start, end = cache.prefix_len, cache.context_end
    deviation = torch.zeros(end - start)
    for layer, full in enumerate(_full_kv(selection, cache)):
        for part in parts:
            want = full[part][start:end].float()
            error = (cache.kv[layer, part, start:end].float() - want).square().sum(dim=(1, 2))
            deviation += error / want.square().sum(dim=(1, 2)).mean()
    return deviation


def oracle_kv(selection, cache, suffix_rows, budget):
    return selected(top_slots(_deviation(selection, cache, (0, 1)), budget, cache.prefix_len), suffix_rows)


def oracle_v(selection, cache, suffix_rows, budget):
    return selected(top_slots(_deviation(selection, cache, (1,)), budget, cache.prefix_len), suffix_rows)


def oracle_impact(selection, cache, suffix_rows, budget):
    scores = query_relevance(selection.adapter, cache, suffix_rows, "prophet", None)
    return selected(top_slots(scores * _deviation(selection, cache, (1,)), budget, cache.prefix_len), suffix_rows)


def _with_starts(first: int):
    def plan(selection, cache, suffix_rows, budget):
        scores = query_relevance(selection.adapter, cache, suffix_rows, "prophet", None).clone()
        for start, end in cache.chunk_spans:
            scores[start - cache.prefix_len : min(start + first, end) - cache.prefix_len] = float("inf")
        return selected(top_slots(scores, budget, cache.prefix_len), suffix_rows)

    return plan


pstarts2, pstarts8, pstarts32 = _with_starts(2), _with_starts(8), _with_starts(32)


def register() -> None:
    for name in ("oracle_kv", "oracle_v", "oracle_impact"):
        methods.register(methods.Method(name, f"{name} (oracle_selection.py)", f"{HERE}:{name}"))
    for name in ("pstarts2", "pstarts8", "pstarts32"):
        methods.register(methods.Method(name, f"{name} (oracle_selection.py)", f"{HERE}:{name}", query_scored=True))
    methods.METHODS = bench_cli.METHODS = bench_runner.METHODS = tuple(methods.REGISTRY)


if __name__ == "__main__":
    register()
    sys.exit(main(sys.argv[1:]))
