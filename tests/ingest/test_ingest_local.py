"""In-process ingestion (ingest.py, `cache ingest` without --ray): planning before compute, per-file failures, the
summary, and the CLI's errors for Ray options."""

from __future__ import annotations

import sys

import pytest
import torch
from ingest_helpers import BAD, GOOD, stored_entries, write_corpus

from prophet_rag import ingest
from prophet_rag.cli import main
from prophet_rag.errors import ProphetRAGError


def _counting(engine) -> list[int]:
    """Count the chunks `engine` prefills from now on (one entry per compute call, its chunk count)."""
    calls: list[int] = []
    compute = engine.cache._compute

    def counted(sink, chunks):
        calls.append(len(chunks))
        return compute(sink, chunks)

    engine.cache._compute = counted
    return calls


def test_every_good_file_is_stored_under_the_key_engine_ingest_uses(make_engine, corpus):
    engine = make_engine()
    summary = ingest.ingest_files(engine, ingest.text_files(corpus), show_progress=False)
    assert summary.computed == len(GOOD)
    keys = {engine.cache.ref(engine.builder.layout([text], "q").chunk_ids[0], engine.sink_ids).key
            for text in GOOD.values()}
    assert set(stored_entries(engine.store.directory)) == keys
    assert engine.ingest(list(GOOD.values())) == 0  # engine.ingest finds every chunk stored


def test_summary_counts_each_outcome(make_engine, corpus):
    summary = ingest.ingest_files(make_engine(), ingest.text_files(corpus), show_progress=False)
    assert summary.files == len(GOOD) + len(BAD) + 2  # empty.txt and copy-of-a.txt; notes.json is not read
    assert (summary.computed, summary.stored, summary.empty, len(summary.failed)) == (len(GOOD), 1, 1, len(BAD))
    assert summary.sent == len(GOOD) and summary.workers == 0


def test_tokens_are_the_computed_chunks_tokens(make_engine, corpus):
    engine = make_engine()
    summary = ingest.ingest_files(engine, ingest.text_files(corpus), show_progress=False)
    layout = engine.builder.layout(list(GOOD.values()), "q")
    assert summary.tokens == sum(int(ids.numel()) for ids in layout.chunk_ids)
    assert summary.compute_s > 0 and summary.tokens_per_s == pytest.approx(summary.tokens / summary.compute_s)


def test_failures_name_the_file_and_the_reason(make_engine, corpus):
    summary = ingest.ingest_files(make_engine(), ingest.text_files(corpus), show_progress=False)
    reasons = {name.rsplit("/", 1)[-1]: reason for name, reason in summary.failed}
    assert set(reasons) == set(BAD)
    for name, words in BAD.items():
        assert words in reasons[name]
    assert "2802 tokens" in reasons["b-too-long.txt"] and "byte 0" in reasons["c.txt"]


def test_a_second_ingest_computes_nothing(make_engine, corpus):
    engine = make_engine()
    ingest.ingest_files(engine, ingest.text_files(corpus), show_progress=False)
    calls = _counting(engine)
    again = ingest.ingest_files(engine, ingest.text_files(corpus), show_progress=False)
    assert calls == [] and again.sent == 0 and again.computed == 0 and again.tokens == 0
    assert again.stored == len(GOOD) + 1


def test_chunks_are_computed_one_at_a_time(make_engine, corpus):
    # One chunk per prefill: a batch pads chunks to a common length, which can change their KV's last bits.
    engine = make_engine()
    calls = _counting(engine)
    ingest.ingest_files(engine, ingest.text_files(corpus), show_progress=False)
    assert calls == [1] * len(GOOD)


def test_plan_yields_each_file_in_order_without_computing(make_engine, corpus):
    engine = make_engine()
    calls = _counting(engine)
    files = ingest.text_files(corpus)
    planned = list(ingest.plan(files, engine.builder, engine.cache, ingest.chunk_limit(engine)))
    assert [p.name for p in planned] == [str(f) for f in files] and calls == []
    status = {p.name.rsplit("/", 1)[-1]: p.status for p in planned}
    assert status["a.txt"] == "todo" and status["copy-of-a.txt"] == "stored"  # same text, planned once
    assert status["empty.txt"] == "empty" and status["c.txt"] == "failed"


