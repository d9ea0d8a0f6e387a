"""Every Python block of the README runs as written: in order, in one namespace (the later blocks use the engine
and documents of the first), in a scratch folder, offline, on the embedded model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def test_the_readme_shows_the_engine_and_both_frameworks():
    assert len(BLOCKS) == 3
    assert "ProphetEngine" in BLOCKS[0] and "ProphetLLM" in BLOCKS[1] and "ChatProphet" in BLOCKS[2]


@pytest.mark.slow
def test_every_python_block_runs_as_written(tmp_path, embedded_home, monkeypatch):
    pytest.importorskip("llama_index.retrievers.bm25")
    pytest.importorskip("langchain_community")
    from llama_index.core import Settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROPHET_RAG_HOME", str(embedded_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(Settings, "_llm", Settings._llm)  # the LlamaIndex block sets the global LLM
    namespace: dict = {"__name__": "readme"}
    try:
        for i, block in enumerate(BLOCKS):
            exec(compile(block, f"README.md, python block {i + 1}", "exec"), namespace)
        assert len(namespace["engine"].store) > len(namespace["documents"])  # every document, and some prefixes
    finally:
        if "engine" in namespace:
            namespace["engine"].close()
