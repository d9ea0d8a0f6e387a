"""How the adapters build their engine: the store configuration they pass, and the load errors they raise (fast,
naming the fix) for a device this torch cannot use or a hub model an offline machine cannot fetch."""

from __future__ import annotations

import time

import pytest
import torch

from prophet_rag import InvalidRequestError, ModelLoadError, PrefixCacheConfig, StoreConfig
from prophet_rag.integrations import common

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from prophet_rag.integrations.langchain import ChatProphet, ProphetLangChainLLM
from prophet_rag.integrations.llama_index import ProphetLLM

ADAPTERS = [ChatProphet, ProphetLangChainLLM, ProphetLLM]


@pytest.fixture
def loads(make_engine, monkeypatch):
    """The arguments each engine load gets; the load itself returns a tiny engine."""
    seen = []

    def load(model, device, store, prefix_cache_bytes=0):
        seen.append({"model": model, "device": device, "store": store, "prefix_cache_bytes": prefix_cache_bytes})
        return make_engine("llama", prefix_cache=PrefixCacheConfig(max_bytes=prefix_cache_bytes))

    monkeypatch.setattr(common, "load_engine", load)
    return seen


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.__name__)
def test_a_store_configuration_with_a_key_reaches_the_engine(adapter, loads, tmp_path):
    store = StoreConfig(directory=tmp_path / "kv", auth_key_env="PROPHET_RAG_TEST_KEY")
    adapter(store=store)
    adapter(store_dir=str(tmp_path / "plain"))
    assert loads[0]["store"] is store
    assert loads[1]["store"] == StoreConfig(directory=tmp_path / "plain")


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.__name__)
def test_store_and_store_dir_together_are_refused(adapter, loads, tmp_path):
    with pytest.raises(InvalidRequestError, match="store_dir or store, not both"):
        adapter(store=StoreConfig(directory=tmp_path), store_dir=str(tmp_path))
    assert loads == []


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.__name__)
def test_a_prefix_cache_size_reaches_the_engine_the_adapter_loads(adapter, loads):
    model = adapter(prefix_cache_bytes=1 << 20)
    assert loads[-1]["prefix_cache_bytes"] == 1 << 20
    assert model.engine.prefix_cache.enabled
    assert not adapter().engine.prefix_cache.enabled  # off unless asked for


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.__name__)
def test_a_prefix_cache_size_beside_a_given_engine_is_refused(adapter, make_engine):
    with pytest.raises(InvalidRequestError, match="prefix_cache=PrefixCacheConfig"):
        adapter(engine=make_engine("llama"), prefix_cache_bytes=1 << 20)


def test_load_engine_builds_the_prefix_cache(monkeypatch):
    seen = {}
    monkeypatch.setattr(common.ProphetEngine, "from_pretrained", lambda model, **kw: seen.update(kw) or "engine")
    assert common.load_engine(None, "cpu", None, 4096) == "engine"
    assert seen["prefix_cache"] == PrefixCacheConfig(max_bytes=4096)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.__name__)
def test_a_cuda_device_without_cuda_names_the_fix(adapter):
    with pytest.raises(ModelLoadError, match="device 'cuda'.*pass device='cpu'"):
        adapter(device="cuda")


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable"])
def test_a_hub_model_that_cannot_be_fetched_fails_at_once(offline, monkeypatch):
    from huggingface_hub import constants

    from prophet_rag.engine import loading

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline == "HF_HUB_OFFLINE")
    monkeypatch.setattr(loading, "reachable", lambda url, timeout_s=1.0: False)  # no network, wherever it runs
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache.*pass a model folder"):
        ChatProphet(model="prophet-rag-tests/no-such-model", device="cpu")
    assert time.perf_counter() - start < 1.0  # the hub client alone retries for ~25 s


def test_an_unreachable_host_is_told_within_the_timeout():
    from prophet_rag.engine.loading import reachable

    start = time.perf_counter()
    assert not reachable("https://prophet-rag-no-such-host.invalid", timeout_s=0.5)
    assert time.perf_counter() - start < 1.0
