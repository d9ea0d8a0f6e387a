"""A request's prefill: everything from its laid-out prompt up to the first token's logits.

`Prefiller` owns the steps between the layout and the decode loop: the conversation history from the prefix cache,
the chunks' KV from the chunk cache (computed where no tier holds it), the method's ordering step, the stitched
cache re-rotated to the chunks' global positions (placed layer by layer while stored blocks still arrive), the
method's plan of the tokens to recompute and the forward pass that recomputes them with the suffix. A method that
reuses no cached KV (`full`) is plain full prefill over the same ids. It also keeps a finished request's KV for the
next turn of its conversation (`keep`). `Prefill` is what it hands the engine: the cache, the last hidden states
and the timings that become `RequestStats`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch

from prophet_rag import methods
from prophet_rag.cache.chunk_cache import ChunkCache, LoadStats, StaleBlocksError
from prophet_rag.cache.prefix_cache import PrefixCache
from prophet_rag.compute import batch as batched
from prophet_rag.compute.batcher import DecodeBatcher
from prophet_rag.compute.lock import ComputeLock
from prophet_rag.compute.model_adapter import ModelAdapter
from prophet_rag.compute.prefill import prefill_full
from prophet_rag.compute.stitched import LayerGate, StitchedCache, reorder, reposition, stitched_layout
from prophet_rag.config import SelectionConfig
from prophet_rag.layout import RequestLayout
from prophet_rag.selection.request import Selection
from prophet_rag.selection.request import plan as plan_recompute


@dataclass
class Prefill:
    """Everything up to the first token's logits."""

    cache: StitchedCache
    hidden: torch.Tensor
    """`[1, hidden]` the last row's last-layer state: the first token's."""
    selected: torch.Tensor
    """`[k]` sorted context slots recomputed through all layers."""
    order: tuple[int, ...]
    load_s: float
    rerotate_s: float
    select_s: float
    recompute_s: float
    cache_hits: int
    cache_misses: int
    cached_tokens: int = 0
    """Prompt tokens whose KV came from a tier or the prefix cache, not from compute (`LoadStats.cached_tokens`)."""
    prefix_cache_tokens: int = 0
    """Leading prompt tokens whose KV came from the conversation prefix cache."""


