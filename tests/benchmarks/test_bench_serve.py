"""benchmarks/bench_serve.py: SERVER@DTYPE names, the command each server gets, and the targets read off the rows."""

import importlib
import sys

import pytest


@pytest.fixture(scope="module")
def serve(benchmarks_on_path):
    return importlib.import_module("bench_serve")


def _row(server, clients, requests_per_s, ttft_p50=0.2, ttft_p95=0.3):
    return {"server": server, "clients": clients, "requests_per_s": requests_per_s, "ttft_p50_s": ttft_p50,
            "ttft_p95_s": ttft_p95}


def test_a_server_name_may_carry_a_dtype(serve):
    assert serve.base("hf@bfloat16") == "hf" and serve.base("workers") == "workers"


def test_each_engine_server_is_held_to_itself_and_to_every_hf_server(serve):
    rows = [_row("workers@bfloat16", 1, 1.0), _row("workers@bfloat16", 8, 3.0, ttft_p95=0.9),
            _row("hf", 1, 0.75), _row("hf@bfloat16", 1, 1.5), _row("batched", 1, 1.0)]
    lines = serve.targets(rows)
    assert len(lines) == 3  # batched has no 8-client row: no line for it
    assert lines[0].startswith("workers@bfloat16, 8 clients / 1 client") and "3.00x requests/s" in lines[0]
    assert "TTFT p95 3.00x" in lines[0] and "p95 at 8 / p50 at 1: 4.50x" in lines[0]
    assert lines[1] == "workers@bfloat16, 8 clients / hf generate, 1 client: 4.00x requests/s (target >= 4x)"
    assert lines[2] == "workers@bfloat16, 8 clients / hf@bfloat16 generate, 1 client: 2.00x requests/s (target >= 4x)"


def test_no_engine_server_at_both_levels_says_what_the_targets_need(serve):
    assert serve.targets([_row("hf", 1, 1.0), _row("batched", 8, 2.0)]) == [
        "(the targets need levels 1 and 8 of an engine server)"]


@pytest.mark.parametrize("servers", ["batch", "hf@int8", "workers@"])
def test_unknown_servers_and_dtypes_are_refused(serve, monkeypatch, capsys, servers):
    monkeypatch.setattr(sys, "argv", ["bench_serve.py", "--servers", servers])
    with pytest.raises(SystemExit):
        serve.main()
    assert "--servers" in capsys.readouterr().err


def test_a_servers_dtype_reaches_its_command(serve, monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(serve.subprocess, "Popen", lambda command, **_: started.append(command))
    args = serve.argparse.Namespace(threads=2, home=None, device="cpu", max_tokens=8, dtype="auto")
    serve.Server("hf@bfloat16", [], args, tmp_path, 18999)
    serve.Server("batched", [], args, tmp_path, 19000)
    assert [command[command.index("--dtype") + 1] for command in started] == ["bfloat16", "auto"]
