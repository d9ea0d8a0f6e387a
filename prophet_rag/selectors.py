"""Which context tokens to recompute: every method behind one interface, chosen by name.

A selector turns the stitched cache into a `Plan`: the rows the selective forward starts with and, for methods that
decide inside the forward (CacheBlend), a row filter applied at one layer. Budgets are `floor(ratio * eligible)`,
where eligible is the chunk tokens only: the exact prefix is never recomputed and the fresh suffix is always
computed and never counts. Selections are sorted, unique slot indices inside the chunk range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prophet_rag.config import SelectionConfig
from prophet_rag.kernels import query_scores
from prophet_rag.model_adapter import ModelAdapter
from prophet_rag.stitched import RowFilter, StitchedCache, forward_rows


@dataclass
class Plan:
    rows: torch.Tensor
    """`[R]` sorted slots the selective forward starts with (selected context slots, then the suffix slots)."""
    selected: torch.Tensor | None
    """`[k]` sorted context slots recomputed through all layers; None until a row filter decides (CacheBlend)."""
    row_filter: tuple[int, RowFilter] | None = None


def budget_for(ratio: float, eligible: int) -> int:
    return int(ratio * eligible)


def top_slots(scores: torch.Tensor, budget: int, offset: int) -> torch.Tensor:
    """Slots `offset + i` of the `budget` highest scores, ties broken by position, sorted ascending."""
    order = torch.sort(scores, descending=True, stable=True).indices[:budget]
    return torch.sort(order).values + offset


def default_infoflow_layers(num_layers: int) -> tuple[int, ...]:
    """Four consecutive layers from 70% depth: InfoFlow's {22..25} of a 32-layer model, scaled to the model."""
    start = min(int(0.7 * num_layers), max(num_layers - 4, 0))
    return tuple(range(start, min(start + 4, num_layers)))


def query_relevance(
    adapter: ModelAdapter, cache: StitchedCache, suffix_rows: torch.Tensor, kind: str, layers: tuple[int, ...] | None
) -> torch.Tensor:
    """`[C]` fp32 score of each chunk slot from the suffix's attention over the cached context (Stage I).

    kind "prophet": attention mass summed over heads, query tokens and all layers (uniform fusion), softmax over the
    context keys only. kind "infoflow": L2 norm over query tokens of the head-mean attention, averaged over `layers`.
    The suffix runs over the cache as it is (reused, not yet repaired), so this costs one |suffix|-row forward.
    """
    end = cache.context_end
    scores = torch.zeros(end, dtype=torch.float32, device=cache.kv.device)
    wanted = set(range(adapter.spec.num_layers)) if layers is None else set(layers)

    def hook(layer: int, rows: torch.Tensor, q: torch.Tensor) -> None:
        if layer in wanted:
            prophet, norm = (scores, None) if kind == "prophet" else (None, scores)
            query_scores(q, cache.kv[layer, 0, :end], adapter.scale, prophet, norm)

    forward_rows(adapter, cache, suffix_rows, hook=hook, last_layer=max(wanted))
    return scores[cache.prefix_len :]


def lexical_relevance(chunks: list[torch.Tensor], query_ids: torch.Tensor) -> torch.Tensor:
    """`[m]` how strongly each chunk shares the query's rare tokens: sum of the query tokens' in-request IDF.

    IDF is taken over the request's own chunks, so tokens every chunk has (template words, shared phrasing) count
    for almost nothing and a name or number found in one chunk counts most.
    """
    m = len(chunks)
    present = [torch.isin(query_ids.unique(), chunk) for chunk in chunks]
    df = torch.stack(present).sum(dim=0).to(torch.float32)
    idf = torch.log((m + 1) / (df + 0.5))
    return torch.stack([(idf * hit).sum() for hit in present])


