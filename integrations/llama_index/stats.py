"""Statistics scopes: the statistics of the ProphetLLM calls a synthesizer or a chat engine makes, put into its
response's `metadata["prophet_rag"]`.

A span handler on LlamaIndex's root dispatcher opens a list for each synthesizer or chat engine span; every ProphetLLM
call inside takes an entry in each open list (`new_entry`) and fills it when its answer ends. The handler does not
import the LLM class: the LLM installs it (`install`) and names its own class, so this module stands below llm.py.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar, Token
from typing import Any

from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.chat_engine.types import BaseChatEngine
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.response_synthesizers import BaseSynthesizer

_SCOPES: ContextVar[tuple[list[dict[str, Any]], ...]] = ContextVar("prophet_rag_stats_scopes", default=())
"""The statistics lists open around the current code: each ProphetLLM call appends its entry to every one."""


def new_entry() -> dict[str, Any]:
    """An empty statistics entry, appended to every list open around the caller; the call fills it at its end."""
    entry: dict[str, Any] = {}
    for reports in _SCOPES.get():
        reports.append(entry)
    return entry


class _StatsScopes(BaseSpanHandler):
    """Puts the statistics of the ProphetLLM calls a synthesizer or a chat engine makes into its response.

    Every span of a synthesizer or a chat engine (`synthesize`, `chat`, `stream_chat` and their async forms) opens a
    list in `_SCOPES` for its duration; each ProphetLLM call inside appends its entry (filled when its answer ends),
    so a chat engine's list also holds a condensing call made outside synthesis. The list becomes the response's
    `metadata["prophet_rag"]`. Spans run their function in the caller's context, so the list set on entry is the
    one its calls see (worker threads copy the context). A streamed response may start its LLM call lazily, at its
    first token, in whatever thread reads it: its token generator is wrapped to iterate with the lists in place."""

    _tokens: dict[str, Token] = PrivateAttr(default_factory=dict)
    _llm_type: type = PrivateAttr()

    def __init__(self, llm_type: type, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._llm_type = llm_type

    @classmethod
    def class_name(cls) -> str:
        return "ProphetStatsScopes"

    def span_enter(self, id_: str, bound_args: Any, instance: Any = None, parent_id: str | None = None,
                   tags: Any = None, **kwargs: Any) -> None:
        if isinstance(instance, BaseSynthesizer | BaseChatEngine):
            self._tokens[id_] = _SCOPES.set((*_SCOPES.get(), []))

    def span_exit(self, id_: str, bound_args: Any, instance: Any = None, result: Any = None, **kwargs: Any) -> None:
        scopes = self._close(id_)
        if scopes is None or not hasattr(result, "source_nodes"):  # a response, not get_response's text
            return
        # A synthesizer's streamed response; a streamed chat response starts its calls eagerly, in `stream_chat`.
        tokens = getattr(result, "response_gen", None) if isinstance(instance, BaseSynthesizer) else None
        if tokens is not None:
            wrap = _collect_async if inspect.isasyncgen(tokens) else _collect
            result.response_gen = wrap(tokens, scopes, result)
        reports = scopes[-1]
        # A chat engine's stream starts its call lazily too, when its writer thread reads the synthesizer's tokens.
        if reports or tokens is not None or isinstance(getattr(instance, "_llm", None), self._llm_type):
            # A dataclass field of every response type but StreamingAgentChatResponse, which takes it as attribute.
            result.metadata = {**(getattr(result, "metadata", None) or {}), "prophet_rag": reports}

    def span_drop(self, id_: str, bound_args: Any, instance: Any = None, err: BaseException | None = None,
                  **kwargs: Any) -> None:
        self._close(id_)

    def _close(self, id_: str) -> tuple[list[dict[str, Any]], ...] | None:
        token = self._tokens.pop(id_, None)
        if token is None:
            return None
        scopes = _SCOPES.get()
        try:
            _SCOPES.reset(token)
        except ValueError:  # a span that ends in another context (a future's callback): nothing to reset there
            pass
        return scopes

    def new_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_exit_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_drop_span(self, *args: Any, **kwargs: Any) -> None:
        return None


def _drop_if_empty(response: Any, reports: list[dict[str, Any]]) -> None:
    if not reports:  # the stream made no ProphetLLM call
        response.metadata.pop("prophet_rag", None)


def _collect(tokens: Iterator[str], scopes: tuple[list[dict[str, Any]], ...], response: Any) -> Iterator[str]:
    while True:
        token = _SCOPES.set(scopes)
        try:
            item = next(tokens)
        except StopIteration:
            break
        finally:
            _SCOPES.reset(token)
        yield item
    _drop_if_empty(response, scopes[-1])


async def _collect_async(tokens: AsyncIterator[str], scopes: tuple[list[dict[str, Any]], ...],
                         response: Any) -> AsyncIterator[str]:
    while True:
        token = _SCOPES.set(scopes)
        try:
            item = await anext(tokens)
        except StopAsyncIteration:
            break
        finally:
            _SCOPES.reset(token)
        yield item
    _drop_if_empty(response, scopes[-1])


_install_lock = threading.Lock()


def install(llm_type: type) -> None:
    """Add the span handler to LlamaIndex's root dispatcher, once. `llm_type` is ProphetLLM, passed by its own module
    (which imports this one): a chat engine over one gets its list even when its call starts after the span ends."""
    with _install_lock:
        root = get_dispatcher()
        if not any(isinstance(handler, _StatsScopes) for handler in root.span_handlers):
            root.add_span_handler(_StatsScopes(llm_type))
