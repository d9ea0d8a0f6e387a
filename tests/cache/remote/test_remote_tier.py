"""RedisTier on a real server: the layout it writes, round trips, and every entry it must refuse.

Entries are planted straight into Redis (another key, no key, altered bytes, missing or swapped parts); each must be
refused, counted, deleted, and never returned."""

from __future__ import annotations

import socket

import pytest
import torch

from kvstore_helpers import WIDE, assert_same_chunk, make_chunk, meta_for
from prophet_rag.cache import codec
from prophet_rag.cache.codec import Sealer
from prophet_rag.cache.remote import RedisTier
from prophet_rag.cache.store import KVStore
from prophet_rag.errors import InvalidRequestError, StoreError


@pytest.fixture
def tier(remote_config):
    with_tier = RedisTier(remote_config(), WIDE.model_fp)
    yield with_tier
    with_tier.close()


def _values(server) -> dict[bytes, bytes]:
    client = server.client()
    return {name: client.get(name) for name in client.keys("*")}


def test_round_trip_is_bit_identical(tier):
    ref, chunk = make_chunk(80, WIDE, seed=1)
    assert tier.put(ref, chunk, WIDE) is True
    got = tier.get(ref, WIDE)
    assert got is not None
    assert_same_chunk(got, chunk)
    stats = tier.stats()
    assert (stats.hits, stats.misses, stats.failures) == (1, 0, 0)
    assert stats.bytes_read == stats.bytes_written > chunk.nbytes


def test_get_writes_into_out(tier):
    ref, chunk = make_chunk(80, WIDE, seed=2)
    tier.put(ref, chunk, WIDE)
    out = torch.full_like(chunk.kv, float("nan"))
    got = tier.get(ref, WIDE, out)
    assert got.kv is out
    assert torch.equal(out, chunk.kv)


def test_a_missing_key_is_a_miss(tier):
    ref, _ = make_chunk(80, WIDE, seed=3)
    assert tier.get(ref, WIDE) is None
    assert tier.contains(ref.key) is False
    assert tier.stats().misses == 1


def test_one_value_per_layer_and_a_header_under_the_model_namespace(tier, redis_server):
    ref, chunk = make_chunk(80, WIDE, seed=4)
    tier.put(ref, chunk, WIDE)
    values = _values(redis_server)
    head, layers = tier.names(ref.key, WIDE.num_layers)
    assert set(values) == {head.encode(), *(name.encode() for name in layers)}
    assert head.startswith(f"prophet-rag:2:{WIDE.model_fp[:16]}:{{{ref.key}}}")
    layer_bytes = chunk.nbytes // WIDE.num_layers
    assert all(len(values[name.encode()]) == layer_bytes for name in layers)
    assert len(values[head.encode()]) < 4096  # the header alone, not padded as in a file
    assert tier.contains(ref.key) is True


def test_layer_values_are_the_disk_entrys_regions(tier, redis_server, tmp_path, auth_key):
    """One codec: a layer value is byte for byte the layer region of the disk store's file for the same chunk."""
    ref, chunk = make_chunk(80, WIDE, seed=5)
    tier.put(ref, chunk, WIDE)
    encoded = codec.encode(chunk, ref.sink_ids, WIDE, tier._sealer)
    values = _values(redis_server)
    for name, buffers in zip(tier.names(ref.key, WIDE.num_layers)[1], encoded.layers, strict=True):
        assert values[name.encode()] == b"".join(buffers)


@pytest.mark.parametrize("storage", ["bfloat16", "float8_e4m3"])
def test_compact_storage_reads_back_as_the_disk_store_does(remote_config, tmp_path, storage):
    meta = meta_for(dtype=torch.float32 if storage == "bfloat16" else torch.bfloat16, storage=storage, head_dim=16)
    ref, chunk = make_chunk(40, meta, seed=6)
    config = remote_config(kv_storage=storage)
    with KVStore(config) as disk:
        remote = RedisTier(config, meta.model_fp)
        assert remote.put(ref, chunk, meta) and disk.put(ref, chunk, meta)
        from_remote, from_disk = remote.get(ref, meta), disk.get(ref, meta)
        remote.close()
    assert_same_chunk(from_remote, from_disk)


def test_put_of_a_present_entry_sends_nothing(tier):
    ref, chunk = make_chunk(80, WIDE, seed=7)
    assert tier.put(ref, chunk, WIDE)
    written = tier.stats().bytes_written
    assert written > chunk.nbytes
    assert tier.put(ref, chunk, WIDE)
    assert tier.stats().bytes_written == written


def test_a_put_for_another_key_is_a_programming_error(tier):
    ref, _ = make_chunk(80, WIDE, seed=8)
    _, other = make_chunk(80, WIDE, seed=9)
    with pytest.raises(InvalidRequestError):
        tier.put(ref, other, WIDE)


