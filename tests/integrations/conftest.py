"""Shared by the framework adapter tests: a spy on what reaches the engine."""

from __future__ import annotations

import pytest


@pytest.fixture
def calls(engine, monkeypatch):
    """Every `engine.stream` call (which `engine.answer` also goes through): dicts of chunks, query, method, stream."""
    recorded = []
    original = engine.stream

    def spy(chunks, query, **kwargs):
        stream = original(chunks, query, **kwargs)
        selection = kwargs.get("selection")
        method = kwargs.get("method") or (selection.method if selection else None)
        recorded.append({"chunks": list(chunks), "query": query, "method": method, "stream": stream})
        return stream

    monkeypatch.setattr(engine, "stream", spy)
    return recorded
