"""Forged entries: whoever can write the store directory can re-encode entries with the project's own codec.

Without a key, every forgery whose shape, positions, token ids or values are inconsistent is refused (and verify
removes it); a consistent one (other finite KV under the real key) is used: the README says so. With a key, every
entry written without it, or with another key, is refused.
"""

import pytest
import torch

from kvstore_helpers import answer, chunk_refs, forge, forged_bytes, rewrite, value_path
from prophet_rag.cache import codec
from tiny import CHUNKS

KEY = "an authentication key of 32 bytes or more, for the tests"


def _forgeries(engine):
    """name -> forge(ref, kv) changes, one per inconsistency the reliability issue lists."""
    return {
        "positions": lambda kv: dict(kv=kv, sink_ids=torch.tensor([0, 1])),
        "token-ids": lambda kv: dict(kv=kv, token_ids=torch.arange(kv.shape[2])),
        "nan-kv": lambda kv: dict(kv=kv.index_fill(2, torch.tensor([1]), float("nan"))),
        "inf-kv": lambda kv: dict(kv=kv.index_fill(2, torch.tensor([0]), float("inf"))),
        "dropped-kv-head": lambda kv: dict(kv=kv[:, :, :, :1].contiguous()),
        "doubled-layers": lambda kv: dict(kv=torch.cat([kv, kv])),
        "other-model": lambda kv: dict(kv=kv, fields={"model_fp": "f" * 64}),
    }


@pytest.mark.parametrize("forgery", ["positions", "token-ids", "nan-kv", "inf-kv", "dropped-kv-head",
                                     "doubled-layers", "other-model"])
def test_inconsistent_forgeries_are_refused_and_recomputed(engine_on, forgery):
    engine = engine_on()
    clean = answer(engine)
    ref = chunk_refs(engine)[1]
    with engine.store.open(ref, engine.meta) as entry:
        kv = torch.empty(entry.shape, dtype=engine.kv_dtype)
        entry.read_layers(0, entry.num_layers, kv)
    forge(engine.store.directory, ref, **_forgeries(engine)[forgery](kv))
    again = answer(engine)  # no RuntimeError from a doubled layer count, no broadcast head, no NaN
    stats = engine.store.stats()
    assert stats.corrupt == 1 and again.stats.cache_misses == 1
    assert again.token_ids == clean.token_ids
    torch.testing.assert_close(again.first_token_logits, clean.first_token_logits, rtol=0, atol=0)


def test_verify_removes_every_inconsistent_forgery(engine_on):
    engine = engine_on()
    docs = [f"document number {i} about turbines" for i in range(7)]
    engine.ingest(docs)
    layout = engine.builder.layout(docs, "q?")
    refs = [engine.cache.ref(ids, engine.sink_ids) for ids in layout.chunk_ids]
    for ref, make in zip(refs, _forgeries(engine).values(), strict=True):
        with engine.store.open(ref, engine.meta) as entry:
            kv = torch.empty(entry.shape, dtype=engine.kv_dtype)
            entry.read_layers(0, entry.num_layers, kv)
        forge(engine.store.directory, ref, **make(kv))
    report = engine.store.verify()
    assert (report.checked, report.removed, report.ok) == (7, 7, 0)


def test_without_a_key_a_consistent_forgery_is_used(engine_on):
    """The limit of keyless checks, as the README states it: other finite KV of the right shape, under the real
    key with the real token ids, reads as the chunk. Configure a key when others can write the directory."""
    engine = engine_on()
    clean = answer(engine)
    ref = chunk_refs(engine)[0]
    with engine.store.open(ref, engine.meta) as entry:
        kv = torch.empty(entry.shape, dtype=engine.kv_dtype)
        entry.read_layers(0, entry.num_layers, kv)
    forge(engine.store.directory, ref, kv=kv.flip(2).contiguous())  # another document's KV, same length
    again = answer(engine)
    assert engine.store.stats().corrupt == 0 and again.stats.cache_hits == 3
    assert not torch.equal(again.first_token_logits, clean.first_token_logits)


@pytest.mark.parametrize("writer", ["no-key", "other-key", "forged-with-own-codec"])
def test_with_a_key_every_entry_not_sealed_with_it_is_refused(engine_on, monkeypatch, writer):
    monkeypatch.setenv("PR_TEST_KEY", KEY)
    monkeypatch.setenv("PR_OTHER_KEY", KEY.upper())
    keyed = engine_on(auth_key_env="PR_TEST_KEY")
    clean = answer(keyed)
    keyed.close()
    ref = chunk_refs(keyed)[2]
    if writer == "forged-with-own-codec":
        # The attacker has the codec, not the key: other finite KV, consistent fields, every tag recomputed.
        path = value_path(keyed.store.directory, ref.key)
        header = codec.parse_header(path.read_bytes(), codec.Sealer(codec.derive_key(KEY.encode())))
        kv = torch.randn(header.shape, generator=torch.Generator().manual_seed(0))
        rewrite(path, forged_bytes(header, kv, sealer=codec.Sealer(codec.derive_key(b"x" * 32))))
    else:
        keyed.store.delete(ref.key)
        other = engine_on() if writer == "no-key" else engine_on(auth_key_env="PR_OTHER_KEY")
        assert other.ingest([CHUNKS[2]]) == 1  # writes the missing entry, sealed its own way
        other.close()
    engine = engine_on(auth_key_env="PR_TEST_KEY")
    again = answer(engine)
    assert engine.store.stats().unauthenticated == 1 and again.stats.cache_misses == 1
    assert again.token_ids == clean.token_ids
    torch.testing.assert_close(again.first_token_logits, clean.first_token_logits, rtol=0, atol=0)
    assert answer(engine).stats.cache_hits == 3  # the recomputed chunk was stored again, sealed with the key


def test_a_store_without_the_key_neither_uses_nor_destroys_keyed_entries(engine_on, monkeypatch):
    monkeypatch.setenv("PR_TEST_KEY", KEY)
    keyed = engine_on(auth_key_env="PR_TEST_KEY")
    clean = answer(keyed)
    entries = len(keyed.store)
    plain = engine_on()
    again = answer(plain)
    assert plain.store.stats().incompatible == 4 and again.stats.cache_misses == 3
    assert len(plain.store) == entries  # a misconfigured reader leaves the keyed store intact
    assert again.token_ids == clean.token_ids
    report = plain.store.verify()
    assert (report.unverifiable, report.removed) == (entries, 0)
    assert answer(keyed).stats.cache_hits == 3
