"""The documents a LangChain run retrieved, so that a prophet-rag model called inside it finds them in its prompt.

In the chains LangChain's tutorials write, `create_retrieval_chain(retriever, create_stuff_documents_chain(model,
prompt))` or `{"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | model`, the model
receives only the rendered prompt: the documents were joined into its `{context}`. `RunDocuments` is a callback
handler that LangChain adds to every run once a prophet-rag model has been built (through a configure hook, the way
LangChain adds its own tracers). For each top-level run it records the page contents of the Documents that its
retrievers return and that its steps take or give, and the string values its prompt templates are filled with. A
model called inside the run looks them up (`seen`) and finds the documents in its messages by their exact content
(placement.locate). Documents of other runs, concurrent or earlier, are never candidates. Runs are tracked only while
open: what a top-level run recorded is dropped when it ends.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.tracers.context import register_configure_hook


@dataclass
class Seen:
    """What one top-level run has recorded so far."""

    documents: dict[str, None] = field(default_factory=dict)
    """Page contents, in the order first seen (a dict keeps them unique)."""
    values: dict[str, None] = field(default_factory=dict)
    """String values its prompt templates were filled with: per-call text, such as the question."""


def _documents(value: Any) -> list[str]:
    """Page contents of a Document, a list of them, or a mapping's values that are either (one level deep)."""
    found = []
    for item in value.values() if isinstance(value, Mapping) else [value]:
        if isinstance(item, Document):
            found.append(item.page_content)
        elif isinstance(item, list | tuple) and item and all(isinstance(doc, Document) for doc in item):
            found.extend(doc.page_content for doc in item)
    return found


_CALL_PARENT: ContextVar[UUID | None] = ContextVar("prophet_rag_model_call_parent", default=None)


def call_parent(run_manager: Any) -> UUID | None:
    """The run a model call belongs to: its run manager's parent, else (in `stream`, which passes none) the parent
    its start event reported in this context."""
    return run_manager.parent_run_id if run_manager is not None else _CALL_PARENT.get()


class RunDocuments(BaseCallbackHandler):
    """Records, per top-level run, the documents and prompt values its steps saw (see the module docstring).

    Thread-safe: a run's parallel branches report from worker threads. At most `max_runs` runs are tracked: past
    that the oldest is forgotten, as a run abandoned without an end event would otherwise be kept forever.
    """

    run_inline = True  # cheap bookkeeping, and a model call's start must be seen in the call's own context
    ignore_retry = True
    ignore_custom_event = True

    def __init__(self, max_runs: int = 100_000) -> None:
        self._parent: OrderedDict[UUID, UUID | None] = OrderedDict()
        self._seen: dict[UUID, Seen] = {}
        self._max_runs = max_runs
        self._lock = threading.Lock()

    def open_runs(self) -> int:
        """How many runs are open (tracked) now. (Not `__len__`: LangChain tests the handler's truth.)"""
        with self._lock:
            return len(self._parent)

    def seen(self, parent_run_id: UUID | None) -> Seen | None:
        """What the top-level run holding `parent_run_id` (a model call's parent) has recorded, or None."""
        with self._lock:
            if parent_run_id not in self._parent:
                return None
            seen = self._seen.get(self._top(parent_run_id))
            return None if seen is None else Seen(dict(seen.documents), dict(seen.values))

    def _top(self, run_id: UUID) -> UUID:
        while (parent := self._parent.get(run_id)) is not None and parent in self._parent:
            run_id = parent
        return run_id

    def _open(self, run_id: UUID, parent_run_id: UUID | None) -> None:
        with self._lock:
            self._parent[run_id] = parent_run_id
            if len(self._parent) > self._max_runs:
                oldest, _ = self._parent.popitem(last=False)
                self._seen.pop(oldest, None)

    def _close(self, run_id: UUID) -> None:
        with self._lock:
            parent = self._parent.pop(run_id, None)
            if parent is None or parent not in self._parent:  # a top-level run: its record goes with it
                self._seen.pop(run_id, None)

    def _record(self, run_id: UUID, value: Any, prompt: bool = False) -> None:
        documents = _documents(value)
        values = [v for v in value.values() if isinstance(v, str)] if prompt and isinstance(value, Mapping) else []
        if not documents and not values:
            return
        with self._lock:
            if run_id not in self._parent:
                return
            seen = self._seen.setdefault(self._top(run_id), Seen())
            seen.documents.update(dict.fromkeys(documents))
            seen.values.update(dict.fromkeys(values))

    # A model's `stream` calls its `_stream` with no run manager: the start event, run in the call's own context just
    # before, says which run the call belongs to.
    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: UUID,
                            parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        _CALL_PARENT.set(parent_run_id)

    def on_llm_start(self, serialized: Any, prompts: Any, *, run_id: UUID, parent_run_id: UUID | None = None,
                     **kwargs: Any) -> None:
        _CALL_PARENT.set(parent_run_id)

    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None,
                       **kwargs: Any) -> None:
        self._open(run_id, parent_run_id)
        self._record(run_id, inputs, prompt=kwargs.get("run_type") == "prompt")

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._record(run_id, outputs)
        if kwargs.get("inputs") is not None:  # a streamed run reports its input only at its end
            self._record(run_id, kwargs["inputs"])
        self._close(run_id)


    def _step_start(self, serialized: Any, query: Any, *, run_id: UUID, parent_run_id: UUID | None = None,
                    **kwargs: Any) -> None:
        self._open(run_id, parent_run_id)

    def _step_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._record(run_id, output)
        self._close(run_id)

    def _step_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._close(run_id)

    on_chain_error = _step_error
    on_retriever_start, on_retriever_end, on_retriever_error = _step_start, _step_end, _step_error
    # Tools are tracked to link a chain that runs inside a tool to the run around it.
    on_tool_start, on_tool_end, on_tool_error = _step_start, _step_end, _step_error


RUNS = RunDocuments()
"""The one handler: every run's documents, for every prophet-rag model in the process."""

# Its default makes the hook add the handler in every context, worker threads included.
_HOOK: ContextVar[RunDocuments | None] = ContextVar("prophet_rag_run_documents", default=RUNS)
_install_lock = threading.Lock()
_installed = False


def install() -> None:
    """Have LangChain add `RUNS` to every run from now on (idempotent)."""
    global _installed
    with _install_lock:
        if not _installed:
            register_configure_hook(_HOOK, inheritable=True)
            _installed = True