@dataclass(frozen=True, eq=False)
class Prefiller:
    """Prefills requests for one engine: its model, chunk cache, prefix cache and compute lock, and the batcher
    whose steps run the passes of prefills under way together (`BatchConfig.batch_prefills`)."""

    adapter: ModelAdapter
    cache: ChunkCache
    prefix_cache: PrefixCache
    sink_ids: torch.Tensor
    kv_dtype: torch.dtype
    compute: ComputeLock
    batcher: DecodeBatcher

    @torch.inference_mode()
    def prefill(self, layout: RequestLayout, selection: SelectionConfig, capacity: int) -> Prefill:
        """The request's prefill into a stitched cache of `capacity` slots, under the compute lock."""
        # With batch_prefills, the passes of prefills under way together run as one, in the batcher's steps.
        joined = batched.joined(self.batcher.run_passes) if self.batcher.config.batch_prefills else nullcontext()
        with self.compute, joined:
            try:
                return self._prefill_once(layout, selection, capacity, pipeline=True)
            except StaleBlocksError:
                # A stored block failed its check after the request had started on it. Its tier has dropped it, and
                # a second assembly reads every block whole before use, so a failing one is recomputed on the spot.
                return self._prefill_once(layout, selection, capacity, pipeline=False)

    def assemble(self, layout: RequestLayout, order: Sequence[int], capacity: int, global_positions: bool = True,
                 prefix: torch.Tensor | None = None) -> tuple[StitchedCache, LoadStats]:
        """The request's stitched cache with its chunks in `order`, every block filled from the chunk cache (the
        prefix from `prefix` when given) and placed (see `stitched.reposition`); the suffix is not added yet."""
        cache = stitched_layout(self.adapter, layout.prefix_ids, layout.chunk_ids, order, capacity, self.kv_dtype)
        loaded = self.cache.load(layout, cache, prefix=prefix)
        reposition(self.adapter, cache, int(self.sink_ids.numel()), global_positions)
        return cache, loaded

    def keep(self, cache: StitchedCache) -> None:
        """Keep the KV this request used, prompt and generated tokens, for the next turn of its conversation."""
        if not self.prefix_cache.enabled:
            return
        n = cache.length
        assert torch.equal(cache.positions[:n].cpu(), torch.arange(n)), "a finished request sits at positions 0..n-1"
        with self.compute, torch.inference_mode():
            self.prefix_cache.put(cache.token_ids[:n], cache.kv[:, :, :n])

    def _prefill_once(self, layout: RequestLayout, selection: SelectionConfig, capacity: int,
                      pipeline: bool) -> Prefill:
        method = methods.get(selection.method)
        t0 = time.perf_counter()
        full = not method.reuses_cache or not layout.chunk_ids
        past = self._history(layout, method.reuses_cache, full)
        reused = sum(int(block.shape[2]) for block in past)
        if full:
            cache, hidden = prefill_full(self.adapter, layout.joined_ids(), int(layout.prefix_ids.numel()), capacity,
                                         self.kv_dtype, past)
            context = torch.arange(cache.prefix_len, cache.prefix_len + layout.context_tokens)
            return Prefill(cache, hidden, context, tuple(range(len(layout.chunk_ids))), 0.0, 0.0, 0.0,
                           time.perf_counter() - t0, 0, 0, reused, reused)
        # A conversation's history: the stored turns, then the rest of the prefix, computed once for every assembly.
        prefix = None
        if past:
            prefix = prefill_full(self.adapter, layout.prefix_ids, int(layout.prefix_ids.numel()),
                                  int(layout.prefix_ids.numel()), self.kv_dtype, past)[0].kv
        t_prefix = time.perf_counter()  # the history's time counts as load: it stands in for the prefix's
        # A conversation's history is no instruction: its words may be the question's own.
        instruction = None if layout.transient_prefix else layout.prefix_ids
        request = Selection(self.adapter, selection, layout.chunk_ids, layout.suffix_ids, instruction)
        first: list[tuple[StitchedCache, LoadStats, bool]] = []

        def assemble(order: Sequence[int], global_positions: bool) -> StitchedCache:
            if global_positions:
                cache, loaded = self.assemble(layout, order, capacity, prefix=prefix)
            else:  # blocks as stored: the ordering step's pass waits for each layer, nothing to place
                cache = stitched_layout(self.adapter, layout.prefix_ids, layout.chunk_ids, order, capacity,
                                        self.kv_dtype)
                loaded = self.cache.load(layout, cache, pipeline, prefix)
                reposition(self.adapter, cache, int(self.sink_ids.numel()), False)
                if loaded.pending is not None:
                    cache.layer_ready = loaded.pending.wait
            first.append((cache, loaded, global_positions))
            return cache

        order = method.order(request, assemble) if method.order else None
        t1 = time.perf_counter()
        layout_order = range(len(layout.chunk_ids)) if order is None else order
        sink = int(self.sink_ids.numel())
        # The ordering step assembled the blocks as stored (parallel geometry): they are laid out again in place.
        in_place = bool(first) and not first[0][2]
        if in_place:
            cache, counted, _ = first[0]
            if counted.pending is not None:
                for layer in range(self.adapter.spec.num_layers):
                    counted.pending.wait(layer)
            loaded = LoadStats(counted.hits, counted.misses)
        else:
            cache = stitched_layout(self.adapter, layout.prefix_ids, layout.chunk_ids, layout_order, capacity,
                                    self.kv_dtype)
            loaded = self.cache.load(layout, cache, pipeline, prefix)
            counted = first[0][1] if first else loaded
        t2 = time.perf_counter()
        if in_place:
            reorder(self.adapter, cache, layout_order, sink)
        elif loaded.pending is None:
            reposition(self.adapter, cache, sink)
        else:  # stored blocks arrive layer by layer: each pass waits for, and places, the layers it reaches
            cache.layer_ready = LayerGate(loaded.pending.wait, partial(reposition, self.adapter, cache, sink, True))
        suffix_rows = cache.append_tokens(layout.suffix_ids.to(self.adapter.device))
        t3 = time.perf_counter()
        plan = plan_recompute(self.adapter, cache, suffix_rows, selection, request)
        t4 = time.perf_counter()
        hidden, rows = batched.forward(self.adapter, cache, plan.rows, row_filter=plan.row_filter, outputs=1)
        t5 = time.perf_counter()
        selected = plan.selected if plan.selected is not None else rows[rows < cache.context_end]
        # The ordering step is a method's scoring (prophet_focus's Stage I): it counts as selection.
        return Prefill(cache, hidden, selected, cache.order, (t2 - t1) + (t_prefix - t0), t3 - t2,
                       (t1 - t_prefix) + (t4 - t3), t5 - t4, counted.hits, counted.misses,
                       counted.cached_tokens(cache, selected) + reused, reused)

    def _history(self, layout: RequestLayout, reuses_cache: bool, full: bool) -> list[torch.Tensor]:
        """KV blocks of the longest stored prefix of the request's prompt (see `cache.prefix_cache`), leaving at
        least one token to compute: of the whole prompt when it is prefilled whole (no documents), of the prefix
        when the prefix holds a conversation's history (another prefix is stored as a segment in the chunk tiers).
        A method that reuses no cached KV (`full`, the reference) reads none."""
        if not reuses_cache:
            return []
        if full:
            return self.prefix_cache.lookup(layout.joined_ids(), layout.total_tokens - 1)
        if layout.transient_prefix:
            return self.prefix_cache.lookup(layout.prefix_ids, int(layout.prefix_ids.numel()) - 1)
        return []
