"""Which context tokens to recompute: every selection method, registered once with everything about it.

A method is a `Method` in `REGISTRY`: its plan (which rows the selective forward starts with), its chunk ordering if
it moves chunks, and the flags the engine, the configuration, the CLI and the bench read (does it reuse cached KV at
all, is it query-scored, does it take a ratio). Adding a method is one function and one `register` call here.

Budgets are `floor(ratio * eligible)`, where eligible is the chunk tokens only: the exact prefix is never recomputed
and the fresh suffix is always computed and never counts. Selections are sorted, unique slot indices inside the chunk
range.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from prophet_rag.compute.model_adapter import ModelAdapter
from prophet_rag.compute.stitched import RowFilter, Scoring, StitchedCache, forward_rows
from prophet_rag.config import SelectionConfig


@dataclass
class Plan:
    rows: torch.Tensor
    """`[R]` sorted slots the selective forward starts with (selected context slots, then the suffix slots)."""
    selected: torch.Tensor | None
    """`[k]` sorted context slots recomputed through all layers; None until a row filter decides (CacheBlend)."""
    row_filter: tuple[int, RowFilter] | None = None


@dataclass
class Selection:
    """One request as the selectors see it: the model, the configuration, the chunks' and the suffix's token ids.

    Derived signals are computed at most once per request, whichever of a method's steps asks first.
    """

    adapter: ModelAdapter
    config: SelectionConfig
    chunk_ids: Sequence[torch.Tensor]
    """One `[n_i]` tensor per chunk, in request (retrieval) order."""
    suffix_ids: torch.Tensor

    @cached_property
    def lexical(self) -> torch.Tensor:
        """`[m]` `lexical_relevance` of each chunk, in request order."""
        return lexical_relevance(list(self.chunk_ids), self.suffix_ids)

    parallel: torch.Tensor | None = None
    """`[C]` ProphetKV's Stage I scores in the parallel geometry, in request order, once a method's ordering step has
    computed them."""

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


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    plan: PlanFn | None
    """None for a method that does not reuse cached KV (`full`)."""
    order: OrderFn | None = None
    query_scored: bool = False
    """Scores tokens by the question's attention (so `reorder_chunks` can use its scores)."""
    uses_ratio: bool = True

    @property
    def reuses_cache(self) -> bool:
        return self.plan is not None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    assert method.name not in REGISTRY, f"method {method.name!r} registered twice"
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method `name` (SelectionConfig has already checked the name)."""
    return REGISTRY[name]


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
    The suffix runs over the cache as it is (reused, not yet repaired), so this costs one |suffix|-row forward, up
    to the last scoring layer; each scoring layer's attention and scores come from one `stage1_attention` call.
    """
    end = cache.context_end
    scores = torch.zeros(end, dtype=torch.float32, device=cache.kv.device)
    wanted = frozenset(range(adapter.spec.num_layers) if layers is None else layers)
    prophet, norm = (scores, None) if kind == "prophet" else (None, scores)
    forward_rows(adapter, cache, suffix_rows, scoring=Scoring(wanted, prophet, norm, end), last_layer=max(wanted))
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


def plan(adapter: ModelAdapter, cache: StitchedCache, suffix_rows: torch.Tensor, config: SelectionConfig,
         selection: Selection | None = None) -> Plan:
    """The recomputation plan of `config.method` over an assembled cache (any method that reuses cached KV)."""
    selection = selection or Selection.of_cache(adapter, cache, suffix_rows, config)
    eligible = cache.eligible_slots()
    budget = budget_for(config.ratio, int(eligible.numel()))
    if budget == 0:
        return Plan(suffix_rows, eligible[:0])
    return get(config.method).plan(selection, cache, suffix_rows, budget)


def _selected(slots: torch.Tensor, suffix_rows: torch.Tensor) -> Plan:
    return Plan(torch.cat([slots, suffix_rows]), slots)


# ---- the methods --------------------------------------------------------------------------------------------------


def _reuse_plan(selection: Selection, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int) -> Plan:
    return _selected(cache.eligible_slots()[:0], suffix_rows)


def _random_plan(selection: Selection, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int) -> Plan:
    eligible = cache.eligible_slots()
    generator = torch.Generator().manual_seed(selection.config.seed)
    picks = torch.randperm(int(eligible.numel()), generator=generator)[:budget]
    return _selected(torch.sort(picks).values.to(eligible.device) + cache.prefix_len, suffix_rows)


