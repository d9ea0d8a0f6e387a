"""The question's pass (Stage I), the decode step and other few-row passes as CUDA graphs, on bucketed shapes.

Why: both run a few rows through every layer, so on a GPU they are bound by Python and kernel launches, not by the
kernels (~2 ms per layer per pass for Llama-3-8B on an H100, benchmarks/RESULTS.md). A captured graph replays the
whole pass as one launch.

A graph freezes shapes and addresses, hence:
- one persistent `StitchedCache`, allocated once at the largest capacity, that every request is assembled into;
- row counts rounded up to a bucket, the padding rows repeating the last row: same token, slot and position, so they
  recompute that row and write the same K/V; `bounds` keeps them out of the scores;
- key counts (the cache length, context_end) rounded up to a granule; the real counts reach stage1_attention through
  `bounds`, and sparse_attention skips the slots past the length by position (`StitchedCache` leaves slot i at
  position i, later than every row's).
One graph per (pass, row bucket, key bucket, context bucket, scoring): a handful per deployment.

Without CUDA the same padded steps run eagerly, which is what the CPU tests check; only the capture itself needs
a GPU. Not wired into the engine yet: that needs the engine to assemble requests into one persistent cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from prophet_rag.compute.model_adapter import ModelAdapter
from prophet_rag.compute.scoring import query_relevance
from prophet_rag.compute.stitched import Scoring, StitchedCache, forward_rows

ROW_BUCKETS = (8, 16, 32, 64, 128, 256)
KEY_GRANULE = 1024


def bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= n, or None when n exceeds them all (the caller then runs eagerly)."""
    return next((b for b in sorted(buckets) if b >= n), None)


def round_up(n: int, granule: int, limit: int) -> int:
    """n rounded up to a multiple of `granule`, at most `limit` (the cache capacity)."""
    return min(-(-n // granule) * granule, limit)


def pad_rows(rows: torch.Tensor, size: int) -> torch.Tensor:
    """`rows` `[R]` (R >= 1) padded to `[size]` by repeating its last element."""
    return torch.cat([rows, rows[-1:].expand(size - rows.numel())])


class _Pass:
    """One bucketed step: static input buffers, and the step, captured on CUDA or run eagerly elsewhere."""

    def __init__(self, inputs: dict[str, torch.Tensor], step: Callable[[], dict[str, torch.Tensor]],
                 capture: bool) -> None:
        self.inputs, self.step, self.capture = inputs, step, capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def run(self) -> dict[str, torch.Tensor]:
        """Run on the current contents of `inputs`; the outputs are overwritten by the next run."""
        if not self.capture:
            self.outputs = self.step()
        elif self.graph is None:
            # Warm up on a side stream (Triton compiles, allocators settle), then capture. The steps are idempotent:
            # they rewrite the same K/V and zero their accumulators first.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # A private memory pool per graph (the default): the passes replay in any order, and graphs may share a
            # pool only when replayed in capture order (torch.cuda.graph's documentation).
            with torch.cuda.graph(self.graph):
                self.outputs = self.step()
            self.graph.replay()
        else:
            self.graph.replay()
        return self.outputs


class GraphedPasses:
    """Stage I and few-row forward passes over one persistent cache, one graph per bucket."""

    def __init__(self, adapter: ModelAdapter, cache: StitchedCache, row_buckets: tuple[int, ...] = ROW_BUCKETS,
                 key_granule: int = KEY_GRANULE) -> None:
        self.adapter, self.cache = adapter, cache
        self.row_buckets, self.key_granule = row_buckets, key_granule
        self.passes: dict[tuple, _Pass] = {}

    def _keys(self, n: int, limit: int) -> int:
        return round_up(n, self.key_granule, limit)

    def _get(self, key: tuple, make: Callable[[], tuple[dict, Callable]]) -> _Pass:
        if key not in self.passes:
            self.passes[key] = _Pass(*make(), capture=self.cache.kv.is_cuda)
        return self.passes[key]

    def stage1(self, suffix_rows: torch.Tensor, kind: str, layers: tuple[int, ...] | None) -> torch.Tensor:
        """`scoring.query_relevance` on this cache: `[C]` scores of the chunk slots."""
        cache, device = self.cache, self.cache.kv.device
        rows = int(suffix_rows.numel())
        rows_b = bucket(rows, self.row_buckets)
        if rows_b is None:
            return query_relevance(self.adapter, cache, suffix_rows, kind, layers)
        keys_b = self._keys(cache.length, cache.capacity)
        context_b = self._keys(cache.context_end, keys_b)
        wanted = frozenset(range(self.adapter.spec.num_layers) if layers is None else layers)

        def make():
            static_rows = torch.zeros(rows_b, dtype=torch.long, device=device)
            bounds = torch.zeros(3, dtype=torch.int32, device=device)
            scores = torch.zeros(context_b, dtype=torch.float32, device=device)
            prophet, norm = (scores, None) if kind == "prophet" else (None, scores)
            scoring = Scoring(wanted, prophet, norm, context_b, bounds)

            def step():
                scores.zero_()
                forward_rows(self.adapter, cache, static_rows, scoring=scoring, last_layer=max(wanted), keys=keys_b)
                return {"scores": scores}

            return {"rows": static_rows, "bounds": bounds}, step

        step = self._get(("stage1", rows_b, keys_b, context_b, kind, wanted), make)
        step.inputs["rows"].copy_(pad_rows(suffix_rows, rows_b))
        step.inputs["bounds"].copy_(torch.tensor([rows, cache.context_end, cache.length], dtype=torch.int32))
        return step.run()["scores"][cache.prefix_len : cache.context_end].clone()

    @torch.inference_mode()
    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """`forward_rows(adapter, cache, rows)` for a few rows (slots `[R]`): their last hidden states `[R, hidden]`.

        The decode step (one row) and a pass of the question alone (`reuse`, or Stage II with nothing selected).
        """
        cache = self.cache
        count = int(rows.numel())
        rows_b = bucket(count, self.row_buckets)
        if rows_b is None:
            return forward_rows(self.adapter, cache, rows)[0]
        keys_b = self._keys(cache.length, cache.capacity)

        def make():
            static_rows = torch.zeros(rows_b, dtype=torch.long, device=cache.kv.device)
            return {"rows": static_rows}, lambda: {"hidden": forward_rows(self.adapter, cache, static_rows,
                                                                         keys=keys_b)[0]}

        step = self._get(("forward", rows_b, keys_b), make)
        step.inputs["rows"].copy_(pad_rows(rows, rows_b))
        return step.run()["hidden"][:count].clone()
