"""Shared by the framework adapter tests: a spy on what reaches the engine."""

from __future__ import annotations

import pytest


@pytest.fixture
def calls(engine, monkeypatch):
    """Every `engine.stream_chat` call (the one the adapters make): dicts of messages, documents, transient flags,
    transient_prefix, method and the returned stream (its `.answer` once run)."""
    recorded = []
    original = engine.stream_chat

    def spy(messages, documents=(), **kwargs):
        stream = original(messages, documents, **kwargs)
        selection = kwargs.get("selection")
        recorded.append({
            "messages": messages, "documents": list(documents), "transient": list(kwargs.get("transient", ())),
            "transient_prefix": kwargs.get("transient_prefix", False),
            "method": kwargs.get("method") or (selection.method if selection else None), "stream": stream,
        })
        return stream

    monkeypatch.setattr(engine, "stream_chat", spy)
    return recorded
