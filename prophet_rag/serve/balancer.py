"""The front of `prophet-rag serve --workers N`: one TCP port, each connection handed to the worker process that holds
the fewest open connections (least connections), its bytes relayed both ways.

Why not the workers accepting from one shared socket (uvicorn's own `--workers`): the kernel wakes whichever process
polls first, not the least busy one, and an HTTP client keeps its connection for its next request, so the split of
a burst stays as it fell. Eight clients against two one-thread workers fell 4/4 in 4 rounds of 12, 3/5 in 6, 2/6 in
1 and 1/7 in 1; a worker holding six or seven of them prefilled those together on its one core while the other had
little to do: 3.24 requests/s and a TTFT p95 of 0.98 s at 1/7, against 3.99-4.54 and 0.63-0.68 s at 4/4
(benchmarks/RESULTS.md, "Balanced workers"). Counting connections is counting requests for the clients that matter
here: a client sends one request at a time on a connection, and an idle keep-alive connection is closed by its
worker after `timeout_keep_alive` (5 s).

The relay reads and writes whole chunks as they arrive (a streamed token is a few hundred bytes), so it adds a copy
per chunk and no waiting. A worker that cannot be reached (it died; its supervisor restarts it) is passed over for
the next least loaded; a connection that arrives while no worker is up waits for one, up to `wait_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)

_CHUNK = 1 << 16


class Balancer:
    """Connections to `host:port` spread over the Unix sockets `paths` (one per worker), least connections first,
    ties to the lowest index (so one client at a time keeps to one worker and its memory tier).

    `mark(i, up)` says whether worker `i` takes connections (its supervisor calls it as the worker starts and
    dies); `handle` is the port's connection callback (`asyncio.start_server`)."""

    def __init__(self, paths: Sequence[str], *, wait_s: float = 300.0) -> None:
        self.paths = list(paths)
        self.wait_s = wait_s
        self.open = [0] * len(self.paths)
        """Connections relayed to each worker now."""
        self._up = [False] * len(self.paths)
        self._changed = asyncio.Condition()

    async def mark(self, index: int, up: bool) -> None:
        async with self._changed:
            self._up[index] = up
            self._changed.notify_all()

    async def all_up(self) -> None:
        """Returns once every worker is up."""
        async with self._changed:
            await self._changed.wait_for(lambda: all(self._up))

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        """One client connection: relayed to a worker, or closed when none is up within `wait_s`."""
        try:
            connected = await asyncio.wait_for(self._connect(), self.wait_s)
        except TimeoutError:
            log.warning("no worker was up for %.0f s; a connection was closed unanswered", self.wait_s)
            connected = None
        if connected is None:
            client_writer.close()
            return
        index, (worker_reader, worker_writer) = connected
        try:
            await _relay(client_reader, client_writer, worker_reader, worker_writer)
        finally:
            self.open[index] -= 1

    async def _connect(self) -> tuple[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        """The least loaded worker that is up and answers, counted in `open` from before the connection is made, so
        that connections arriving together spread."""
        while True:
            tried: set[int] = set()
            while candidates := [i for i in range(len(self.paths)) if self._up[i] and i not in tried]:
                index = min(candidates, key=lambda i: (self.open[i], i))
                tried.add(index)
                self.open[index] += 1
                try:
                    streams = await asyncio.open_unix_connection(self.paths[index])
                except OSError:  # it died since it was marked up: its supervisor will mark it down
                    self.open[index] -= 1
                    continue
                except BaseException:  # cancelled (`wait_s` ran out, the server stops): not connected
                    self.open[index] -= 1
                    raise
                return index, streams
            async with self._changed:
                await self._changed.wait()


async def _relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                 worker_reader: asyncio.StreamReader, worker_writer: asyncio.StreamWriter) -> None:
    """Bytes both ways until both sides have finished; either side failing or closing early closes both (a client
    that goes away thus cancels its request on the worker)."""
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # a half-close: the other way may still be sending

    up = asyncio.ensure_future(pipe(client_reader, worker_writer))
    down = asyncio.ensure_future(pipe(worker_reader, client_writer))
    try:
        done, _ = await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
        if down not in done and up.exception() is None:  # the client sent EOF: its answer may still come
            await asyncio.wait((down,))
    finally:
        for task in (up, down):
            task.cancel()
        for writer in (client_writer, worker_writer):
            writer.close()
        for task in (up, down):
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await task
