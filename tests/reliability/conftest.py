"""Fixtures for the reliability suite: engines over a tiny model sharing one store directory, and a store."""

from __future__ import annotations

import pytest

from prophet_rag.config import StoreConfig


@pytest.fixture
def store_dir(tmp_path):
    return tmp_path / "kv"


@pytest.fixture
def engine_on(make_engine, store_dir):
    """`engine_on(**store_options)`: a llama-family tiny engine over the shared `store_dir`."""

    def make(**options):
        return make_engine("llama", store=StoreConfig(directory=store_dir, **options))

    return make


@pytest.fixture
def store(store_dir):
    from prophet_rag.cache.store import KVStore

    with KVStore(StoreConfig(directory=store_dir, size_limit_bytes=64 * 2**20, max_entry_bytes=16 * 2**20)) as kv:
        yield kv
