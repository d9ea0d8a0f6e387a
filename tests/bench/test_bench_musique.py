"""Real multi-hop cases (CacheBlend's musique_s.json format), teacher forcing, and fidelity to full prefill."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prophet_rag.bench import fidelity
from prophet_rag.bench.musique import MUSIQUE_PROMPT, answer_passages, load_musique
from prophet_rag.bench.report import load_records, write_reports
from prophet_rag.bench.runner import BenchConfig, run_bench
from prophet_rag.errors import InvalidRequestError
from tiny import CHUNKS, QUERY

ROWS = [
    {"question": "Where was the author of Hannibal and Scipio educated at",
     "answers": ["Exeter College", "Exeter"],
     "ctxs": [{"title": "", "text": "Hannibal and Scipio is a play by Thomas Nabbes."},
              {"title": "Thomas Nabbes", "text": "Thomas Nabbes studied at Exeter College, Oxford."}]},
    {"question": "Who founded the bakery?", "answers": ["Ada Lovelace"],
     "ctxs": [{"title": "", "text": "The bakery opened in 1840."}, {"title": "", "text": "It sold bread."}]},
]


@pytest.fixture
def musique_file(tmp_path):
    path = tmp_path / "musique_s.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    return path


def test_loads_cases_with_passages_as_chunks(musique_file):
    cases = load_musique(musique_file, range(0, 2))
    assert [c.case_id for c in cases] == ["musique-0", "musique-1"]
    assert cases[0].chunks == ("Hannibal and Scipio is a play by Thomas Nabbes.",
                               "Thomas Nabbes\n\nThomas Nabbes studied at Exeter College, Oxford.")
    assert cases[0].query == "where was the author of Hannibal and Scipio educated at?"  # CacheBlend's normalisation
    assert cases[0].answers == ("Exeter College", "Exeter")


def test_evidence_is_the_passages_holding_an_answer(musique_file):
    cases = load_musique(musique_file, range(0, 2))
    assert cases[0].evidence_chunks == (1,)
    assert cases[1].evidence_chunks == ()  # the answer is nowhere: nothing named


def test_answer_passages_match_whole_words_only():
    assert answer_passages(("Exeterville is a town.", "He went to Exeter."), ("Exeter",)) == (1,)


def test_case_range_outside_the_file_is_refused(musique_file):
    with pytest.raises(InvalidRequestError, match="outside the file's 0-1"):
        load_musique(musique_file, range(1, 5))


def test_missing_file_names_where_to_get_it(tmp_path):
    with pytest.raises(InvalidRequestError, match="YaoJiayi/CacheBlend"):
        load_musique(tmp_path / "nope.json")


@pytest.mark.parametrize("row, problem", [
    ({"question": "q", "answers": [], "ctxs": [{"text": "t"}]}, "answers"),
    ({"question": "", "answers": ["a"], "ctxs": [{"text": "t"}]}, "question"),
    ({"question": "q", "answers": ["a"], "ctxs": [{"text": " "}]}, "text"),
])
def test_malformed_cases_are_refused_with_the_field(tmp_path, row, problem):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([row]), encoding="utf-8")
    with pytest.raises(InvalidRequestError, match=problem):
        load_musique(path, range(0, 1))


def test_continuation_logits_of_full_prefill_follow_its_greedy_answer(make_engine):
    engine = make_engine("llama")
    answer = engine.answer(CHUNKS, QUERY, method="full", return_logits=True)
    assert len(answer.token_ids) >= 3
    (rows,) = engine.continuation_logits(CHUNKS, QUERY, [list(answer.token_ids)], method="full")
    assert rows.shape == (len(answer.token_ids), engine.adapter.model.config.vocab_size)
    assert torch.allclose(rows[0], answer.first_token_logits.float(), atol=1e-4)
    assert rows.argmax(-1).tolist() == list(answer.token_ids)


def test_continuations_are_forced_independently(make_engine):
    engine = make_engine("llama")
    a, b = [5, 6, 7], [9, 10]
    alone = engine.continuation_logits(CHUNKS, QUERY, [b], method="prophet", ratio=0.2)[0]
    after_a = engine.continuation_logits(CHUNKS, QUERY, [a, b], method="prophet", ratio=0.2)[1]
    assert torch.allclose(alone, after_a, atol=1e-5)


def test_empty_continuation_is_refused(make_engine):
    engine = make_engine("llama")
    with pytest.raises(InvalidRequestError, match="non-empty"):
        engine.continuation_logits(CHUNKS, QUERY, [[]])


def test_full_prefill_measured_against_itself_has_no_gap(make_engine):
    engine = make_engine("llama")
    full = engine.answer(CHUNKS, QUERY, method="full")
    ref = fidelity.reference(engine, CHUNKS, QUERY, ("Paris",), full.text, full.token_ids)
    same = fidelity.measure(engine, CHUNKS, QUERY, ("Paris",), fidelity.SelectionConfig(method="full"), full.text, ref)
    assert same["gold_ll_gap"] == pytest.approx(0.0, abs=1e-4)
    assert same["kl8"] == pytest.approx(0.0, abs=1e-6)
    assert ref.gold_ll < 0


def test_reuse_diverges_from_full_prefill(make_engine):
    engine = make_engine("llama")
    engine.ingest(CHUNKS)
    full = engine.answer(CHUNKS, QUERY, method="full")
    ref = fidelity.reference(engine, CHUNKS, QUERY, ("Paris",), full.text, full.token_ids)
    reuse = fidelity.measure(engine, CHUNKS, QUERY, ("Paris",), fidelity.SelectionConfig(method="reuse", ratio=0.0),
                             "something else", ref)
    assert reuse["kl8"] > 1e-4
    assert reuse["gold_ll_gap"] != pytest.approx(0.0, abs=1e-4)
    assert reuse["agreement_f1"] < 1.0


def test_reference_round_trips_through_its_file(tmp_path):
    ref = fidelity.Reference("Exeter", [3, 4], torch.log_softmax(torch.randn(2, 11), -1), -3.5)
    ref.save(tmp_path / "r.pt")
    back = fidelity.Reference.load(tmp_path / "r.pt")
    assert back.text == "Exeter" and back.forced == [3, 4] and back.gold_ll == -3.5
    assert torch.allclose(back.log_probs, ref.log_probs, atol=1e-2)
    (tmp_path / "torn.pt").write_bytes(b"\x00\x01")
    assert fidelity.Reference.load(tmp_path / "torn.pt") is None


def test_bootstrap_interval_brackets_the_mean():
    low, high = fidelity.bootstrap_interval([0.0, 1.0] * 20)
    assert low < 0.5 < high
    assert fidelity.bootstrap_interval([2.0]) == (2.0, 2.0)


def test_evidence_fields_count_tokens_and_moves():
    record = {"evidence_chunks": [1], "selected_per_chunk": [0, 5, 1], "chunk_tokens": [10, 10, 10],
              "chunk_order": [0, 2, 1]}
    assert fidelity.evidence_fields(record) == {"evidence_share": 0.5, "evidence_moved": 1.0}
    assert fidelity.evidence_fields({**record, "evidence_chunks": []}) == {}


def _fid(case, method, ratio, gap, kl, agree):
    return {"model": "m", "task": "musique", "case_id": case, "method": method, "ratio": ratio, "score": 0.0,
            "f1": 0.0, "gold_ll": gap - 3.0, "gold_ll_gap": gap, "kl8": kl, "first_token_agree": 1.0,
            "agreement_f1": agree}


def test_summary_pairs_the_default_with_each_method_at_its_ratio():
    records = [_fid(f"c{i}", "prophet_focus", 0.2, -0.1, 0.1, 0.9) for i in range(4)] + \
              [_fid(f"c{i}", "prophet", 0.2, -0.5, 0.3, 0.5) for i in range(4)] + \
              [_fid(f"c{i}", "prophet", 0.1, -0.9, 0.9, 0.1) for i in range(4)]
    summary = fidelity.summarize(records)
    assert set(summary["paired"]) == {"prophet_focus@0.2 - prophet@0.2"}
    pair = summary["paired"]["prophet_focus@0.2 - prophet@0.2"]
    assert pair["cases"] == 4
    assert pair["gold_ll_gap"]["mean"] == pytest.approx(0.4)
    assert pair["kl8"]["mean"] == pytest.approx(-0.2)
    assert "prophet_focus@0.2" in fidelity.markdown(summary)


def test_musique_bench_end_to_end_on_a_tiny_model(make_engine, musique_file, tmp_path):
    engine = make_engine("llama", prompt=MUSIQUE_PROMPT)
    config = BenchConfig(methods=("full", "reuse", "prophet_focus"), ratios=(0.2,), num_cases=2,
                         musique=musique_file, output_dir=tmp_path / "out", max_new_tokens=4)
    path = run_bench(engine, config, progress=lambda m: None)
    records = load_records(path)
    assert len(records) == 2 * 3
    for r in records:
        assert {"gold_ll", "gold_ll_gap", "kl8", "agreement_f1", "chunk_order"} <= set(r)
        assert math.isfinite(r["gold_ll"])
    full = [r for r in records if r["method"] == "full"]
    assert all(r["gold_ll_gap"] == pytest.approx(0.0, abs=1e-4) for r in full)
    summary = write_reports(path, tmp_path / "out", with_plot=False)
    assert "prophet_focus@0.2 - reuse" in summary["fidelity"]["paired"]
    assert "Fidelity to full prefill" in (tmp_path / "out" / "results.md").read_text(encoding="utf-8")


def test_musique_and_jsonl_together_are_refused(tmp_path):
    with pytest.raises(InvalidRequestError, match="either musique or jsonl"):
        BenchConfig(musique=tmp_path / "a.json", jsonl=tmp_path / "b.jsonl")


def test_cli_takes_a_dataset_and_opens_the_engine_with_its_prompt(musique_file, tmp_path, make_engine):
    from prophet_rag.bench.cli import run_bench_command
    from prophet_rag.cli import build_parser

    args = build_parser().parse_args(["bench", "--dataset", "musique", str(musique_file), "--cases", "1",
                                      "--methods", "full,reuse", "--out", str(tmp_path / "o"), "--no-plot"])
    prompts = []

    def factory(prompt):
        prompts.append(prompt)
        return make_engine("llama", prompt=prompt)

    assert run_bench_command(args, factory) == 0
    assert prompts == [MUSIQUE_PROMPT]
    assert len(load_records(tmp_path / "o" / "results.jsonl")) == 2


def test_cli_refuses_an_unknown_dataset(tmp_path):
    from prophet_rag.bench.cli import run_bench_command
    from prophet_rag.cli import build_parser

    args = build_parser().parse_args(["bench", "--dataset", "hotpot", "x.json"])
    with pytest.raises(InvalidRequestError, match="'musique PATH'"):
        run_bench_command(args, lambda prompt: None)
