"""A `prophet_focus` request ordered and planned as the engine does, with chosen signals put in place of the
measured ones (the selection tests' way of reaching each branch of the method on a tiny random model)."""

from __future__ import annotations

from prophet_rag import methods
from prophet_rag.config import SelectionConfig
from prophet_rag.selection.request import Selection, attention_plan, budget_for
from tiny import QUERY


def planned(engine, chunks, ratio, **signals):
    """`(order, cache, chosen, prophet)`: the default's chunk order, its stitched cache, the tokens it recomputes,
    and plain ProphetKV's plan on the same layout. `signals` (e.g. `anchored_tokens=` `[C]` in request order,
    `lift=`) replace the request's measured values of those names."""
    layout = engine.builder.layout(list(chunks), QUERY)
    request = Selection(engine.adapter, SelectionConfig(method="prophet_focus", ratio=ratio), layout.chunk_ids,
                        layout.suffix_ids)
    request.__dict__.update(signals)
    method = methods.get("prophet_focus")
    order = method.order(request, lambda order, global_positions: engine.prefiller.assemble(
        layout, order, layout.total_tokens, global_positions)[0])
    cache, _ = engine.prefiller.assemble(layout, order, layout.total_tokens)
    suffix = cache.append_tokens(layout.suffix_ids)
    budget = budget_for(ratio, sum(int(ids.numel()) for ids in layout.chunk_ids))
    chosen = method.plan(request, cache, suffix, budget).selected
    return order, cache, chosen, attention_plan(request, cache, suffix, budget).selected
