"""docs/serve.md's end-to-end example runs as written against `prophet-rag serve` on the embedded model (its URL's port
swapped for a free one)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from serve_helpers import free_port, wait_healthy

DOC = Path(__file__).resolve().parents[2] / "docs" / "serve.md"
KEY = "docs-key-0123456789abcdef"


@pytest.mark.slow
def test_the_end_to_end_example_runs(embedded_home, tmp_path, monkeypatch, capsys):
    [example] = [block for block in re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), re.S | re.M)
                 if "ChatProphet(base_url=" in block]
    port = free_port()
    env = {**os.environ, "PROPHET_RAG_API_KEY": KEY, "PROPHET_RAG_HOME": str(embedded_home), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prophet_rag.cli", "serve", "--port", str(port), "--store",
                                 str(tmp_path / "kv"), "--log-level", "warning"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        monkeypatch.setenv("PROPHET_RAG_API_KEY", KEY)
        assert "127.0.0.1:8000" in example
        exec(compile(example.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), "docs/serve.md", "exec"), {})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and all(line.strip() for line in printed)
    assert "'cache_hits'" in printed[-1]
