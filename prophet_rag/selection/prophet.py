"""ProphetKV and the methods built the same way: tokens ranked by the question's attention over the cached context
(`prophet`: mass over all layers; `infoflow`: attention norm on a layer subset), with InfoFlow's density reordering
under `reorder_chunks`, and `prophet_plus` (ProphetKV behind a lexical chunk prior).
"""

from __future__ import annotations

import torch

from prophet_rag.compute.scoring import query_relevance
from prophet_rag.compute.stitched import StitchedCache
from prophet_rag.selection.request import (
    Assemble,
    OrderFn,
    Plan,
    PlanFn,
    Selection,
    attention_plan,
    budget_for,
    selected,
    top_slots,
)

prophet_plan: PlanFn = attention_plan


def infoflow_plan(selection: Selection, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int) -> Plan:
    scores = query_relevance(selection.adapter, cache, suffix_rows, "infoflow", selection.infoflow_layers)
    return selected(top_slots(scores, budget, cache.prefix_len), suffix_rows)


def _density_order(kind: str) -> OrderFn:
    """With `reorder_chunks`: chunks by selected-token density, densest last (next to the question), InfoFlow's
    reordering. Scores come from the parallel geometry, where no chunk is favoured for sitting near the question."""

    def order(selection: Selection, assemble: Assemble) -> list[int] | None:
        config = selection.config
        if not config.reorder_chunks:
            return None
        identity = list(range(len(selection.chunk_ids)))
        cache = assemble(identity, False)
        suffix_rows = cache.append_tokens(selection.suffix_ids.to(cache.kv.device))
        layers = selection.infoflow_layers if kind == "infoflow" else None
        with torch.inference_mode():
            scores = query_relevance(selection.adapter, cache, suffix_rows, kind, layers)
        budget = budget_for(config.ratio, int(scores.numel()))
        if budget == 0:
            return identity
        chosen = top_slots(scores, budget, cache.prefix_len)
        density = [float(((chosen >= s) & (chosen < e)).sum()) / (e - s) for s, e in cache.chunk_spans]
        return sorted(identity, key=lambda i: density[i])

    return order


prophet_density_order = _density_order("prophet")
infoflow_density_order = _density_order("infoflow")


def lexical_order(selection: Selection, assemble: Assemble) -> list[int]:
    """The chunks sharing the query's rare tokens go last, next to the question."""
    relevance = selection.lexical
    return sorted(range(len(selection.chunk_ids)), key=lambda i: float(relevance[i]))


def prophet_plus_plan(selection: Selection, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int) -> Plan:
    """ProphetKV with a lexical chunk prior (the chunks are already laid out by that prior, most relevant last).

    On small models the query's attention over a stale (reused) cache mostly follows recency, not content: on
    look-alike documents its per-chunk attention mass picks the answer's chunk no better than chance, so token scores
    alone spread the budget over look-alike tokens of every chunk. The chunks that share the query's rare tokens are
    recomputed whole, most relevant first, while they fit in half the budget; ProphetKV's token scores spend the rest.
    """
    relevance = selection.lexical[list(cache.order)]  # in layout order
    whole: list[torch.Tensor] = []
    used = 0
    for i in torch.sort(relevance, descending=True, stable=True).indices.tolist():
        start, end = cache.chunk_spans[i]
        if relevance[i] <= 0 or used + (end - start) > budget // 2:
            break
        whole.append(torch.arange(start, end, device=cache.kv.device))
        used += end - start
    scores = query_relevance(selection.adapter, cache, suffix_rows, "prophet", None)
    chosen = torch.cat(whole) if whole else cache.eligible_slots()[:0]
    scores[chosen - cache.prefix_len] = float("inf")
    return selected(top_slots(scores, budget, cache.prefix_len), suffix_rows)
