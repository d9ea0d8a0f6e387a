"""Forward passes of several requests as one: the step continuous batching repeats, and prefills joined to it.

A pass is `stitched.forward_rows` for one request: rows (slot indices) of its own `StitchedCache` recomputed through
the layers, with its own scoring (ProphetKV's Stage I), row filter and last layer. `forward_passes` runs N requests'
passes layer by layer together:

- embedding, norms, the Q/K/V, O and MLP projections and the LM head over the rows of all of them stacked
  (`[sum R_i, hidden]`): the weights are read once per layer instead of once per request, which is what a pass of
  a few rows (a decode step's one row, a question's twenty, a selective forward's sixty) is bound by;
- per request, as `forward_rows` does it: its fresh K/V written into its own cache, its row filter, its scoring, and
  attention over its own cache's first `length` slots (exact position mask, `kernels.sparse_attention`).

So a row's attention is what `forward_rows` computes for that request alone, and its projections are the same
products over a taller matrix. `decode_step` is the case of one appended token per request.
`benchmarks/spike_batched_decode.py` measured that step at N=8 against eight one-row steps on the embedded
SmolLM2-135M (CPU, 2 threads): 3.6-4.2x the tokens per second, the same greedy tokens.

`forward` is what a request's prefill calls for its passes: plain `forward_rows`, or, while the request's thread
has joined a batcher (`joined`), the batcher runs the pass together with the other requests' passes and decode rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from prophet_rag.compute.model_adapter import ModelAdapter
from prophet_rag.compute.stitched import RowFilter, Scoring, StitchedCache, forward_rows
from prophet_rag.kernels import attention_plan, sparse_attention, stage1_attention


@dataclass
class Pass:
    """`forward_rows(adapter, cache, rows, scoring=..., row_filter=..., last_layer=..., outputs=...)` of one
    request."""

    cache: StitchedCache
    rows: torch.Tensor
    scoring: Scoring | None = None
    row_filter: tuple[int, RowFilter] | None = None
    last_layer: int | None = None
    outputs: int | None = None
    positions: torch.Tensor | None = None
    """`[>= cache.length]` the slots' positions as this pass sees them, when not the cache's own `positions`."""
    before: Callable[[int], None] | None = None
    """Called before the pass reads or writes a layer, once the passes ahead of it in the same forward are done with
    that layer: two passes over one cache in two geometries, the second placing each layer's keys for its own after
    the first has read them in the first (see `scoring.query_relevance_twice`)."""


class _Rows:
    """A pass under way: its rows still recomputed, their positions and attention plan."""

    def __init__(self, adapter: ModelAdapter, index: int, item: Pass, dtype: torch.dtype) -> None:
        self.index, self.item, self.dtype = index, item, dtype
        self.kv_heads = adapter.spec.num_kv_heads
        self.group = adapter.spec.num_heads // self.kv_heads
        self.n = item.cache.length
        self.positions = (item.cache.positions if item.positions is None else item.positions)[: self.n]
        self.stop = adapter.spec.num_layers - 1 if item.last_layer is None else item.last_layer
        self.rows = item.rows
        self.row_pos = self.positions[self.rows]
        self.plan = attention_plan(self.row_pos, self.positions, dtype, self.group, self.kv_heads)

    def keep(self, keep: torch.Tensor) -> None:
        self.rows, self.row_pos = self.rows[keep], self.row_pos[keep]
        self.plan = attention_plan(self.row_pos, self.positions, self.dtype, self.group, self.kv_heads)


@torch.inference_mode()
def forward_passes(adapter: ModelAdapter, passes: Sequence[Pass],
                   errors: list[Exception | None] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run every pass; for each, what `forward_rows` returns for it alone: the final hidden states of the rows still
    recomputed at its end (its `last_layer`'s output) and those rows.

    With `errors` (a list as long as `passes`), a pass whose own part raises (its cache's `layer_ready`, its row
    filter, its scoring, its attention) leaves the forward at that layer, its exception at its index in `errors` and
    None at its index in the result, and the other passes run on unchanged; without it, the exception propagates.
    What all the passes share (the stacked projections) fails them all, and raises."""
    assert passes, "at least one pass"
    hidden = adapter.embed(torch.cat([p.cache.token_ids[p.rows] for p in passes]))
    live = [_Rows(adapter, i, p, hidden.dtype) for i, p in enumerate(passes)]
    # Positions are the same in every layer: RoPE tables change only when a pass's rows do.
    rope = adapter.rope_tables(torch.cat([r.row_pos for r in live]), hidden.dtype)
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(passes)
    for layer in range(max(r.stop for r in live) + 1):
        q, k, v = adapter.qkv(layer, hidden, rope)
        sizes = [int(r.rows.numel()) for r in live]
        kept_hidden, outs, changed, failed = [], [], False, []
        for r, h, q_r, k_r, v_r in zip(live, *(t.split(sizes) for t in (hidden, q, k, v)), strict=True):
            try:
                h, out, filtered = _attend(adapter, layer, r, h, q_r, k_r, v_r)
            except Exception as error:
                if errors is None:
                    raise
                errors[r.index] = error  # this pass alone leaves; the others' rows go on
                failed.append(r)
                continue
            changed = changed or filtered
            outs.append(out)
            kept_hidden.append(h)
        if failed:
            live, changed = [r for r in live if r not in failed], True
            if not live:
                return results
        hidden = adapter.finish_layer(layer, torch.cat(kept_hidden), torch.cat(outs))
        ending = [i for i, r in enumerate(live) if r.stop == layer]
        if ending or changed:
            parts = hidden.split([int(h.shape[0]) for h in kept_hidden])
            for i in ending:
                results[live[i].index] = (parts[i], live[i].rows)
            staying = [i for i, r in enumerate(live) if r.stop != layer]
            live, hidden = [live[i] for i in staying], torch.cat([parts[i] for i in staying]) if staying else hidden
            if live:
                rope = adapter.rope_tables(torch.cat([r.row_pos for r in live]), hidden.dtype)
    return results


