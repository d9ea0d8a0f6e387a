"""Fixtures for the KV store tests: a fresh store directory and an open `KVStore` (64 MiB limit) per test."""

import sys
from pathlib import Path

import pytest

from prophet_rag.config import StoreConfig
from prophet_rag.store import KVStore

# tests/tiny.py (tiny models and tokenizer) sits one level up; pytest puts only this folder on sys.path.
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.append(_TESTS)


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "kv"


@pytest.fixture
def store(store_dir):
    with KVStore(StoreConfig(directory=store_dir, size_limit_bytes=64 * 2**20, max_entry_bytes=16 * 2**20)) as kv:
        yield kv
