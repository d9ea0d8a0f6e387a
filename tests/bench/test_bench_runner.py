"""Runner, resume and report writers, with a deterministic fake engine; one real end-to-end run on a tiny model."""

from __future__ import annotations

import json
import re

import pytest
import torch

from prophet_rag.bench.report import load_records, summarize, write_reports
from prophet_rag.bench.runner import BenchConfig, run_bench
from prophet_rag.errors import InvalidRequestError
from prophet_rag.results import Answer, RequestStats


class FakeEngine:
    """Answers right with full prefill or a ratio >= 0.2; reuse is wrong. Can be told to fail after N answers."""

    tokenizer = None

    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.fail_after = fail_after

    def ingest(self, chunks):
        return 0

    def answer(self, chunks, query, *, method=None, selection=None, generation=None, return_logits=False):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        method = method or selection.method
        ratio = 1.0 if method == "full" else selection.ratio
        right = method == "full" or (method != "reuse" and ratio >= 0.2)
        # Reads the planted value the way a perfect reader would, for the single-needle and vault phrasings.
        key = re.search(r"(?:number for|code of the) (\w+)", query).group(1)
        pattern = rf"(?:number for|code of the) {key}(?: vault)? is (\d+)"
        gold = next(m.group(1) for c in chunks for m in [re.search(pattern, c)] if m)
        text = f"It is {gold}." if right else "It is 0."
        stats = RequestStats(method, ratio, 5, 100, 10, int(ratio * 100), 5, 0, ttft_s=1.0 if method == "full" else
                             0.25, load_s=0.05, rerotate_s=0.05, select_s=0.05, recompute_s=0.1)
        logits = torch.tensor([1.0, 0.0]) if right else torch.tensor([0.0, 1.0])
        return Answer(text, (), stats, torch.zeros(0, dtype=torch.long), logits)


def _config(tmp_path, **kwargs):
    return BenchConfig(tasks=("single_needle", "multi_key"), methods=("full", "reuse", "prophet", "epic"),
                       ratios=(0.1, 0.2), num_cases=2, num_chunks=3, chunk_tokens=40, output_dir=tmp_path, **kwargs)


def test_records_every_case_method_and_ratio(tmp_path):
    path = run_bench(FakeEngine(), _config(tmp_path), progress=lambda m: None)
    records = load_records(path)
    assert len(records) == 2 * 2 * (2 + 2 * 2)
    full = [r for r in records if r["method"] == "full"]
    assert all(r["score"] == 1.0 and r["first_token_agree"] == 1.0 and r["kl"] == 0.0 for r in full)
    assert all(r["score"] == 0.0 for r in records if r["method"] == "reuse")


def test_interrupted_run_resumes_to_the_same_summary(tmp_path):
    clean = summarize(load_records(run_bench(FakeEngine(), _config(tmp_path / "clean"), progress=lambda m: None)))
    config = _config(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        run_bench(FakeEngine(fail_after=9), config, progress=lambda m: None)
    partial = len(load_records(config.output_dir / "results.jsonl"))
    assert 0 < partial < 24
    engine = FakeEngine()
    run_bench(engine, config, progress=lambda m: None)
    records = load_records(config.output_dir / "results.jsonl")
    assert len(records) == 24
    assert len({(r["case_id"], r["method"], r["ratio"]) for r in records}) == 24
    assert summarize(records) == clean


def test_summary_relative_accuracy_and_discriminative_cases(tmp_path):
    summary = summarize(load_records(run_bench(FakeEngine(), _config(tmp_path), progress=lambda m: None)))
    overall = summary["overall"]
    assert overall["full"]["relative_accuracy"] == 1.0
    assert overall["reuse"]["relative_accuracy"] == 0.0
    assert overall["prophet@0.2"]["relative_accuracy"] == 1.0
    assert overall["prophet@0.1"]["relative_accuracy"] == 0.0
    assert overall["prophet@0.2"]["relative_ttft"] == 0.25
    assert summary["discriminative_cases"] == 4


def test_reports_are_written(tmp_path):
    path = run_bench(FakeEngine(), _config(tmp_path), progress=lambda m: None)
    write_reports(path, tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "| prophet@0.2 | 1.00 | 1.00 |" in text
    assert json.loads((tmp_path / "summary.json").read_text())["cases"] == 4
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "kwargs, message",
    [({"methods": ("prophet",)}, "must include 'full'"), ({"tasks": ("nope",)}, "unknown tasks"),
     ({"ratios": (1.5,)}, "ratios"), ({"methods": ("full", "magic")}, "unknown methods")],
)
def test_bad_bench_config(tmp_path, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        BenchConfig(output_dir=tmp_path, **kwargs)


def test_end_to_end_tiny_model(make_engine, tmp_path):
    from prophet_rag.config import METHODS

    engine = make_engine("llama")
    config = BenchConfig(tasks=("multi_key",), methods=METHODS, ratios=(0.2,), num_cases=1, num_chunks=3,
                         chunk_tokens=30, max_new_tokens=4, output_dir=tmp_path / "out")
    path = run_bench(engine, config, progress=lambda m: None)
    summary = write_reports(path, config.output_dir)
    records = load_records(path)
    assert len(records) == len(config.runs()) == 2 + (len(METHODS) - 2)
    assert summary["overall"]["full"]["first_token_agree"] == 1.0
    assert (config.output_dir / "plot.png").exists()


def _row(task, case, method, ratio, score):
    return {"task": task, "case_id": case, "method": method, "ratio": ratio, "score": score, "f1": score,
            "first_token_agree": 1.0, "kl": 0.0, "ttft_s": 1.0, "load_s": 0.0, "rerotate_s": 0.0, "select_s": 0.0,
            "recompute_s": 1.0, "recomputed_tokens": 0, "context_tokens": 10, "text": ""}


def test_overall_relative_accuracy_is_a_ratio_of_task_means():
    # Task a: full 1, prophet 1. Task b: full solves one case in four, prophet another one of them.
    rows = [_row("a", "a-0", "full", 1.0, 1.0), _row("a", "a-0", "prophet", 0.2, 1.0)]
    for i in range(4):
        rows += [_row("b", f"b-{i}", "full", 1.0, float(i == 0)), _row("b", f"b-{i}", "prophet", 0.2, float(i < 2))]
    summary = summarize(rows)
    assert summary["tasks"]["b"]["prophet@0.2"]["relative_accuracy"] == 2.0
    # (1 + 0.5) / 2 over (1 + 0.25) / 2, not the mean of the per-task ratios 1 and 2.
    assert summary["overall"]["prophet@0.2"]["relative_accuracy"] == 1.5 / 1.25
