"""benchmarks/bench_scaling.py: its argument checks, the summary's ratios, the table and the peak-RSS helper."""

import importlib
import mmap

import pytest

_MB = 2**20


@pytest.fixture(scope="module")
def scaling(benchmarks_on_path):
    return importlib.import_module("bench_scaling")


def test_lengths_are_sorted_without_repeats(scaling):
    assert scaling.parse_lengths("4096, 1024,2048,1024") == [1024, 2048, 4096]


@pytest.mark.parametrize("text", ["", "1k,2k", "1024,32", "1024.5"])
def test_lengths_that_are_not_token_counts_of_at_least_64_are_refused(scaling, text):
    with pytest.raises(ValueError, match="--lengths"):
        scaling.parse_lengths(text)


def test_methods_keep_their_order_without_repeats(scaling):
    assert scaling.parse_methods("hf_last, prophet,reuse,prophet") == ["hf_last", "prophet", "reuse"]


def test_methods_without_hf_last_are_refused(scaling):
    with pytest.raises(ValueError, match="must include hf_last"):
        scaling.parse_methods("full,prophet")


def test_an_unknown_method_is_named_in_the_refusal(scaling):
    with pytest.raises(ValueError, match="unknown method.*prophet_fast"):
        scaling.parse_methods("hf_last,prophet_fast")


def test_status_fields_are_read_in_bytes(scaling):
    status = "Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n"
    assert scaling.status_bytes(status, "VmHWM") == 2048 * 1024
    assert scaling.status_bytes(status, "VmRSS") == 1024 * 1024


def test_a_missing_status_field_is_an_error(scaling):
    with pytest.raises(ValueError, match="VmHWM"):
        scaling.status_bytes("VmRSS:\t  1024 kB\n", "VmHWM")


def test_peak_rss_sees_memory_the_call_touched_and_then_freed(scaling):
    def touch():
        # A fresh mapping, every page written: resident whatever the heap already held (freed memory of earlier
        # tests, still resident, would otherwise serve a heap allocation without raising the RSS).
        with mmap.mmap(-1, 96 * _MB) as block:
            for page in range(0, 96 * _MB, mmap.PAGESIZE):
                block[page] = 1
            return len(block)

    result, peak = scaling.peak_rss(touch)
    assert result == 96 * _MB
    assert peak.above_base_bytes >= 90 * _MB
    assert peak.peak_bytes == peak.base_bytes + peak.above_base_bytes


def test_peak_rss_forgets_peaks_from_before_the_call(scaling):
    block = b"\x01" * (96 * _MB)
    del block
    _, peak = scaling.peak_rss(lambda: None)
    assert peak.above_base_bytes < 16 * _MB


def test_summary_ratios_are_against_hf_last_medians_and_peaks(scaling):
    times = {"hf_last": [10.0, 12.0, 11.0], "prophet": [3.0, 2.0, 4.0]}
    peaks = {"hf_last": scaling.PeakRss(base_bytes=800 * _MB, peak_bytes=1000 * _MB),
             "prophet": scaling.PeakRss(base_bytes=800 * _MB, peak_bytes=1200 * _MB)}
    hf, prophet = scaling.summarize(4096, times, peaks)
    assert (hf.median_s, hf.x_hf_last, hf.peak_x_hf_last) == (11.0, 1.0, 1.0)
    assert prophet.median_s == 3.0
    assert prophet.x_hf_last == pytest.approx(3.0 / 11.0)
    assert (prophet.peak_mb, prophet.above_base_mb) == (1200.0, 400.0)
    assert prophet.peak_x_hf_last == pytest.approx(1.2)


def test_summary_without_memory_leaves_the_memory_columns_empty(scaling):
    (row,) = scaling.summarize(1024, {"hf_last": [2.0]}, None)
    assert (row.peak_mb, row.above_base_mb, row.peak_x_hf_last) == (None, None, None)
    assert row.x_hf_last == 1.0


def test_the_table_has_a_line_per_method_with_its_figures(scaling):
    times = {"hf_last": [8.0], "reuse": [0.4]}
    peaks = {m: scaling.PeakRss(base_bytes=500 * _MB, peak_bytes=600 * _MB) for m in times}
    lines = scaling.format_table(scaling.summarize(2048, times, peaks)).splitlines()
    assert "peak x hf_last" in lines[0]
    assert lines[2].split() == ["2048", "reuse", "0.400", "0.050", "600", "100", "1.000"]


def test_the_table_marks_unmeasured_memory(scaling):
    lines = scaling.format_table(scaling.summarize(1024, {"hf_last": [1.0]}, None)).splitlines()
    assert lines[1].split() == ["1024", "hf_last", "1.000", "1.000", "-", "-", "-"]


def test_documents_fill_the_prompt_below_the_length(scaling, make_engine):
    engine = make_engine()
    docs, ids = scaling.documents_for(engine, 400, 60)
    assert ids.shape[0] == 1
    assert 400 - 100 < ids.shape[1] < 400
    assert len(docs) >= 3


def test_a_length_over_the_context_window_is_refused(scaling, make_engine):
    with pytest.raises(ValueError, match="context window of 512"):
        scaling.documents_for(make_engine(), 1024, 60)


def test_a_length_no_document_fits_is_refused(scaling, make_engine):
    with pytest.raises(ValueError, match="lower --doc-tokens"):
        scaling.documents_for(make_engine(), 64, 250)


def test_every_method_is_timed_once_per_repeat(scaling, make_engine):
    engine = make_engine()
    docs, ids = scaling.documents_for(engine, 300, 60)
    engine.ingest(docs)
    times = scaling.time_methods(engine, ["hf_last", "reuse", "prophet"], docs, ids, 0.2, repeats=2, warm_up=True)
    assert list(times) == ["hf_last", "reuse", "prophet"]
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())
