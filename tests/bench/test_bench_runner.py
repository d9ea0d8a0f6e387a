"""Runner, resume and report writers, with a deterministic fake engine; one real end-to-end run on a tiny model."""

from __future__ import annotations

import json
import re

import pytest
import torch

from prophet_rag.bench.report import load_records, sign_test, summarize, wilson_interval, write_reports
from prophet_rag.bench.runner import BenchConfig, run_bench, selected_per_chunk
from prophet_rag.errors import InvalidRequestError
from prophet_rag.results import Answer, RequestStats


class FakeEngine:
    """Answers right with full prefill or a ratio >= 0.2; reuse is wrong. Can be told to fail after N answers."""

    tokenizer = None

    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.fail_after = fail_after
        self.kwargs: list[dict] = []
        self.full_calls = 0

    def ingest(self, chunks):
        return 0

    def answer(self, chunks, query, *, method=None, selection=None, generation=None, return_logits=False, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.kwargs.append(kwargs)
        self.full_calls += method == "full"
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
    assert "| prophet@0.2 | 1.00 [0.51-1.00] | 1.00 |" in text
    assert "## Accuracy per task at ratio 0.2" in text
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
    from prophet_rag.methods import METHODS

    engine = make_engine("llama")
    config = BenchConfig(tasks=("multi_key",), methods=METHODS, ratios=(0.2,), num_cases=1, num_chunks=3,
                         chunk_tokens=30, max_new_tokens=4, output_dir=tmp_path / "out")
    path = run_bench(engine, config, progress=lambda m: None)
    summary = write_reports(path, config.output_dir)
    records = load_records(path)
    assert len(records) == len(config.runs()) == 2 + (len(METHODS) - 2)
    assert summary["overall"]["full"]["first_token_agree"] == 1.0
    assert (config.output_dir / "plot.png").exists()
    for r in records:  # every recomputed token is counted in exactly one chunk, reordering methods included
        assert sum(r["selected_per_chunk"]) == r["recomputed_tokens"], r["method"]
        assert len(r["chunk_tokens"]) == 3 and r["model"]
    # One hf_last timing per case, shared by the case's records, and the report quotes TTFT against it.
    assert len({r["hf_last_s"] for r in records}) == 1 and records[0]["hf_last_s"] > 0
    assert summary["overall"]["prophet_focus@0.2"]["relative_hf_last"] > 0
    assert "| TTFT s | TTFT x hf_last | TTFT x full |" in (config.output_dir / "results.md").read_text()


def _row(task, case, method, ratio, score):
    return {"task": task, "case_id": case, "method": method, "ratio": ratio, "score": score, "f1": score,
            "first_token_agree": 1.0, "kl": 0.0, "ttft_s": 1.0, "load_s": 0.0, "rerotate_s": 0.0, "select_s": 0.0,
            "recompute_s": 1.0, "recomputed_tokens": 0, "context_tokens": 10, "text": ""}


def test_ttft_against_hf_last_is_a_ratio_of_means_over_the_timed_records():
    rows = [_row("a", f"a-{i}", "prophet", 0.2, 1.0) | {"ttft_s": t, "hf_last_s": h}
            for i, (t, h) in enumerate([(1.0, 4.0), (2.0, 4.0)])]
    rows.append(_row("a", "a-2", "prophet", 0.2, 1.0))  # recorded before hf_last was timed: left out of the ratio
    rows += [_row("b", "b-0", "prophet", 0.2, 1.0) | {"ttft_s": 1.0, "hf_last_s": 2.0}]
    summary = summarize(rows)
    assert summary["tasks"]["a"]["prophet@0.2"]["relative_hf_last"] == pytest.approx(1.5 / 4.0)
    assert summary["overall"]["prophet@0.2"]["relative_hf_last"] == pytest.approx((0.375 + 0.5) / 2)


def test_without_any_hf_last_timing_the_ratio_is_unknown(tmp_path):
    path = run_bench(FakeEngine(), _config(tmp_path), progress=lambda m: None)  # a fake engine has no prompt builder
    assert all(r["hf_last_s"] is None for r in load_records(path))
    summary = write_reports(path, tmp_path)
    assert summary["overall"]["prophet@0.2"]["relative_hf_last"] is None
    assert "| 0.250 | - | 0.25 |" in (tmp_path / "results.md").read_text()


def test_overall_relative_accuracy_is_a_ratio_of_task_means():
    # Task a: full 1, prophet 1. Task b: full solves one case in four, prophet another one of them.
    rows = [_row("a", "a-0", "full", 1.0, 1.0), _row("a", "a-0", "prophet", 0.2, 1.0)]
    for i in range(4):
        rows += [_row("b", f"b-{i}", "full", 1.0, float(i == 0)), _row("b", f"b-{i}", "prophet", 0.2, float(i < 2))]
    summary = summarize(rows)
    assert summary["tasks"]["b"]["prophet@0.2"]["relative_accuracy"] == 2.0
    # (1 + 0.5) / 2 over (1 + 0.25) / 2, not the mean of the per-task ratios 1 and 2.
    assert summary["overall"]["prophet@0.2"]["relative_accuracy"] == 1.5 / 1.25


def test_wilson_interval_matches_hand_computed_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(24, 24) == pytest.approx((0.8620, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_sign_test():
    assert sign_test(0, 5) == pytest.approx(2 / 32)
    assert sign_test(8, 1) == pytest.approx(2 * 10 / 512)
    assert sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0


def test_summary_pairs_every_method_case_by_case(tmp_path):
    summary = summarize(load_records(run_bench(FakeEngine(), _config(tmp_path), progress=lambda m: None)))
    overall = summary["overall"]
    # prophet@0.1 is wrong on all 4 cases where full is right; epic@0.2 ties prophet@0.2 everywhere.
    assert overall["prophet@0.1"]["vs_full"] == {"wins": 0, "losses": 4, "ties": 0, "p": 0.125}
    assert overall["epic@0.2"]["vs_baseline"] == {"wins": 0, "losses": 0, "ties": 4, "p": 1.0}
    assert overall["epic@0.1"]["vs_baseline"]["ties"] == 4
    assert overall["full"]["vs_baseline"] is None
    assert overall["prophet@0.2"]["ci"] == pytest.approx(wilson_interval(4, 4))
    assert summary["task_cases"] == {"multi_key": {"cases": 2, "discriminative_cases": 2},
                                     "single_needle": {"cases": 2, "discriminative_cases": 2}}
    task = summary["tasks"]["multi_key"]["prophet@0.2"]
    assert task["discriminative_ci"] == pytest.approx(wilson_interval(2, 2))
    assert task["spent_ratio"] == pytest.approx(0.2)


def test_records_are_tagged_and_models_resume_and_report_apart(tmp_path):
    run_bench(FakeEngine(), _config(tmp_path, model_tag="small"), progress=lambda m: None)
    engine = FakeEngine()
    run_bench(engine, _config(tmp_path, model_tag="large"), progress=lambda m: None)
    assert engine.calls == 4 * (1 + 1 + 2 * 2)  # nothing of "small" counts as done for "large"
    records = load_records(tmp_path / "results.jsonl")
    assert {r["model"] for r in records} == {"small", "large"} and len(records) == 48
    summary = write_reports(tmp_path / "results.jsonl", tmp_path)
    assert set(summary["models"]) == {"small", "large"}
    assert summary["models"]["large"]["cases"] == 4
    assert (tmp_path / "plot-small.png").exists() and (tmp_path / "plot-large.png").exists()
    text = (tmp_path / "results.md").read_text()
    assert "# small" in text and "# large" in text


def test_records_without_a_model_resume_as_the_current_model(tmp_path):
    path = run_bench(FakeEngine(), _config(tmp_path, model_tag="m"), progress=lambda m: None)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "model"}) + "\n" for r in rows))
    engine = FakeEngine()
    run_bench(engine, _config(tmp_path, model_tag="m"), progress=lambda m: None)
    assert engine.calls == 0


