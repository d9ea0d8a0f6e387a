"""Fixtures for the KV store tests: a fresh store directory and an open `KVStore` (64 MiB limit) per test."""

from pathlib import Path

import pytest

from prophet_rag.cache.store import KVStore
from prophet_rag.config import StoreConfig


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "kv"


@pytest.fixture
def store(store_dir):
    with KVStore(StoreConfig(directory=store_dir, size_limit_bytes=64 * 2**20, max_entry_bytes=16 * 2**20)) as kv:
        yield kv
