"""Shared fixtures: engines over tiny random models of every supported family, each with its own store."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported, so it must be set before any test module imports it:
# without CUDA the kernels run through the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from tiny import tiny_model, tiny_tokenizer


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