def test_a_tier_serves_one_model(tier):
    ref, chunk = make_chunk(80, WIDE, seed=10)
    with pytest.raises(InvalidRequestError, match="another model"):
        tier.get(ref, meta_for(model_fp="c" * 64, head_dim=16))


def test_an_unset_password_variable_is_refused(remote_config):
    with pytest.raises(StoreError, match="PROPHET_RAG_NO_SUCH_PASSWORD"):
        RedisTier(remote_config(remote_password_env="PROPHET_RAG_NO_SUCH_PASSWORD"), WIDE.model_fp)


def test_an_acl_password_from_the_environment_works(start_redis, remote_config, monkeypatch):
    server = start_redis("--requirepass", "s3cret-pw")
    monkeypatch.setenv("PROPHET_RAG_TEST_REDIS_PW", "s3cret-pw")
    config = remote_config(remote_url=server.url, remote_password_env="PROPHET_RAG_TEST_REDIS_PW",
                           remote_username="default")
    assert "s3cret" not in repr(config)
    tier = RedisTier(config, WIDE.model_fp)
    ref, chunk = make_chunk(80, WIDE, seed=11)
    assert tier.put(ref, chunk, WIDE)
    assert_same_chunk(tier.get(ref, WIDE), chunk)
    tier.close()


def test_a_wrong_password_is_a_counted_failure_not_an_error(start_redis, remote_config, monkeypatch):
    server = start_redis("--requirepass", "right-pw")
    monkeypatch.setenv("PROPHET_RAG_TEST_REDIS_PW", "wrong-pw")
    tier = RedisTier(remote_config(remote_url=server.url, remote_password_env="PROPHET_RAG_TEST_REDIS_PW"),
                     WIDE.model_fp)
    ref, chunk = make_chunk(80, WIDE, seed=12)
    assert tier.put(ref, chunk, WIDE) is False
    assert tier.get(ref, WIDE) is None
    stats = tier.stats()
    assert stats.failures == 2 and stats.skipped == 1 and stats.hits == 0
    tier.close()


# ---- forged, damaged and partial entries -----------------------------------------------------------------------


def _planted(tier, server, seed, sealer=None):
    """A valid entry for a fresh chunk, written by `tier` (or, with `sealer`, encoded with it and planted raw)."""
    ref, chunk = make_chunk(80, WIDE, seed=seed)
    if sealer is None:
        assert tier.put(ref, chunk, WIDE)
        return ref, chunk
    encoded = codec.encode(chunk, ref.sink_ids, WIDE, sealer)
    head, layers = tier.names(ref.key, WIDE.num_layers)
    client = server.client()
    for name, buffers in zip(layers, encoded.layers, strict=True):
        client.set(name, b"".join(buffers))
    client.set(head, encoded.header[: codec.read_frame(encoded.header)[1]])
    return ref, chunk


def _refused(tier, server, ref, counter):
    """`ref`'s entry is refused, counted under `counter` and deleted from the server."""
    before = getattr(tier.stats(), counter)
    assert tier.get(ref, WIDE) is None
    assert getattr(tier.stats(), counter) == before + 1
    assert tier.stats().hits == 0
    head, layers = tier.names(ref.key, WIDE.num_layers)
    assert server.client().exists(head, *layers) == 0


def test_an_entry_sealed_with_another_key_is_refused(tier, redis_server):
    ref, _ = _planted(tier, redis_server, 20, Sealer(codec.derive_key(b"another key " * 4)))
    _refused(tier, redis_server, ref, "unauthenticated")


def test_an_entry_without_a_key_is_refused(tier, redis_server):
    ref, _ = _planted(tier, redis_server, 21, Sealer(None))
    _refused(tier, redis_server, ref, "unauthenticated")


def test_an_altered_layer_byte_is_refused(tier, redis_server):
    ref, _ = _planted(tier, redis_server, 22)
    name = tier.names(ref.key, WIDE.num_layers)[1][1]
    client = redis_server.client()
    value = bytearray(client.get(name))
    value[100] ^= 1
    client.set(name, bytes(value))
    _refused(tier, redis_server, ref, "unauthenticated")


def test_an_altered_header_byte_is_refused(tier, redis_server):
    ref, _ = _planted(tier, redis_server, 23)
    head = tier.names(ref.key, WIDE.num_layers)[0]
    client = redis_server.client()
    value = bytearray(client.get(head))
    value[40] ^= 1  # inside the JSON fields
    client.set(head, bytes(value))
    _refused(tier, redis_server, ref, "unauthenticated")


