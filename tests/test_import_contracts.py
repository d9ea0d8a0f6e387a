"""The import contracts in pyproject.toml hold (the layers drawn in the README, independent tiers, methods and
adapters, a core without LlamaIndex or LangChain), and each has teeth: an import planted against it breaks it."""

from __future__ import annotations

import pytest

from import_contracts import assemble, lint


def test_the_import_contracts_hold(tmp_path):
    result = lint(assemble(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 5 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, planted, contract", [
    ("prophet_rag/compute/stitched.py", "from prophet_rag.engine import ProphetEngine", "each layer imports only"),
    ("prophet_rag/config.py", "from prophet_rag.selection.request import plan", "each layer imports only"),
    ("prophet_rag/selection/request.py", "from prophet_rag.cache.chunk_cache import ChunkCache", "each layer imports"),
    ("prophet_rag/engine/pipeline.py", "from prophet_rag.integrations.common import Call", "each layer imports only"),
    ("prophet_rag/kernels/dispatch.py", "from prophet_rag.compute import stitched", "each layer imports only"),
    ("prophet_rag/cache/remote.py", "from prophet_rag.cache.store import KVStore", "a KV tier is one class"),
    ("prophet_rag/selection/prophet.py", "from prophet_rag.selection.prophet_focus import focus_plan",
     "each selection method's module"),
    ("prophet_rag/integrations/langchain/rag.py", "from prophet_rag.integrations.llama_index import llm",
     "the LlamaIndex and LangChain adapters"),
    ("prophet_rag/integrations/llama_index/stats.py", "from prophet_rag.integrations.langchain.runs import RUNS",
     "the LlamaIndex and LangChain adapters"),
    ("prophet_rag/cache/keys.py", "import langchain_core", "the core never imports"),
])
def test_a_planted_import_breaks_its_contract(tmp_path, module, planted, contract):
    tree = assemble(tmp_path)
    path = tree / module
    # Inside a function: lazy imports count as imports.
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {planted}\n")
    result = lint(tree)
    assert result.returncode == 1, result.stdout
    assert "Contracts: 4 kept, 1 broken." in result.stdout
    broken = result.stdout.split("Broken contracts")[1]
    assert contract in broken.replace("\n", " ")
