"""The `--workers` front (`serve/balancer.py`): connections go to the worker holding the fewest, their bytes both ways
intact, a close on either side reaching the other, a worker that is down or gone passed over."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from prophet_rag.serve.balancer import Balancer

LIMIT = 1 << 22
"""Bytes a line may have: more than the largest one sent."""


class FakeWorker:
    """A Unix-socket server that answers each line with `NAME:line`, records what it saw, and can hang up."""

    def __init__(self, name: str, path: str) -> None:
        self.name, self.path = name, path
        self.connections: list[asyncio.StreamWriter] = []
        self.eof_seen = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, self.path, limit=LIMIT)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.connections:
            writer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append(writer)
        while line := await reader.readline():
            writer.write(self.name.encode() + b":" + line)
            await writer.drain()
        self.eof_seen.set()
        writer.close()


@pytest.fixture
def folder():
    with tempfile.TemporaryDirectory(dir="/tmp") as name:  # short: a Unix socket path has at most ~100 bytes
        yield Path(name)


async def started(folder: Path, count: int, up: bool = True) -> tuple[Balancer, list[FakeWorker], int]:
    paths = [str(folder / f"{i}.sock") for i in range(count)]
    workers = [FakeWorker(f"w{i}", path) for i, path in enumerate(paths)]
    for worker in workers:
        await worker.start()
    balancer = Balancer(paths, wait_s=5)
    if up:
        for index in range(count):
            await balancer.mark(index, True)
    server = await asyncio.start_server(balancer.handle, "127.0.0.1", 0)
    return balancer, workers, server.sockets[0].getsockname()[1]


async def ask(port: int, line: bytes = b"hello\n") -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=LIMIT)
    writer.write(line)
    await writer.drain()
    return await asyncio.wait_for(reader.readline(), 5), reader, writer


async def test_connections_held_together_are_spread_evenly(folder):
    balancer, _, port = await started(folder, 2)
    replies = await asyncio.gather(*(ask(port) for _ in range(8)))
    names = sorted(reply.split(b":")[0] for reply, _, _ in replies)
    assert names == [b"w0"] * 4 + [b"w1"] * 4
    assert balancer.open == [4, 4]


async def test_each_new_connection_goes_to_the_worker_holding_fewest(folder):
    balancer, _, port = await started(folder, 3)
    held = [await ask(port) for _ in range(4)]
    assert [reply.split(b":")[0] for reply, _, _ in held] == [b"w0", b"w1", b"w2", b"w0"]
    _, _, writer = held[1]  # w1's connection ends: w1 holds none now
    writer.close()
    await asyncio.sleep(0.1)
    assert balancer.open == [2, 0, 1]
    reply, _, _ = await ask(port)
    assert reply.startswith(b"w1:")


async def test_one_client_at_a_time_keeps_to_the_first_worker(folder):
    _, _, port = await started(folder, 2)
    for _ in range(3):
        reply, _, writer = await ask(port)
        assert reply.startswith(b"w0:")
        writer.close()
        await asyncio.sleep(0.05)


async def test_bytes_are_relayed_both_ways_unchanged(folder):
    _, _, port = await started(folder, 1)
    payload = bytes(range(256)).replace(b"\n", b"") * 4096 + b"\n"  # 1 MiB in one line, chunked on the way
    reply, _, _ = await ask(port, payload)
    assert reply == b"w0:" + payload


async def test_a_worker_marked_down_gets_no_connections(folder):
    balancer, _, port = await started(folder, 2)
    await balancer.mark(0, False)
    replies = [await ask(port) for _ in range(3)]
    assert all(reply.startswith(b"w1:") for reply, _, _ in replies)


async def test_a_worker_that_is_gone_is_passed_over(folder):
    balancer, workers, port = await started(folder, 2)
    await workers[0].stop()  # still marked up, as a worker is for a moment after it dies
    Path(workers[0].path).unlink()
    replies = [await ask(port) for _ in range(3)]
    assert all(reply.startswith(b"w1:") for reply, _, _ in replies)
    assert balancer.open == [0, 3]


async def test_a_connection_waits_for_a_worker_to_come_up(folder):
    balancer, _, port = await started(folder, 1, up=False)
    pending = asyncio.ensure_future(ask(port))
    await asyncio.sleep(0.2)
    assert not pending.done()
    await balancer.mark(0, True)
    reply, _, _ = await asyncio.wait_for(pending, 5)
    assert reply.startswith(b"w0:")


async def test_a_connection_is_closed_when_no_worker_comes_up_in_time(folder):
    balancer, _, port = await started(folder, 1, up=False)
    balancer.wait_s = 0.2
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed unanswered
    writer.close()


async def test_a_client_that_hangs_up_closes_its_worker_connection(folder):
    balancer, workers, port = await started(folder, 1)
    _, _, writer = await ask(port)
    writer.close()
    await asyncio.wait_for(workers[0].eof_seen.wait(), 5)
    await asyncio.sleep(0.05)
    assert balancer.open == [0]


async def test_a_worker_that_hangs_up_closes_the_client_connection(folder):
    balancer, workers, port = await started(folder, 1)
    _, reader, _ = await ask(port)
    workers[0].connections[0].close()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    await asyncio.sleep(0.05)
    assert balancer.open == [0]