def _epic_plan(selection: Selection, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int) -> Plan:
    """The first tokens of every chunk, `budget` in all, spread in proportion to chunk length (EPIC LegoLink)."""
    lengths = torch.tensor([end - start for start, end in cache.chunk_spans])
    eligible = int(lengths.sum())
    quota = (lengths * budget) // max(eligible, 1)
    # Hand the rounding remainder to the chunks with the most unused tokens, first chunks first on ties.
    spare = budget - int(quota.sum())
    for i in torch.sort(lengths - quota, descending=True, stable=True).indices[:spare]:
        quota[i] += 1
    slots = [torch.arange(start, start + int(q)) for (start, _), q in zip(cache.chunk_spans, quota, strict=True)]
    return _selected(torch.cat(slots).to(cache.kv.device), suffix_rows)


def _cacheblend_plan(selection: Selection, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int) -> Plan:
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


def _prophet_plan(selection: Selection, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int) -> Plan:
    scores = query_relevance(selection.adapter, cache, suffix_rows, "prophet", None)
    return _selected(top_slots(scores, budget, cache.prefix_len), suffix_rows)


def _infoflow_plan(selection: Selection, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int) -> Plan:
    scores = query_relevance(selection.adapter, cache, suffix_rows, "infoflow", selection.infoflow_layers)
    return _selected(top_slots(scores, budget, cache.prefix_len), suffix_rows)


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


def _lexical_order(selection: Selection, assemble: Assemble) -> list[int]:
    """The chunks sharing the query's rare tokens go last, next to the question."""
    relevance = selection.lexical
    return sorted(range(len(selection.chunk_ids)), key=lambda i: float(relevance[i]))


def _prophet_plus_plan(selection: Selection, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int) -> Plan:
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
    return _selected(top_slots(scores, budget, cache.prefix_len), suffix_rows)


