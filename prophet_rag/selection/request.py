"""A request as the selection methods see it, and the plan they return.

`Selection` holds the request (the model, the configuration, the chunks' and the suffix's token ids) and the signals
derived from it. A method's plan (which rows the selective forward starts with) and its ordering (where its chunks go)
take a `Selection`; `plan` runs the configured method's (methods are declared in `prophet_rag.methods`).

Budgets are `floor(ratio * eligible)`, where eligible is the chunk tokens only: the exact prefix is never recomputed
and the fresh suffix is always computed and never counts. Selections are sorted, unique slot indices inside the chunk
range.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from prophet_rag import methods
from prophet_rag.compute.model_adapter import ModelAdapter
from prophet_rag.compute.scoring import query_relevance
from prophet_rag.compute.stitched import RowFilter, StitchedCache
from prophet_rag.config import SelectionConfig
from prophet_rag.selection.signals import (
    FOCUS_LIFT,
    FOCUS_SHARE,
    FOCUS_SPREAD,
    anchor_lift,
    anchor_mask,
    anchored_weights,
    chunk_sums,
    default_infoflow_layers,
    lexical_relevance,
)


@dataclass
class Plan:
    rows: torch.Tensor
    """`[R]` sorted slots the selective forward starts with (selected context slots, then the suffix slots)."""
    selected: torch.Tensor | None
    """`[k]` sorted context slots recomputed through all layers; None until a row filter decides (CacheBlend)."""
    row_filter: tuple[int, RowFilter] | None = None


@dataclass
class Selection:
    """One request as the methods see it: the model, the configuration, the chunks' and the suffix's token ids.

    Derived signals are computed at most once per request, whichever of a method's steps asks first.
    """

    adapter: ModelAdapter
    config: SelectionConfig
    chunk_ids: Sequence[torch.Tensor]
    """One `[n_i]` tensor per chunk, in request (retrieval) order."""
    suffix_ids: torch.Tensor
    instruction_ids: torch.Tensor | None = None
    """The prompt's fixed prefix (system prompt, instruction), when known: a word of the suffix that it also holds is
    the instruction's, repeated around the question, not the question's own (see `lift`)."""

    @cached_property
    def lexical(self) -> torch.Tensor:
        """`[m]` `lexical_relevance` of each chunk, in request order."""
        return lexical_relevance(list(self.chunk_ids), self.suffix_ids)

    parallel: torch.Tensor | None = None
    """`[C]` ProphetKV's Stage I scores in the parallel geometry, in request order, once a method's ordering step has
    computed them."""

    laid_out: torch.Tensor | None = None
    """`[C]` ProphetKV's Stage I scores in the retrieval layout (request order, global positions: what `prophet`
    plans from), when the ordering step computed them together with `parallel`."""

    @property
    def parallel_scores(self) -> torch.Tensor:
        assert self.parallel is not None, "the method's ordering step computes them first"
        return self.parallel

    @cached_property
    def anchored_tokens(self) -> torch.Tensor:
        """`[C]` `anchored_weights` of every chunk token, in request order, from the parallel Stage I."""
        return anchored_weights(list(self.chunk_ids), self.suffix_ids, self.parallel_scores)

    @cached_property
    def anchored(self) -> torch.Tensor:
        """`[m]` `anchored_relevance` of each chunk, in request order: its tokens' anchored weights summed."""
        return chunk_sums(self.anchored_tokens, self.chunk_ids)

    @cached_property
    def focus(self) -> frozenset[int]:
        """The chunks (request order) anchored at least `FOCUS_SHARE` as strongly as the best one; none when the
        question shares no word with any chunk."""
        relevance = self.anchored.tolist()
        best = max(relevance)
        return frozenset(i for i, r in enumerate(relevance) if best > 0 and r >= FOCUS_SHARE * best)

    @cached_property
    def anchors(self) -> torch.Tensor:
        """`[C]` `anchor_mask` of the chunk tokens, in request order."""
        return anchor_mask(list(self.chunk_ids), self.suffix_ids)

    @cached_property
    def plain_likely(self) -> bool:
        """Whether the words alone, before any attention, make ProphetKV's plan (`plain`) certain or possible: no
        chunk holds one of the question's anchors (`anchor_mask`: the lift is then 0), or more than one chunk, and
        `FOCUS_SPREAD` of them, hold one (a chunk without anchors has no anchored relevance, so `spread` needs as
        many)."""
        sizes = [int(ids.numel()) for ids in self.chunk_ids]
        held = sum(bool(part.any()) for part in torch.split(self.anchors, sizes))
        return held == 0 or (held > 1 and held >= FOCUS_SPREAD * len(self.chunk_ids))

    @property
    def spread(self) -> bool:
        """The question's anchors single out no chunks: more than one, and at least `FOCUS_SPREAD` of them, are
        focus chunks."""
        return len(self.focus) > 1 and len(self.focus) >= FOCUS_SPREAD * len(self.chunk_ids)

    @cached_property
    def lift(self) -> float:
        """`anchor_lift` of the best anchored chunk's anchors in the parallel Stage I: how much more attention per
        token the question gives its own rare words there than an average context token. With `instruction_ids`, no
        more than the lift of those anchors the instruction does not hold (0 when there are none): on real passages
        under CacheBlend's instruction, which the suffix repeats around the question, Qwen2.5-0.5B's moves on 4 of 61
        MuSiQue cases rested on the instruction's words (" based", " within", " given"; the question's own words there
        lift less than `FOCUS_LIFT`), and each cost agreement with full prefill or KL (docs/RESULTS.md, "Real
        multi-hop documents")."""
        best = int(torch.argmax(self.anchored))
        scores = self.parallel_scores.to(torch.float32)
        mask = self.anchors.to(scores.device)
        start = sum(int(ids.numel()) for ids in self.chunk_ids[:best])
        inside = torch.zeros_like(mask)
        inside[start : start + int(self.chunk_ids[best].numel())] = True
        lift = anchor_lift(scores, mask & inside)
        if self.instruction_ids is None:
            return lift
        own = ~torch.isin(torch.cat(list(self.chunk_ids)).to(scores.device), self.instruction_ids.to(scores.device))
        return min(lift, anchor_lift(scores, mask & inside & own))

    @property
    def plain(self) -> bool:
        """ProphetKV's plan applies, no chunk moves: the anchors are spread (`spread`), or the question's attention
        on its words in the best anchored chunk is under `FOCUS_LIFT` times that on an average context token."""
        return self.spread or self.lift < FOCUS_LIFT

    @cached_property
    def infoflow_layers(self) -> tuple[int, ...]:
        return self.config.infoflow_layers or default_infoflow_layers(self.adapter.spec.num_layers)

    @classmethod
    def of_cache(cls, adapter: ModelAdapter, cache: StitchedCache, suffix_rows: torch.Tensor,
                 config: SelectionConfig) -> Selection:
        """The request behind an assembled cache (its chunks put back in request order)."""
        chunks: list[torch.Tensor] = [cache.token_ids[:0]] * len(cache.chunk_spans)
        for (start, end), i in zip(cache.chunk_spans, cache.order, strict=True):
            chunks[i] = cache.token_ids[start:end]
        return cls(adapter, config, chunks, cache.token_ids[suffix_rows])