def test_selected_tokens_are_counted_per_chunk_in_request_order():
    stats = RequestStats("prophet", 0.2, 5, 30, 3, 4, 0, 0, 1.0, 0.0, 0.0, 0.0, 1.0)
    # Chunks of 10, 20 (request order) laid out reversed: chunk 1 at positions 5-24, chunk 0 at 25-34.
    answer = Answer("", (), stats, torch.tensor([5, 24, 25, 34]), None, (1, 0))
    assert selected_per_chunk(answer, [10, 20]) == [2, 2]
    answer = Answer("", (), stats, torch.tensor([5, 6, 14, 15]), None, ())
    assert selected_per_chunk(answer, [10, 20]) == [3, 1]
    assert selected_per_chunk(answer, None) is None


def test_retriever_scores_reach_the_engine_only_when_a_case_has_them(tmp_path):
    path = tmp_path / "cases.jsonl"
    rows = [{"chunks": ["The vault code of the amber vault is 12345."], "query": "code of the amber vault?",
             "answers": ["12345"], "scores": [0.7]},
            {"chunks": ["The vault code of the amber vault is 12345."], "query": "code of the amber vault?",
             "answers": ["12345"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    engine = FakeEngine()
    config = BenchConfig(methods=("full", "prophet"), ratios=(0.2,), num_cases=2, output_dir=tmp_path / "out",
                         jsonl=path)
    run_bench(engine, config, progress=lambda m: None)
    assert engine.kwargs == [{}, {"chunk_scores": (0.7,)}, {}, {}]


def test_range_settings_are_validated(tmp_path):
    with pytest.raises(InvalidRequestError, match="low to high"):
        BenchConfig(output_dir=tmp_path, chunk_tokens=(300, 150))
    assert BenchConfig(output_dir=tmp_path, num_chunks=(8, 10), chunk_tokens=(150, 300)).num_chunks == (8, 10)


def _extended(tmp_path, ratios):
    return BenchConfig(tasks=("single_needle", "multi_key"), methods=("full", "reuse", "prophet", "epic", "random"),
                       ratios=ratios, num_cases=2, num_chunks=3, chunk_tokens=40, output_dir=tmp_path)


def test_extending_a_run_reuses_the_stored_full_prefill_reference(tmp_path):
    run_bench(FakeEngine(), _config(tmp_path), progress=lambda m: None)
    engine = FakeEngine()
    run_bench(engine, _extended(tmp_path, (0.1, 0.2)), progress=lambda m: None)
    assert engine.full_calls == 0 and engine.calls == 4 * 2
    records = load_records(tmp_path / "results.jsonl")
    assert all(r["kl"] == 0.0 for r in records if r["method"] == "random" and r["ratio"] == 0.2)
    for path in (tmp_path / "reference").rglob("*.pt"):  # a torn reference file is recomputed, not trusted
        path.write_bytes(b"torn")
    engine = FakeEngine()
    run_bench(engine, _extended(tmp_path, (0.3,)), progress=lambda m: None)
    assert engine.full_calls == 4