def test_swapped_layers_are_refused(tier, redis_server):
    ref, _ = _planted(tier, redis_server, 24)
    first, second = tier.names(ref.key, WIDE.num_layers)[1]
    client = redis_server.client()
    a, b = client.get(first), client.get(second)
    client.set(first, b)
    client.set(second, a)
    _refused(tier, redis_server, ref, "unauthenticated")


def test_another_chunks_valid_entry_under_this_key_is_refused(tier, redis_server):
    """A replayed entry: authentic, but for other tokens; its header does not hash to the key it sits under."""
    ref, _ = _planted(tier, redis_server, 25)
    victim, _ = make_chunk(80, WIDE, seed=26)
    client = redis_server.client()
    (source, source_layers), (target, target_layers) = (tier.names(r.key, WIDE.num_layers) for r in (ref, victim))
    for name, other in zip([source, *source_layers], [target, *target_layers], strict=True):
        client.set(other, client.get(name))
    _refused(tier, redis_server, victim, "corrupt")


def test_a_missing_layer_is_partial_and_the_rest_deleted(tier, redis_server):
    ref, _ = _planted(tier, redis_server, 27)
    redis_server.client().delete(tier.names(ref.key, WIDE.num_layers)[1][1])
    _refused(tier, redis_server, ref, "partial")


@pytest.mark.parametrize("change", [b"x", b""])
def test_a_layer_of_the_wrong_size_is_refused(tier, redis_server, change):
    ref, _ = _planted(tier, redis_server, 28)
    name = tier.names(ref.key, WIDE.num_layers)[1][0]
    client = redis_server.client()
    value = client.get(name)
    client.set(name, value + change if change else value[:-1])
    _refused(tier, redis_server, ref, "corrupt")


def test_a_header_longer_than_its_frame_is_refused(tier, redis_server):
    ref, _ = _planted(tier, redis_server, 29)
    redis_server.client().append(tier.names(ref.key, WIDE.num_layers)[0], b"\0")
    _refused(tier, redis_server, ref, "corrupt")


def test_garbage_and_a_value_of_another_type_are_refused(tier, redis_server):
    ref, _ = make_chunk(80, WIDE, seed=30)
    head, layers = tier.names(ref.key, WIDE.num_layers)
    client = redis_server.client()
    client.set(head, b"not an entry at all")
    _refused(tier, redis_server, ref, "corrupt")
    client.rpush(head, b"a list")
    _refused(tier, redis_server, ref, "corrupt")
    assert tier.stats().failures == 0 and not tier.stats().breaker_open


def test_a_refused_entry_is_replaced_by_the_next_put(tier, redis_server):
    ref, chunk = _planted(tier, redis_server, 31, Sealer(None))
    assert tier.get(ref, WIDE) is None
    assert tier.put(ref, chunk, WIDE)
    assert_same_chunk(tier.get(ref, WIDE), chunk)


def test_layers_written_without_their_header_are_never_used(tier, redis_server):
    """What a writer that sent its layers one by one and died before the header would leave."""
    ref, chunk = make_chunk(80, WIDE, seed=32)
    encoded = codec.encode(chunk, ref.sink_ids, WIDE, tier._sealer)
    client = redis_server.client()
    for name, buffers in zip(tier.names(ref.key, WIDE.num_layers)[1], encoded.layers, strict=True):
        client.set(name, b"".join(buffers))
    assert tier.contains(ref.key) is False
    assert tier.get(ref, WIDE) is None
    assert tier.put(ref, chunk, WIDE)  # the recomputed chunk is stored over the leftovers
    assert_same_chunk(tier.get(ref, WIDE), chunk)


def test_a_writer_cut_off_before_exec_leaves_nothing(tier, redis_server):
    """A writer killed inside its MULTI: the queued layers and header never become visible."""
    ref, chunk = make_chunk(80, WIDE, seed=33)
    encoded = codec.encode(chunk, ref.sink_ids, WIDE, tier._sealer)
    head, layers = tier.names(ref.key, WIDE.num_layers)
    values = [*(b"".join(buffers) for buffers in encoded.layers), encoded.header[: codec.read_frame(encoded.header)[1]]]

    def command(*parts: bytes) -> bytes:
        return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)

    with socket.create_connection(("127.0.0.1", redis_server.port)) as sock:
        sock.sendall(command(b"MULTI"))
        for name, value in zip([*layers, head], values, strict=True):
            sock.sendall(command(b"SET", name.encode(), value))
        reply = b""
        while reply.count(b"\r\n") < len(values) + 1:
            reply += sock.recv(65536)
        assert reply.startswith(b"+OK\r\n") and reply.count(b"+QUEUED") == len(values)
    assert redis_server.client().dbsize() == 0
    assert tier.get(ref, WIDE) is None and tier.stats().misses == 1