Assemble = Callable[[Sequence[int], bool], StitchedCache]
"""`assemble(order, global_positions)`: the request's stitched cache with its chunks in `order`, filled and placed
(suffix not added)."""

PlanFn = Callable[[Selection, StitchedCache, torch.Tensor, int], Plan]
"""`plan(selection, cache, suffix_rows, budget)` for a budget of at least one token."""

OrderFn = Callable[[Selection, Assemble], list[int] | None]
"""`order(selection, assemble)`: the chunks' layout order, or None to keep the request order."""


def budget_for(ratio: float, eligible: int) -> int:
    return int(ratio * eligible)


def top_slots(scores: torch.Tensor, budget: int, offset: int) -> torch.Tensor:
    """Slots `offset + i` of the `budget` highest scores, ties broken by position, sorted ascending."""
    order = torch.sort(scores, descending=True, stable=True).indices[:budget]
    return torch.sort(order).values + offset


def plan(adapter: ModelAdapter, cache: StitchedCache, suffix_rows: torch.Tensor, config: SelectionConfig,
         selection: Selection | None = None) -> Plan:
    """The recomputation plan of `config.method` over an assembled cache (any method that reuses cached KV)."""
    selection = selection or Selection.of_cache(adapter, cache, suffix_rows, config)
    eligible = cache.eligible_slots()
    budget = budget_for(config.ratio, int(eligible.numel()))
    if budget == 0:
        return Plan(suffix_rows, eligible[:0])
    return methods.get(config.method).plan(selection, cache, suffix_rows, budget)


def attention_plan(selection: Selection, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int) -> Plan:
    """ProphetKV's plan: the tokens the question's attention mass (over all layers) is highest on, in the cache's
    layout."""
    scores = query_relevance(selection.adapter, cache, suffix_rows, "prophet", None)
    return selected(top_slots(scores, budget, cache.prefix_len), suffix_rows)


def selected(slots: torch.Tensor, suffix_rows: torch.Tensor) -> Plan:
    return Plan(torch.cat([slots, suffix_rows]), slots)
