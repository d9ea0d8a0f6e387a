"""What both framework adapters share: loading an engine, the question asked of a plain prompt, thread streaming."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

from prophet_rag import ProphetEngine, StoreConfig

PLAIN_QUERY = "Follow the instructions in the document above."
"""The question asked of a plain prompt: the engine answers a question over documents, so a prompt with no
retrieved documents is passed as the only document."""


def load_engine(model: str | None, device: str, store_dir: str | None) -> ProphetEngine:
    """`ProphetEngine.from_pretrained(model, device=device)` (`model=None`: the embedded SmolLM2-135M), its store in
    `store_dir` (None: the default store)."""
    store = StoreConfig(directory=store_dir) if store_dir is not None else None
    return ProphetEngine.from_pretrained(model, device=device, store=store)


async def iterate_in_thread(deltas: Iterable[str]) -> AsyncIterator[str]:
    """Iterate blocking text deltas one step at a time in a worker thread, so the event loop stays free."""
    steps = iter(deltas)
    while (delta := await asyncio.to_thread(next, steps, None)) is not None:
        yield delta
