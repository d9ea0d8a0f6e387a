"""Shared fixtures: engines over tiny random models of every supported family, each with its own store."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_model, tiny_tokenizer  # noqa: E402

CHUNKS = (
    "The vault code of Alpha is 4821.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
)
QUERY = "what is the vault code of Alpha?"


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    # No test may write into the user's real cache home.
    monkeypatch.setenv("PROPHET_RAG_HOME", str(tmp_path / "home"))


@pytest.fixture
def make_engine(tmp_path):
    from prophet_rag.config import StoreConfig
    from prophet_rag.engine import ProphetEngine

    engines = []

    def make(family: str = "llama", **kwargs):
        torch.manual_seed(0)
        store = kwargs.pop("store", StoreConfig(directory=tmp_path / f"store-{family}-{len(engines)}"))
        engine = ProphetEngine(tiny_model(family, **kwargs.pop("model_overrides", {})), tiny_tokenizer(),
                               store=store, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()
