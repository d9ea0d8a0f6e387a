"""The tutorials in notebooks/: valid, saved with their outputs, and executed top to bottom on the embedded model.

Execution (slow-marked) runs each notebook on a fresh copy of notebooks/data with the session's converted embedded
model, offline, as `make notebooks` does; a failing cell fails the test with its traceback.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(ROOT.glob("*.ipynb"))


def test_the_four_tutorials_are_there():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_llamaindex_rag.ipynb", "03_langchain_lcel.ipynb",
                                           "04_agents.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_saved_with_the_outputs_of_every_cell(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(cell["execution_count"] for cell in code), "run `make notebooks` to save its outputs"
    assert not [o for cell in code for o in cell["outputs"] if o["output_type"] == "error"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_shows_each_answer_beside_the_expected_one_with_a_verdict(path):
    text = _printed(json.loads(path.read_text(encoding="utf-8"))["cells"])
    expected = re.findall(r"expected '[^']+': (right|WRONG)", text)
    assert len(expected) >= 3, "print answers with verdict(answer, expected)"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path, embedded_home, monkeypatch):
    pytest.importorskip("nbclient")
    spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "execute.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    shutil.copytree(ROOT / "data", tmp_path / "data")
    monkeypatch.setenv("PROPHET_RAG_HOME", str(embedded_home))  # the kernel inherits it: no second conversion
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    executed = runner.execute(path, tmp_path)
    assert all(cell["outputs"] for cell in executed.cells if cell.cell_type == "code" and "print" in cell.source)
    if path.name == "04_agents.ipynb":
        assert AGENT_REUSE.search(_printed(executed.cells)), "the agent's hits no longer equal its earlier retrievals"


AGENT_REUSE = re.compile(r"10 questions answered; documents retrieved again: ([1-9]\d*), cache hits: \1; "
                         r"hits equal earlier retrievals on every question: True")
"""The LangGraph agent's summary line: some documents retrieved again, every one of them a cache hit."""


def _printed(cells) -> str:
    return "".join("".join(o.get("text", "")) for cell in cells if cell["cell_type"] == "code" for o in cell["outputs"])


def test_the_saved_agents_notebook_shows_every_repeated_document_as_a_cache_hit():
    notebook = json.loads((ROOT / "04_agents.ipynb").read_text(encoding="utf-8"))
    assert AGENT_REUSE.search(_printed(notebook["cells"]))
