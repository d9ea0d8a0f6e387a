"""The selection methods, by name: each declared once, with everything the configuration, the engine, the CLI and
the bench read about it.

A method is a `Method` in `REGISTRY`: a one-line summary, its flags (does it reuse cached KV at all, is it
query-scored, does it take a ratio) and where its code lives in `prophet_rag.selection`, as "module:function" names
resolved on first use: its plan (which rows the selective forward starts with) and, if it moves chunks, its ordering.
This module imports neither torch nor the selection code, so `config` checks a method name against it while
`import prophet_rag` stays light. Adding a method is its functions in `prophet_rag/selection/` and one `register`
call here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    plan_at: str | None
    """"module:function" of its plan, `plan(selection, cache, suffix_rows, budget) -> Plan` (`selection.request`);
    None for a method that does not reuse cached KV (`full`)."""
    order_at: str | None = None
    """"module:function" of its chunk ordering, `order(selection, assemble) -> list[int] | None`; None when it keeps
    the request (retrieval) order."""
    query_scored: bool = False
    """Scores tokens by the question's attention (so `reorder_chunks` can use its scores)."""
    uses_ratio: bool = True

    @property
    def reuses_cache(self) -> bool:
        return self.plan_at is not None

    @property
    def plan(self) -> Callable | None:
        return None if self.plan_at is None else resolve(self.plan_at)

    @property
    def order(self) -> Callable | None:
        return None if self.order_at is None else resolve(self.order_at)


@cache
def resolve(name: str) -> Callable:
    """The function that a "module:function" name points at, its module imported on first use."""
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    assert method.name not in REGISTRY, f"method {method.name!r} registered twice"
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method `name` (SelectionConfig has already checked the name)."""
    return REGISTRY[name]


_BASELINES = "prophet_rag.selection.baselines"
_PROPHET = "prophet_rag.selection.prophet"
_FOCUS = "prophet_rag.selection.prophet_focus"

register(Method("full", "plain full prefill over the same ids (the reference)", None, uses_ratio=False))
register(Method("reuse", "the stitched cached KV as it is, nothing recomputed", f"{_BASELINES}:reuse_plan",
                uses_ratio=False))
register(Method("cacheblend", "CacheBlend: largest V deviation at the check layer", f"{_BASELINES}:cacheblend_plan"))
register(Method("epic", "EPIC LegoLink: the first tokens of every chunk", f"{_BASELINES}:epic_plan"))
register(Method("random", "uniformly random tokens (a control)", f"{_BASELINES}:random_plan"))
register(Method("prophet", "ProphetKV: the question's attention mass over all layers", f"{_PROPHET}:prophet_plan",
                order_at=f"{_PROPHET}:prophet_density_order", query_scored=True))
register(Method("infoflow", "InfoFlow KV: attention norm on a layer subset", f"{_PROPHET}:infoflow_plan",
                order_at=f"{_PROPHET}:infoflow_density_order", query_scored=True))
register(Method("prophet_plus", "ProphetKV plus a lexical chunk prior (chunks moved and recomputed whole)",
                f"{_PROPHET}:prophet_plus_plan", order_at=f"{_PROPHET}:lexical_order"))
register(Method("prophet_focus", "ProphetKV in the parallel geometry; the chunks its attention is anchored on "
                "moved last and recomputed whole (plain ProphetKV when they are half the chunks or more)",
                f"{_FOCUS}:focus_plan", order_at=f"{_FOCUS}:focus_order"))

register(Method("prophet_anchor", "prophet_focus's selection with every chunk in its retrieval place (no move)",
                f"{_FOCUS}:focus_plan", order_at=f"{_FOCUS}:anchored_in_place"))

METHODS: tuple[str, ...] = tuple(REGISTRY)
"""Selection methods, by name, in registration order."""