def test_compute_refuses_a_key_the_engine_does_not_derive(make_engine):
    engine = make_engine()
    ids = engine.builder.layout(["The vault code of Alpha is 4821."], "q").chunk_ids[0]
    (computed, error), = ingest.compute(engine.cache, [("0" * 64, ids.tolist())])
    assert not computed and "derives another key" in error and len(engine.store) == 0


def test_compute_reports_a_failing_chunk_and_runs_the_others(make_engine):
    engine = make_engine()
    chunks = [engine.builder.layout([text], "q").chunk_ids[0] for text in GOOD.values()]
    refs = [engine.cache.ref(ids, engine.sink_ids) for ids in chunks]
    compute = engine.cache._compute

    def failing_second(sink, batch):
        if torch.equal(batch[0], chunks[1]):
            raise RuntimeError("out of memory")
        return compute(sink, batch)

    engine.cache._compute = failing_second
    results = ingest.compute(engine.cache, [(ref.key, ref.token_ids.tolist()) for ref in refs])
    assert results[1] == (False, "RuntimeError: out of memory")
    assert [r for i, r in enumerate(results) if i != 1] == [(True, None)] * (len(GOOD) - 1)
    assert len(engine.store) == len(GOOD) - 1


def test_summary_line_says_every_count():
    summary = ingest.IngestSummary(files=9, computed=4, tokens=120, stored=2, empty=1,
                                   failed=[("x", "y"), ("z", "w")], compute_s=0.5, total_s=1.25, workers=2)
    assert summary.line() == ("9 files: 4 chunks computed on 2 Ray workers (120 tokens, 240 tokens/s), "
                              "2 skipped (already stored), 1 empty, 2 failed (1.2 s).")
    assert ingest.IngestSummary().tokens_per_s == 0.0


def test_cli_plain_ingest_prints_the_summary_and_fails_on_bad_files(tmp_path, capsys, tiny_model_folder, corpus):
    store = tmp_path / "kv"
    assert main(["cache", "ingest", "--model", str(tiny_model_folder), "--store", str(store), str(corpus)]) == 1
    out = capsys.readouterr()
    assert "4 chunks computed (" in out.out and "1 skipped (already stored), 1 empty, 2 failed" in out.out
    assert out.err.strip().splitlines()[-1] == "prophet-rag: error: 2 of 8 files could not be cached (listed above)."
    assert len(stored_entries(store)) == len(GOOD)


def test_cli_plain_ingest_of_good_files_exits_zero(tmp_path, capsys, tiny_model_folder):
    (tmp_path / "docs").mkdir()
    docs = write_corpus(tmp_path / "docs", bad=False)
    args = ["cache", "ingest", "--model", str(tiny_model_folder), "--store", str(tmp_path / "kv"), str(docs)]
    assert main(args) == 0
    assert main(args) == 0
    assert "0 chunks computed (0 tokens, 0 tokens/s), 5 skipped (already stored)" in capsys.readouterr().out


def test_ray_options_without_ray_are_refused(tmp_path, capsys, corpus):
    assert main(["cache", "ingest", "--workers", "2", "--store", str(tmp_path / "kv"), str(corpus)]) == 2
    assert "need --ray" in capsys.readouterr().err


def test_ray_missing_is_one_error_line_naming_the_extra(tmp_path, capsys, monkeypatch, corpus):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    assert main(["cache", "ingest", "--ray", "--store", str(tmp_path / "kv"), str(corpus)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prophet-rag: error: --ray needs Ray")
    assert "pip install 'prophet-rag[ray]'" in err[0]
    with pytest.raises(ProphetRAGError):
        ingest.import_ray()