def _attend(adapter: ModelAdapter, layer: int, r: _Rows, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One pass's own part of `layer`: its stored blocks in place, its row filter, its fresh K/V written into its
    cache, its attention (Stage I's scoring attention where it scores); its hidden rows still recomputed, their
    attention output, and whether its row filter ran here."""
    cache, item = r.item.cache, r.item
    if cache.layer_ready is not None:
        cache.layer_ready(layer)
    if item.before is not None:
        item.before(layer)
    rows, filtered = r.rows, item.row_filter is not None and item.row_filter[0] == layer
    if filtered:
        keep = item.row_filter[1](layer, rows, k, v)
        h, q = h[keep], q[keep]
        r.keep(keep)
    cache.kv[layer, 0, rows], cache.kv[layer, 1, rows] = k, v
    keys_k, keys_v = cache.kv[layer, 0, : r.n], cache.kv[layer, 1, : r.n]
    if item.scoring is not None and layer in item.scoring.layers:
        s = item.scoring
        return h, stage1_attention(q, keys_k, keys_v, r.row_pos, r.positions, adapter.scale, s.context_end,
                                   s.prophet, s.norm, s.bounds, r.plan), filtered
    row_pos, plan = r.row_pos, r.plan
    if layer == r.stop and item.outputs is not None and item.outputs < h.shape[0]:
        tail = slice(h.shape[0] - item.outputs, None)  # as forward_rows: the other rows end with their K/V
        h, q, row_pos = h[tail], q[tail], row_pos[tail]
        plan = attention_plan(row_pos, r.positions, r.dtype, r.group, r.kv_heads)
    return h, sparse_attention(q, keys_k, keys_v, row_pos, r.positions, adapter.scale, plan), filtered


@torch.inference_mode()
def decode_step(adapter: ModelAdapter, caches: Sequence[StitchedCache], tokens: Sequence[int]) -> torch.Tensor:
    """Append `tokens[i]` to `caches[i]` and run all of them through every layer; `[N, vocab]` fp32 logits, row i
    being request i's next-token logits."""
    assert len(caches) == len(tokens) and caches, "one token per cache, at least one request"
    ids = torch.tensor(list(tokens), device=adapter.device)
    passes = [Pass(cache, cache.append_tokens(ids[i : i + 1])) for i, cache in enumerate(caches)]
    return adapter.logits(torch.cat([hidden for hidden, _ in forward_passes(adapter, passes)]))


RunPasses = Callable[[Sequence[Pass]], list[tuple[torch.Tensor, torch.Tensor]]]
"""`run(passes)`: what `forward_passes` returns for them, the passes run in that order in one step."""

_runner: ContextVar[RunPasses | None] = ContextVar("prophet_rag_pass_runner", default=None)
"""The batcher this thread's request has joined (`joined`), if any."""


def forward(adapter: ModelAdapter, cache: StitchedCache, rows: torch.Tensor, *, scoring: Scoring | None = None,
            row_filter: tuple[int, RowFilter] | None = None, last_layer: int | None = None,
            outputs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward_rows(adapter, cache, rows, ...)`, run by the batcher this thread has joined, if any, together with
    other requests' passes."""
    run = _runner.get()
    if run is None:
        return forward_rows(adapter, cache, rows, scoring=scoring, row_filter=row_filter, last_layer=last_layer,
                            outputs=outputs)
    return run([Pass(cache, rows, scoring, row_filter, last_layer, outputs)])[0]


def forward_together(adapter: ModelAdapter, passes: Sequence[Pass]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`forward_passes(adapter, passes)` for passes of one request, run by the batcher this thread has joined, if
    any, in one of its steps (in this order, with other requests' passes)."""
    run = _runner.get()
    return forward_passes(adapter, passes) if run is None else run(passes)


@contextmanager
def joined(run: RunPasses) -> Iterator[None]:
    """Within it, this thread's `forward` and `forward_together` calls go to `run` (a batcher's `run_passes`)."""
    token = _runner.set(run)
    try:
        yield
    finally:
        _runner.reset(token)