def _prophet_plus_slots(
    adapter: ModelAdapter, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int
) -> torch.Tensor:
    """ProphetKV with a lexical chunk prior (the engine has already laid the chunks out by that prior, most
    relevant last, next to the question).

    On small models the query's attention over a stale (reused) cache mostly follows recency, not content: on
    look-alike documents its per-chunk attention mass picks the answer's chunk no better than chance, so token scores
    alone spread the budget over look-alike tokens of every chunk. The chunks that share the query's rare tokens are
    recomputed whole, most relevant first, while they fit in half the budget; ProphetKV's token scores spend the rest.
    """
    chunks = [cache.token_ids[s:e] for s, e in cache.chunk_spans]
    relevance = lexical_relevance(chunks, cache.token_ids[suffix_rows])
    whole: list[torch.Tensor] = []
    used = 0
    for i in torch.sort(relevance, descending=True, stable=True).indices.tolist():
        start, end = cache.chunk_spans[i]
        if relevance[i] <= 0 or used + (end - start) > budget // 2:
            break
        whole.append(torch.arange(start, end, device=cache.kv.device))
        used += end - start
    scores = query_relevance(adapter, cache, suffix_rows, "prophet", None)
    chosen = torch.cat(whole) if whole else cache.eligible_slots()[:0]
    scores[chosen - cache.prefix_len] = float("inf")
    return top_slots(scores, budget, cache.prefix_len)


def _cacheblend_filter(cache: StitchedCache, num_context: int, budget: int) -> RowFilter:
    """Keep the `budget` context rows whose fresh V deviates most from the reused V, plus every suffix row."""

    def keep(layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        reused = cache.kv[layer, 1, rows[:num_context]].to(torch.float32)
        deviation = (v[:num_context].to(torch.float32) - reused).square().sum(dim=(1, 2))
        chosen = top_slots(deviation, budget, 0)
        return torch.cat([chosen, torch.arange(num_context, rows.numel(), device=rows.device)])

    return keep


def _epic_slots(cache: StitchedCache, budget: int) -> torch.Tensor:
    """The first tokens of every chunk, `budget` in all, spread in proportion to chunk length (EPIC LegoLink)."""
    lengths = torch.tensor([end - start for start, end in cache.chunk_spans])
    eligible = int(lengths.sum())
    quota = (lengths * budget) // max(eligible, 1)
    # Hand the rounding remainder to the chunks with the most unused tokens, first chunks first on ties.
    spare = budget - int(quota.sum())
    for i in torch.sort(lengths - quota, descending=True, stable=True).indices[:spare]:
        quota[i] += 1
    slots = [torch.arange(start, start + int(q)) for (start, _), q in zip(cache.chunk_spans, quota, strict=True)]
    return torch.cat(slots).to(cache.kv.device)


def plan(
    adapter: ModelAdapter, cache: StitchedCache, suffix_rows: torch.Tensor, config: SelectionConfig
) -> Plan:
    """The recomputation plan of `config.method` (anything but `full`, which does not use the stitched cache)."""
    eligible = cache.eligible_slots()
    budget = budget_for(config.ratio, int(eligible.numel()))
    offset = cache.prefix_len
    method = config.method
    if method == "cacheblend" and budget > 0:
        context_rows = torch.cat([eligible, suffix_rows])
        layer = min(config.cacheblend_check_layer, adapter.spec.num_layers - 1)
        return Plan(context_rows, None, (layer, _cacheblend_filter(cache, int(eligible.numel()), budget)))
    if budget == 0 or method in ("reuse", "cacheblend"):
        selected = eligible[:0]
    elif method == "random":
        generator = torch.Generator().manual_seed(config.seed)
        picks = torch.randperm(int(eligible.numel()), generator=generator)[:budget]
        selected = torch.sort(picks).values.to(eligible.device) + offset
    elif method == "epic":
        selected = _epic_slots(cache, budget)
    elif method == "prophet_plus":
        selected = _prophet_plus_slots(adapter, cache, suffix_rows, budget)
    elif method in ("prophet", "infoflow"):
        layers = None
        if method == "infoflow":
            layers = config.infoflow_layers or default_infoflow_layers(adapter.spec.num_layers)
        scores = query_relevance(adapter, cache, suffix_rows, method, layers)
        selected = top_slots(scores, budget, offset)
    else:
        raise AssertionError(f"plan() got method {method!r}")
    return Plan(torch.cat([selected, suffix_rows]), selected)