def anchored_weights(chunks: list[torch.Tensor], query_ids: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """`[sum of chunk lengths]` each chunk token's share of the question's attention `mass` (same layout: the chunks
    end to end, in `chunks` order) when the question itself contains the token, weighted by the token's in-request
    IDF (see `lexical_relevance`; words in over three quarters of the chunks weigh nothing), else 0: attention
    anchored on the names and numbers the question asks about."""
    m = len(chunks)
    words = query_ids.unique()
    df = torch.stack([torch.isin(words, chunk) for chunk in chunks]).sum(dim=0).to(torch.float32)
    # Words in over three quarters of the chunks (the documents' shared phrasing) anchor nothing.
    idf = torch.where(df <= 0.75 * m, torch.log((m + 1) / (df + 0.5)), torch.zeros_like(df))
    hit = torch.cat(chunks)[:, None] == words[None, :]  # [C, |words|]
    weight = (hit.to(torch.float32) * idf).sum(dim=1)
    return mass.to(torch.float32) * weight.to(mass.device)


def anchored_relevance(chunks: list[torch.Tensor], query_ids: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """`[m]` each chunk's `anchored_weights` summed: the question's attention mass on the chunk's rare words that
    the question itself contains.

    Neither signal alone finds the answer's chunk reliably on both of our models: shared rare words alone picked the
    answer's `multi_key` chunk 10/12 times on SmolLM2 and 9/10 on Qwen2.5-0.5B, attention mass per chunk 1/12 and
    2/10 (it follows recency and sink tokens), the peak attention probability 10/12 and 1/10. Attention mass on the
    question's rare words picked it 12/12 and 10/10 (docs/RESULTS.md).
    """
    return chunk_sums(anchored_weights(chunks, query_ids, mass), chunks)


def chunk_sums(values: torch.Tensor, chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    """`[m]` sums of per-token `values` `[sum of chunk lengths]` over each chunk's tokens, the chunks end to end."""
    return torch.stack([part.sum() for part in torch.split(values, [int(chunk.numel()) for chunk in chunks])])


FOCUS_SHARE = 0.2
"""`prophet_focus` moves every chunk whose anchored relevance is at least this share of the best one. At half the
best, the second chunk of a two-chunk answer stayed behind (on Qwen2.5-0.5B `multi_value` it was at 0.12-0.40 of
the best in 10 of 12 cases): 0.56 against 0.75 at this share over 24 cases (docs/RESULTS.md)."""


def _focus_order(selection: Selection, assemble: Assemble) -> list[int]:
    """The chunks the question's attention is anchored on (at least `FOCUS_SHARE` of the best) move last, next to
    the question, in their retrieval order; the others keep theirs. No chunk moves when the question shares no word
    with any chunk. Moving only the best one kept multi-key lookups but lost multi-value and multi-query questions,
    whose answers span chunks; moving every chunk by a lexical prior (`prophet_plus`) over-moves look-alikes.

    The question is scored in the parallel geometry (each chunk at the positions it was computed at), where no chunk
    sits nearer the question than another (see `anchored_relevance`).
    """
    identity = list(range(len(selection.chunk_ids)))
    cache = assemble(identity, False)
    suffix_rows = cache.append_tokens(selection.suffix_ids.to(cache.kv.device))
    with torch.inference_mode():
        selection.parallel = query_relevance(selection.adapter, cache, suffix_rows, "prophet", None)
    focus = selection.focus
    return [i for i in identity if i not in focus] + [i for i in identity if i in focus]


def anchor_window(weights: torch.Tensor, size: int) -> tuple[int, int]:
    """`[start, end)` of the `size` consecutive tokens of a chunk centred on its strongest anchor (the largest of
    its tokens' anchored `weights` `[n]`), moved inward at the chunk's edges."""
    n = int(weights.numel())
    size = min(size, n)
    centre = int(torch.argmax(weights))
    start = min(max(centre - size // 2, 0), n - size)
    return start, start + size


def _focus_plan(selection: Selection, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int) -> Plan:
    """Whole chunks by anchored relevance, most relevant first, while they fit in the budget (the focus chunk, moved
    last, first of all). The focus chunks that did not fit share what is left equally, each as a window around its
    strongest anchor: a question whose answer spans chunks (several values, several keys) needs the answer's
    sentence in each, and ProphetKV's scattered tokens rarely hold it. Any budget the windows leave goes on the
    parallel Stage I's attention mass."""
    lengths = [int(ids.numel()) for ids in selection.chunk_ids]
    starts = torch.cumsum(torch.tensor([0, *lengths]), 0).tolist()
    # Token scores to layout order: the chunk at layout position j is chunk cache.order[j] of the request.
    index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in cache.order]).to(cache.kv.device)
    scores = selection.parallel_scores[index].clone()
    weights = selection.anchored_tokens[index]
    relevance = selection.anchored[list(cache.order)]
    ranked = torch.sort(relevance, descending=True, stable=True).indices.tolist()
    used, whole = 0, 0
    for j in ranked:
        start, end = cache.chunk_spans[j]
        if relevance[j] <= 0 or used + (end - start) > budget:
            break
        scores[start - cache.prefix_len : end - cache.prefix_len] = float("inf")
        used, whole = used + end - start, whole + 1
    partial = [j for j in ranked[whole:] if cache.order[j] in selection.focus]
    for j in partial:
        start, end = (slot - cache.prefix_len for slot in cache.chunk_spans[j])
        low, high = anchor_window(weights[start:end], (budget - used) // len(partial))
        scores[start + low : start + high] = float("inf")
    return _selected(top_slots(scores, budget, cache.prefix_len), suffix_rows)


register(Method("full", "plain full prefill over the same ids (the reference)", None, uses_ratio=False))
register(Method("reuse", "the stitched cached KV as it is, nothing recomputed", _reuse_plan, uses_ratio=False))
register(Method("cacheblend", "CacheBlend: largest V deviation at the check layer", _cacheblend_plan))
register(Method("epic", "EPIC LegoLink: the first tokens of every chunk", _epic_plan))
register(Method("random", "uniformly random tokens (a control)", _random_plan))
register(Method("prophet", "ProphetKV: the question's attention mass over all layers", _prophet_plan,
                order=_density_order("prophet"), query_scored=True))
register(Method("infoflow", "InfoFlow KV: attention norm on a layer subset", _infoflow_plan,
                order=_density_order("infoflow"), query_scored=True))
register(Method("prophet_plus", "ProphetKV plus a lexical chunk prior (chunks moved and recomputed whole)",
                _prophet_plus_plan, order=_lexical_order))
register(Method("prophet_focus", "ProphetKV in the parallel geometry; the chunks its attention is anchored on "
                "moved last and recomputed whole", _focus_plan, order=_focus_order))

METHODS: tuple[str, ...] = tuple(REGISTRY)
"""Selection methods, by name, in registration order."""
