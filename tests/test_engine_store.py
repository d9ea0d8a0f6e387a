"""The engine and its store: warm hits, and any store anomaly means recompute, never a wrong answer."""

from __future__ import annotations

import sqlite3

import torch

from prophet_rag.config import GenerationConfig
from tiny import CHUNKS, QUERY

GEN = GenerationConfig(max_new_tokens=4, eos_token_ids=(10**6,))


def _value_files(engine):
    with sqlite3.connect(engine.store.directory / "cache.db") as db:
        return [engine.store.directory / name for (name,) in db.execute("SELECT filename FROM Cache") if name]


def _damage_every_entry(engine, damage):
    """Apply `damage(bytes) -> bytes` to every stored value, whether diskcache keeps it in a file or inline."""
    for path in _value_files(engine):
        path.write_bytes(damage(path.read_bytes()))
    with sqlite3.connect(engine.store.directory / "cache.db") as db:
        rows = db.execute("SELECT rowid, value FROM Cache WHERE value IS NOT NULL").fetchall()
        for rowid, value in rows:
            db.execute("UPDATE Cache SET value = ? WHERE rowid = ?", (damage(bytes(value)), rowid))


def _flip_middle_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


def test_second_request_hits_the_store(make_engine):
    engine = make_engine("llama")
    cold = engine.answer(CHUNKS, QUERY, method="prophet", generation=GEN, return_logits=True)
    warm = engine.answer(CHUNKS, QUERY, method="prophet", generation=GEN, return_logits=True)
    assert (cold.stats.cache_misses, cold.stats.cache_hits) == (3, 0)
    assert (warm.stats.cache_misses, warm.stats.cache_hits) == (0, 3)
    torch.testing.assert_close(warm.first_token_logits, cold.first_token_logits, atol=0, rtol=0)


def test_ingest_then_answer_is_all_hits(make_engine):
    engine = make_engine("qwen2")
    assert engine.ingest(CHUNKS) == 3
    assert engine.ingest(CHUNKS) == 0
    assert engine.answer(CHUNKS, QUERY, generation=GEN).stats.cache_hits == 3


def test_store_survives_a_new_engine(make_engine, tmp_path):
    from prophet_rag.config import StoreConfig

    store = StoreConfig(directory=tmp_path / "shared")
    first = make_engine("llama", store=store)
    first.ingest(CHUNKS)
    first.close()
    second = make_engine("llama", store=store)
    assert second.answer(CHUNKS, QUERY, generation=GEN).stats.cache_hits == 3


def test_another_model_does_not_reuse_the_entries(make_engine, tmp_path):
    from prophet_rag.config import StoreConfig

    store = StoreConfig(directory=tmp_path / "shared")
    make_engine("llama", store=store).ingest(CHUNKS)
    other = make_engine("qwen3", store=store)
    assert other.answer(CHUNKS, QUERY, generation=GEN).stats.cache_misses == 3


def test_corrupted_entries_are_recomputed_and_the_answer_is_unchanged(make_engine):
    engine = make_engine("llama")
    clean = engine.answer(CHUNKS, QUERY, method="prophet", generation=GEN, return_logits=True)
    _damage_every_entry(engine, _flip_middle_byte)
    again = engine.answer(CHUNKS, QUERY, method="prophet", generation=GEN, return_logits=True)
    assert again.stats.cache_misses == 3
    assert engine.store.stats().corrupt >= 3
    torch.testing.assert_close(again.first_token_logits, clean.first_token_logits, atol=0, rtol=0)
    assert again.token_ids == clean.token_ids


def test_truncated_entry_is_recomputed(make_engine):
    engine = make_engine("llama")
    clean = engine.answer(CHUNKS, QUERY, method="cacheblend", generation=GEN, return_logits=True)
    _damage_every_entry(engine, lambda data: data[: len(data) // 2])
    again = engine.answer(CHUNKS, QUERY, method="cacheblend", generation=GEN, return_logits=True)
    torch.testing.assert_close(again.first_token_logits, clean.first_token_logits, atol=0, rtol=0)


def test_deleted_value_file_is_a_miss_not_an_error(make_engine):
    engine = make_engine("llama")
    long_chunks = [" ".join(CHUNKS) * 7]  # large enough for diskcache to keep the value in a file
    clean = engine.answer(long_chunks, QUERY, generation=GEN, return_logits=True)
    files = _value_files(engine)
    assert len(files) == 2
    files[0].unlink()
    again = engine.answer(long_chunks, QUERY, generation=GEN, return_logits=True)
    torch.testing.assert_close(again.first_token_logits, clean.first_token_logits, atol=0, rtol=0)
