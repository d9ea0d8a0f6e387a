"""The method registry: one entry per method, read by the configuration, the engine, the CLI and the bench."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from prophet_rag import methods
from prophet_rag.bench.runner import BenchConfig
from prophet_rag.cli import build_parser
from prophet_rag.config import GenerationConfig, SelectionConfig
from prophet_rag.errors import InvalidRequestError
from prophet_rag.selection import request
from tiny import CHUNKS, QUERY


def test_every_method_is_registered_once_in_order():
    assert methods.METHODS == tuple(methods.REGISTRY)
    assert methods.METHODS[0] == "full"


def test_every_plan_and_ordering_name_points_at_a_function():
    for method in methods.REGISTRY.values():
        assert (method.plan is None) == (method.name == "full")
        for function in (method.plan, method.order):
            assert function is None or callable(function)
    assert methods.get("prophet").order is methods.get("prophet").order  # resolved once


def test_the_registry_needs_no_torch():
    code = "import sys; import prophet_rag.config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"


def test_flags_describe_the_methods():
    assert not methods.get("full").reuses_cache
    assert [m for m in methods.METHODS if not methods.get(m).uses_ratio] == ["full", "reuse"]
    assert [m for m in methods.METHODS if methods.get(m).query_scored] == ["prophet", "infoflow"]


def test_bench_runs_ratio_free_methods_once():
    runs = BenchConfig(methods=("full", "reuse", "prophet"), ratios=(0.1, 0.2)).runs()
    assert runs == [("full", 1.0), ("reuse", 0.0), ("prophet", 0.1), ("prophet", 0.2)]


def test_cli_offers_the_registered_methods():
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["ask"]._actions
                  if a.dest == "method")
    assert tuple(action.choices) == methods.METHODS
    assert action.default == SelectionConfig().method


def test_unknown_method_lists_the_registry():
    with pytest.raises(InvalidRequestError, match="choose one of full, reuse"):
        SelectionConfig(method="nope")


def last_tokens_plan(selection, cache, suffix_rows, budget):
    return request.Plan(torch.cat([cache.eligible_slots()[-budget:], suffix_rows]), cache.eligible_slots()[-budget:])


@pytest.fixture
def last_tokens_method():
    """A method added the way a contributor would: one plan function and one `register` call."""
    methods.register(methods.Method("last_tokens", "the last tokens of the context", f"{__name__}:last_tokens_plan"))
    yield "last_tokens"
    del methods.REGISTRY["last_tokens"]


def test_a_registered_method_runs_through_the_engine_unchanged(make_engine, last_tokens_method):
    engine = make_engine("llama")
    answer = engine.answer(CHUNKS, QUERY, method=last_tokens_method, ratio=0.25,
                           generation=GenerationConfig(max_new_tokens=2))
    stats = answer.stats
    k = int(0.25 * stats.context_tokens)
    end = stats.prefix_tokens + stats.context_tokens
    assert answer.recomputed_positions.tolist() == list(range(end - k, end))


def test_reorder_needs_a_query_scored_method(make_engine):
    engine = make_engine("llama")
    with pytest.raises(InvalidRequestError, match=r"query-scored method \(prophet, infoflow\)"):
        engine.answer(CHUNKS, QUERY, selection=SelectionConfig(method="epic", reorder_chunks=True))


def test_prophet_plus_computes_its_lexical_prior_once_per_request(make_engine, monkeypatch):
    engine = make_engine("llama")
    calls = []
    original = request.lexical_relevance
    monkeypatch.setattr(request, "lexical_relevance", lambda *a: calls.append(1) or original(*a))
    engine.answer(CHUNKS, QUERY, method="prophet_plus", ratio=0.5, generation=GenerationConfig(max_new_tokens=1))
    assert len(calls) == 1
