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


@pytest.fixture(scope="session")
def embedded_home(tmp_path_factory):
    """A prophet-rag home holding the embedded model, converted once per session (~20 s) and never in the user's
    cache home. Point PROPHET_RAG_HOME here (a test's own store stays elsewhere) to load it in well under a second."""
    from prophet_rag.embedded import embedded_model_dir

    home = tmp_path_factory.mktemp("embedded-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PROPHET_RAG_HOME", str(home))
        embedded_model_dir(progress=lambda message: None)
    return home


@pytest.fixture(scope="session")
def embedded_engine(embedded_home, tmp_path_factory):
    """One engine over the embedded SmolLM2-135M-Instruct for the session, with its own store."""
    from prophet_rag.config import StoreConfig
    from prophet_rag.engine import ProphetEngine

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PROPHET_RAG_HOME", str(embedded_home))
        engine = ProphetEngine.from_pretrained(store=StoreConfig(directory=tmp_path_factory.mktemp("embedded-kv")))
    yield engine
    engine.close()


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
