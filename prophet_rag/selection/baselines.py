"""The methods prophet-rag is compared against that do not score tokens by the question: `reuse` (nothing
recomputed), `random` (a control), `epic` (EPIC LegoLink: the first tokens of each chunk) and `cacheblend`
(CacheBlend: the largest V deviation at a check layer).
"""

from __future__ import annotations

import torch

from prophet_rag.compute.stitched import StitchedCache
from prophet_rag.selection.request import Plan, Selection, selected, top_slots


def reuse_plan(selection: Selection, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int) -> Plan:
    return selected(cache.eligible_slots()[:0], suffix_rows)


def random_plan(selection: Selection, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int) -> Plan:
    eligible = cache.eligible_slots()
    generator = torch.Generator().manual_seed(selection.config.seed)
    picks = torch.randperm(int(eligible.numel()), generator=generator)[:budget]
    return selected(torch.sort(picks).values.to(eligible.device) + cache.prefix_len, suffix_rows)


def epic_plan(selection: Selection, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int) -> Plan:
    """The first tokens of every chunk, `budget` in all, spread in proportion to chunk length (EPIC LegoLink)."""
    lengths = torch.tensor([end - start for start, end in cache.chunk_spans])
    eligible = int(lengths.sum())
    quota = (lengths * budget) // max(eligible, 1)
    # Hand the rounding remainder to the chunks with the most unused tokens, first chunks first on ties.
    spare = budget - int(quota.sum())
    for i in torch.sort(lengths - quota, descending=True, stable=True).indices[:spare]:
        quota[i] += 1
    slots = [torch.arange(start, start + int(q)) for (start, _), q in zip(cache.chunk_spans, quota, strict=True)]
    return selected(torch.cat(slots).to(cache.kv.device), suffix_rows)


def cacheblend_plan(selection: Selection, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int) -> Plan:
    """Every context row runs to the check layer; there the `budget` rows whose fresh V deviates most from the
    reused V stay recomputed, with every suffix row."""
    eligible = cache.eligible_slots()
    num_context = int(eligible.numel())

    def keep(layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        reused = cache.kv[layer, 1, rows[:num_context]].to(torch.float32)
        deviation = (v[:num_context].to(torch.float32) - reused).square().sum(dim=(1, 2))
        chosen = top_slots(deviation, budget, 0)
        return torch.cat([chosen, torch.arange(num_context, rows.numel(), device=rows.device)])

    layer = min(selection.config.cacheblend_check_layer, selection.adapter.spec.num_layers - 1)
    return Plan(torch.cat([eligible, suffix_rows]), None, (layer, keep))
