"""LlamaIndex integration: `Settings.llm = ProphetLLM(...)`, a chat LLM that answers retrieved nodes over their KV.

- `ProphetLLM` is a chat model (`is_chat_model=True`): messages are rendered with the model's own chat template,
  system prompt included. Every built-in response synthesizer calls one of its template-level methods (`predict`,
  `stream`, `apredict`, `astream`) with the retrieved text still a separate argument (`context_str`, or
  `context_msg` in refine steps). Those methods render the synthesizer's own template with a mark in place of the
  context (placement.py), cut the context back into the retrieved nodes (registry.py), and put that request in a
  ContextVar around the normal call path, so every event, callback and template rule upstream still runs; `chat`
  and `stream_chat` then answer it, each node a cached chunk. Any other call (a plain `complete` or `chat`, an
  agent) carries no request and is a plain chat: full prefill, nothing stored.
- `ProphetKVPostprocessor` registers each retrieved node's text, so the LLM finds the nodes in the synthesizer's
  joined context; a node's KV is computed and stored by the first call that uses it (a cache miss, inside that
  call's TTFT). Without it the context is one-off text: no reuse (warned once).
- `ProphetSynthesizer` is the strict mode: one call over exactly the retrieved nodes, one chunk per node.

Errors: the engine's request errors are ValueErrors, and LlamaIndex's refine synthesizers (compact included) turn a
ValueError into "Empty Response"; on the synthesizers' path they are re-raised as `SynthesisError`, which is not one.
Statistics: each ProphetLLM response carries its call's statistics (`RequestStats.to_dict()`: cache hits and
misses, recomputed tokens, TTFT...) in `additional_kwargs["prophet_rag"]` and `raw["prophet_rag"]` (which agents
pass on as `AgentOutput.raw`); a query engine's or chat engine's response lists those of every call it made in
`metadata["prophet_rag"]`.
Token counts: building a ProphetLLM sets `Settings.tokenizer` to the model's tokenizer (`set_global_tokenizer=False`
keeps yours), so LlamaIndex packs contexts by the model's own counts. Leave `context_window` at the model's true
maximum (the default): a smaller one makes compact mode repack the nodes into pieces that match no node.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any

from llama_index.core import Settings
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.chat_engine.types import BaseChatEngine
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.prompts.default_prompt_selectors import DEFAULT_TEXT_QA_PROMPT_SEL
from llama_index.core.response_synthesizers import BaseSynthesizer
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
from llama_index.core.tools import ToolSelection
from llama_index.core.types import TokenAsyncGen, TokenGen

from prophet_rag import InvalidRequestError, ProphetRAGError
from prophet_rag.integrations.common import (
    Call,
    ChatRequest,
    ProphetSettings,
    check_documents,
    iterate_in_thread,
    tool_request,
)
from prophet_rag.integrations.placement import Marks
from prophet_rag.integrations.registry import ChunkRegistry
from prophet_rag.layout import DOCUMENTS
from prophet_rag.structured import ParsedOutput, Tool
from prophet_rag.structured.stream import TextDelta, ToolCallStream

CONTEXT_KEYS = ("context_str", "context_msg")
"""The template variables LlamaIndex's synthesizers put the retrieved text in (context_msg: refine steps)."""

SEPARATOR = "\n\n"
"""How LlamaIndex joins node texts into one context (what traces and callbacks see of a strict-mode call)."""

_ROLES = {MessageRole.CHATBOT: "assistant", MessageRole.MODEL: "assistant", MessageRole.DEVELOPER: "system"}

_REQUEST: ContextVar[ChatRequest | None] = ContextVar("prophet_rag_request", default=None)
_SCOPES: ContextVar[tuple[list[dict[str, Any]], ...]] = ContextVar("prophet_rag_stats_scopes", default=())
"""The statistics lists open around the current code: each ProphetLLM call appends its entry to every one."""


class SynthesisError(ProphetRAGError):
    """A prophet-rag request error raised inside a LlamaIndex synthesizer call; the original is its `__cause__`.

    The engine's request errors (`InvalidRequestError`, `ContextWindowError`) are ValueErrors, which LlamaIndex's
    refine synthesizers catch and answer with "Empty Response"; this class is not one, so the error reaches you.
    """


@contextmanager
def _surfaced() -> Iterator[None]:
    try:
        yield
    except ProphetRAGError as error:
        if isinstance(error, (ValueError, TypeError)):
            raise SynthesisError(f"{type(error).__name__}: {error}") from error
        raise


@contextmanager
def _scoped(request: ChatRequest | None) -> Iterator[None]:
    token = _REQUEST.set(request)
    try:
        yield
    finally:
        _REQUEST.reset(token)


class _StatsScopes(BaseSpanHandler):
    """Puts the statistics of the ProphetLLM calls a synthesizer or a chat engine makes into its response.

    Every span of a synthesizer or a chat engine (`synthesize`, `chat`, `stream_chat` and their async forms) opens a
    list in `_SCOPES` for its duration; each ProphetLLM call inside appends its entry (filled when its answer ends),
    so a chat engine's list also holds a condensing call made outside synthesis. The list becomes the response's
    `metadata["prophet_rag"]`. Spans run their function in the caller's context, so the list set on entry is the
    one its calls see (worker threads copy the context). A streamed response may start its LLM call lazily, at its
    first token, in whatever thread reads it: its token generator is wrapped to iterate with the lists in place."""

    _tokens: dict[str, Token] = PrivateAttr(default_factory=dict)

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
        if reports or tokens is not None or isinstance(getattr(instance, "_llm", None), ProphetLLM):
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


_collector_lock = threading.Lock()


def _install_collector() -> None:
    with _collector_lock:
        root = get_dispatcher()
        if not any(isinstance(handler, _StatsScopes) for handler in root.span_handlers):
            root.add_span_handler(_StatsScopes())


def _message(message: ChatMessage, index: int) -> dict[str, Any]:
    """A LlamaIndex message as the engine takes it: its text, an assistant's tool calls (`ToolCallBlock`s, or
    OpenAI-format `additional_kwargs["tool_calls"]`) and a tool result's `tool_call_id`."""
    calls = []
    for block in message.blocks:
        if isinstance(block, ToolCallBlock):
            calls.append({"id": block.tool_call_id or f"call_{index}_{len(calls)}", "type": "function",
                          "function": {"name": block.tool_name, "arguments": block.tool_kwargs}})
        elif not isinstance(block, TextBlock):
            raise InvalidRequestError(
                f"message {index} holds a {type(block).__name__}; ProphetLLM reads text only, so pass text blocks."
            )
    calls = calls or list(message.additional_kwargs.get("tool_calls") or [])
    text = "".join(block.text for block in message.blocks if isinstance(block, TextBlock))
    out: dict[str, Any] = {"role": _ROLES.get(message.role, message.role.value), "content": text}
    if calls:
        out["tool_calls"] = calls
    if message.additional_kwargs.get("tool_call_id") is not None:
        out["tool_call_id"] = message.additional_kwargs["tool_call_id"]
    return out


def _chat_response(text: str, delta: str | None = None, parsed: ParsedOutput | None = None,
                   **details: Any) -> ChatResponse:
    """A chat response; with `parsed`, its text is the parsed content and its calls are `ToolCallBlock`s (calls
    that did not parse are listed in `additional_kwargs["invalid_tool_calls"]`)."""
    if parsed is None:
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta, **details)
    blocks = [TextBlock(text=parsed.content)] if parsed.content else []
    blocks += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments) for c in parsed.tool_calls]
    message = ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)
    if parsed.invalid_tool_calls:
        details.setdefault("additional_kwargs", {})["invalid_tool_calls"] = [
            {"id": c.id, "name": c.name, "arguments": c.arguments, "error": c.error}
            for c in parsed.invalid_tool_calls]
    return ChatResponse(message=message, delta=delta, **details)


def _completion_response(text: str, delta: str | None = None, **details: Any) -> CompletionResponse:
    return CompletionResponse(text=text, delta=delta, **details)


class ProphetLLM(FunctionCallingLLM, ProphetSettings):
    """A LlamaIndex chat LLM over a `ProphetEngine`; retrieved nodes are answered over their cached KV.

    `ProphetLLM(engine=engine)` wraps an engine; without one `model` is loaded (None: the embedded SmolLM2-135M) on
    `device`, its store in `store_dir`. `method`/`ratio` choose the recomputation (see `prophet_rag.SelectionConfig`)
    and `max_new_tokens` is also `metadata.num_output`. `complete`, `chat` and their stream and async forms take the
    per-call options of `prophet_rag.integrations.common.OPTIONS` (`max_new_tokens`, `stop`, ...); any other keyword
    is refused. Responses carry usage in `raw["usage"]` (read by TokenCountingHandler) and the request's statistics
    in `additional_kwargs["prophet_rag"]`; a stream's last response, whose delta is empty, carries them.

    A function-calling LLM: `chat_with_tools`, `predict_and_call` and the agents (`FunctionAgent`) render the tools
    with the model's own tool format and decode under the tools' grammar, so with `tool_required=True` (or a tool
    named in `tool_choice`) every answer is a valid call of a given tool. `structured_predict` and
    `as_structured_llm` go through a required call of the output class as a tool, so their answers are always valid
    instances when they end within `max_new_tokens`.
    """

    context_window: int | None = Field(
        default=None, description="Context window reported to LlamaIndex; None: the model's true maximum."
    )
    set_global_tokenizer: bool = Field(
        default=True, description="Set Settings.tokenizer to the model's tokenizer, so LlamaIndex counts its tokens."
    )

    _registry: ChunkRegistry = PrivateAttr(default_factory=ChunkRegistry)

    def __init__(self, **kwargs: Any) -> None:
        given = sorted(name for name in ("messages_to_prompt", "completion_to_prompt", "query_wrapper_prompt")
                       if kwargs.get(name) is not None)
        if given:
            raise InvalidRequestError(
                f"ProphetLLM renders prompts with the model's own chat template, so {', '.join(given)} would not be "
                "used; drop it, and set system_prompt=... or pass chat messages instead."
            )
        super().__init__(**self.accepted(kwargs))
        self._setup()
        _install_collector()
        if self.set_global_tokenizer:
            Settings.tokenizer = self.token_ids

    @classmethod
    def class_name(cls) -> str:
        return "ProphetLLM"

    @property
    def registry(self) -> ChunkRegistry:
        """The node texts `ProphetKVPostprocessor` registered; the LLM finds them in a synthesizer's context."""
        return self._registry

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window or self.engine.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self.model_name,
        )

    # ---- template level: find the request --------------------------------------------------------------------

    def template_request(self, prompt: BasePromptTemplate, prompt_args: Mapping[str, Any],
                         documents: Sequence[str] | None = None) -> ChatRequest | None:
        """The request a synthesizer's template call makes: the template's messages with the retrieved text's
        place marked, and that text cut into the registered nodes (or `documents`, exactly). None when the call
        carries no retrieved text."""
        args = {**prompt.kwargs, **prompt_args}
        key = next((key for key in CONTEXT_KEYS if args.get(key) is not None), None)
        if key is None:
            return None
        transient: Sequence[bool] = ()
        if documents is None:
            documents, transient = self._segment(args[key])
        if not documents:
            return None
        marks = Marks(args, key)
        messages = self._get_messages(prompt, **marks.args)
        request = marks.request([_message(m, i) for i, m in enumerate(messages)], documents, transient)
        if request is None:
            self._warn_once("placement", f"the prompt template renders {{{key}}} more or less than once, so its "
                                         "documents cannot be placed; answering the prompt as plain text.")
        return request

    def _segment(self, context: str | Sequence[str]) -> tuple[list[str], list[bool]]:
        if not len(self._registry):
            self._warn_once(
                "postprocessor",
                "ProphetLLM got retrieved context but no node was registered, so it is answered as one-off text "
                "with no KV reuse; add node_postprocessors=[ProphetKVPostprocessor(llm=...)] to the query engine.",
            )
        texts = [context] if isinstance(context, str) else [str(text) for text in context]  # simple_summarize: a list
        pieces = [piece for text in texts for piece in self._registry.segment(text)]
        return [text for text, _ in pieces], [not registered for _, registered in pieces]

    @contextmanager
    def _template_scope(self, prompt: BasePromptTemplate, prompt_args: Mapping[str, Any]) -> Iterator[None]:
        with _surfaced(), _scoped(self.template_request(prompt, prompt_args)):
            yield

    def predict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        with self._template_scope(prompt, prompt_args):
            return super().predict(prompt, **prompt_args)

    def stream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenGen:
        # stream_chat starts the answer eagerly, so the request is read while it is set and bad input raises here.
        with self._template_scope(prompt, prompt_args):
            return super().stream(prompt, **prompt_args)

    async def apredict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        with self._template_scope(prompt, prompt_args):
            return await super().apredict(prompt, **prompt_args)

    async def astream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenAsyncGen:
        with self._template_scope(prompt, prompt_args):
            return await super().astream(prompt, **prompt_args)

    # ---- tools -------------------------------------------------------------------------------------------------

    def _prepare_chat_with_tools(self, tools: Sequence[Any], user_msg: str | ChatMessage | None = None,
                                 chat_history: list[ChatMessage] | None = None, verbose: bool = False,
                                 allow_parallel_tool_calls: bool = False, tool_required: bool = False,
                                 tool_choice: str | dict | None = None, **kwargs: Any) -> dict[str, Any]:
        """The `chat` arguments of a call with `tools`: the messages, the tools in OpenAI format, `tool_choice`
        (`"required"` when `tool_required`, else `"auto"`, unless given) and whether calls may be parallel."""
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str)
                            else user_msg)
        specs = [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]
        choice = tool_choice if tool_choice is not None else "required" if tool_required else "auto"
        return {"messages": messages, "tools": specs, "tool_choice": choice,
                "parallel_tool_calls": allow_parallel_tool_calls, **kwargs}

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[ToolSelection]:
        """The tool calls of a response (its `ToolCallBlock`s)."""
        calls = [ToolSelection(tool_id=block.tool_call_id or "", tool_name=block.tool_name,
                               tool_kwargs=block.tool_kwargs if isinstance(block.tool_kwargs, dict) else {})
                 for block in response.message.blocks if isinstance(block, ToolCallBlock)]
        if not calls and error_on_no_tool_call:
            invalid = response.additional_kwargs.get("invalid_tool_calls")
            raise ValueError(f"expected at least one tool call, got none{f': {invalid}' if invalid else ''}.")
        return calls

    def _tool_results(self, messages: list[dict[str, Any]], system_prompt: bool) -> ChatRequest | None:
        """`messages` with the latest tool result that holds registered nodes (a `RetrieverTool` or
        `QueryEngineTool` given `node_postprocessors=[ProphetKVPostprocessor(llm=...)]`) cut into them, each node a
        cached chunk and the text between them one-off; None when no tool result holds one."""
        if not len(self._registry):
            return None
        for index in reversed(range(len(messages))):
            if messages[index]["role"] != "tool":
                continue
            pieces = self._registry.segment(messages[index]["content"])
            if any(registered for _, registered in pieces):
                request = [dict(message) for message in messages]
                request[index] = {**messages[index], "content": [DOCUMENTS]}
                chat = ChatRequest(tuple(request), tuple(text for text, _ in pieces),
                                   tuple(not registered for _, registered in pieces))
                return self.with_system_prompt(chat) if system_prompt else chat
        return None

    # ---- message level: answer --------------------------------------------------------------------------------

    def _start(self, messages: Sequence[ChatMessage], options: Mapping[str, Any],
               system_prompt: bool = True) -> tuple[Call, dict[str, Any], tuple[Tool, ...]]:
        """Start answering the scoped request, else `messages` as a plain chat; bad input raises here. The second
        value is this call's entry in the current synthesis's statistics, filled by `_details` at the end; the
        third the call's tools (`tools`, `tool_choice` and `parallel_tool_calls` in `options`)."""
        options = dict(options)
        specs, choice = options.pop("tools", None), options.pop("tool_choice", None)
        parallel = options.pop("parallel_tool_calls", None)
        tools, structured = tool_request(self.engine, specs, choice, parallel) if specs else ((), {})
        converted = [_message(m, i) for i, m in enumerate(messages)]
        request = _REQUEST.get() or self._tool_results(converted, system_prompt) or self.plain_request(
            converted, system_prompt=system_prompt)
        call = self.start(request, options, **structured)
        entry: dict[str, Any] = {}
        for reports in _SCOPES.get():
            reports.append(entry)
        return call, entry, tools

    @staticmethod
    def _details(call: Call, entry: dict[str, Any]) -> dict[str, Any]:
        report = call.report()
        entry.update(report["prophet_rag"])
        # raw: what agents pass on (AgentOutput.raw); TokenCountingHandler reads the usage there.
        return {"raw": {"usage": call.usage, "prophet_rag": report["prophet_rag"]}, "additional_kwargs": report}

    def _answer(self, call: Call, entry: dict[str, Any], make: Callable[..., Any], tools: Sequence[Tool] = ()) -> Any:
        text = call.text()
        if not tools:
            return make(text, **self._details(call, entry))
        return make(text, parsed=self.engine.tool_format.parse(text, tools), **self._details(call, entry))

    def _responses(self, call: Call, entry: dict[str, Any], make: Callable[..., Any],
                   tools: Sequence[Tool] = ()) -> Iterator[Any]:
        calls, text = self._calls(tools), ""
        for delta in call:
            for piece in calls.feed(delta) if calls else [delta]:
                text += piece
                yield make(text, piece)
        yield self._last(call, entry, make, calls, tools, text)

    async def _aresponses(self, call: Call, entry: dict[str, Any], make: Callable[..., Any],
                          tools: Sequence[Tool] = ()) -> AsyncIterator[Any]:
        calls, text = self._calls(tools), ""
        async for delta in iterate_in_thread(call):
            for piece in calls.feed(delta) if calls else [delta]:
                text += piece
                yield make(text, piece)
        yield self._last(call, entry, make, calls, tools, text)

    def _calls(self, tools: Sequence[Tool]) -> _TextOfCalls | None:
        return _TextOfCalls(ToolCallStream(self.engine.tool_format)) if tools else None

    def _last(self, call: Call, entry: dict[str, Any], make: Callable[..., Any], calls: _TextOfCalls | None,
              tools: Sequence[Tool], text: str) -> Any:
        """A stream's last response: empty delta, the statistics and, with tools, the parsed calls."""
        if calls is None:
            return make(text, "", **self._details(call, entry))
        parsed = calls.finish(tools)
        return make(text, "", parsed=parsed, **self._details(call, entry))

    def _chat(self, messages: Sequence[ChatMessage], options: Mapping[str, Any]) -> ChatResponse:
        call, entry, tools = self._start(messages, options)
        return self._answer(call, entry, _chat_response, tools)

    def _complete(self, prompt: str, formatted: bool, options: Mapping[str, Any]) -> CompletionResponse:
        # `formatted=True` means the prompt has been through the LLM's own prompt rules, system prompt included.
        call, entry, _ = self._start([ChatMessage(role=MessageRole.USER, content=prompt)], options, not formatted)
        return self._answer(call, entry, _completion_response)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        call, entry, tools = self._start(messages, kwargs)
        return self._responses(call, entry, _chat_response, tools)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        # The worker thread copies the request's context. Awaiting the decorated `chat` instead (CustomLLM's
        # default) would block the event loop and report the call twice.
        return await asyncio.to_thread(self._chat, messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        call, entry, tools = self._start(messages, kwargs)
        return self._aresponses(call, entry, _chat_response, tools)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """`prompt` as one user message (behind `system_prompt` unless `formatted`), rendered by the chat template."""
        return self._complete(prompt, formatted, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        call, entry, _ = self._start([ChatMessage(role=MessageRole.USER, content=prompt)], kwargs, not formatted)
        return self._responses(call, entry, _completion_response)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self._complete, prompt, formatted, kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        call, entry, _ = self._start([ChatMessage(role=MessageRole.USER, content=prompt)], kwargs, not formatted)
        return self._aresponses(call, entry, _completion_response)


class _TextOfCalls:
    """The text deltas of a stream with tools (a call's own text is not content; the last response carries the
    parsed calls)."""

    def __init__(self, calls: ToolCallStream) -> None:
        self._calls = calls

    def feed(self, delta: str) -> list[str]:
        return [event.text for event in self._calls.feed(delta) if isinstance(event, TextDelta)]

    def finish(self, tools: Sequence[Tool]) -> ParsedOutput:
        return self._calls.finish(tools)[1]


def _prophet_llm(llm: ProphetLLM | None, user: str) -> ProphetLLM:
    # `Settings.llm` would try to build the OpenAI default when none is set, so the stored value is read instead.
    llm = llm if llm is not None else Settings._llm
    if not isinstance(llm, ProphetLLM):
        raise InvalidRequestError(
            f"{user} needs a ProphetLLM, got {type(llm).__name__}: pass llm=ProphetLLM(...) or set "
            "Settings.llm = ProphetLLM(...) first."
        )
    return llm


class ProphetKVPostprocessor(BaseNodePostprocessor):
    """Registers the text of each retrieved node with the LLM, so that it finds the nodes in a synthesizer's context
    and answers each over its cached KV.

    `ProphetKVPostprocessor(llm=None)` uses `Settings.llm`, which must then be a `ProphetLLM`. The nodes are
    returned unchanged, so `source_nodes` and citations stay intact. A node's text is
    `node.get_content(MetadataMode.LLM)`, exactly what the synthesizers put in the context. A node not stored yet is
    computed and stored by the LLM call that uses it, so that call reports it as a cache miss, its prefill inside
    the call's TTFT. An empty node is refused (`InvalidRequestError`), as everywhere in prophet-rag.
    """

    _llm: ProphetLLM = PrivateAttr()

    def __init__(self, llm: ProphetLLM | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._llm = _prophet_llm(llm, "ProphetKVPostprocessor")

    @classmethod
    def class_name(cls) -> str:
        return "ProphetKVPostprocessor"

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        texts = check_documents([n.node.get_content(metadata_mode=MetadataMode.LLM) for n in nodes], "retrieved node")
        for text in texts:
            self._llm.registry.add(text)
        return nodes


def _check_chunks(query_str: object, text_chunks: object) -> list[str]:
    if not isinstance(query_str, str) or not query_str.strip():
        raise InvalidRequestError(f"ProphetSynthesizer needs the question as a non-empty string, got {query_str!r}.")
    if isinstance(text_chunks, str) or not isinstance(text_chunks, Sequence) or not text_chunks:
        raise InvalidRequestError(
            "ProphetSynthesizer needs text_chunks as a non-empty list of node texts (one string per node), got "
            f"{type(text_chunks).__name__}."
        )
    return [chunk.strip() for chunk in check_documents(text_chunks, "text chunk")]


class ProphetSynthesizer(BaseSynthesizer):
    """Strict mode: one call over exactly the retrieved nodes, one chunk per node, in retrieval order.

    Use it as `index.as_query_engine(response_synthesizer=ProphetSynthesizer(llm=...))`. `text_qa_template` (with
    `{context_str}` and `{query_str}`) lays out the call: its messages are sent, with the nodes at the context's
    place. `streaming=True` makes `get_response` return a generator of text deltas (an async one from
    `aget_response`). Bad input raises `InvalidRequestError` naming the problem.
    """

    def __init__(
        self,
        llm: ProphetLLM | None = None,
        *,
        text_qa_template: BasePromptTemplate | None = None,
        streaming: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(llm=_prophet_llm(llm, "ProphetSynthesizer"), streaming=streaming, **kwargs)
        self._text_qa_template = text_qa_template or DEFAULT_TEXT_QA_PROMPT_SEL

    def _get_prompts(self) -> dict[str, BasePromptTemplate]:
        return {"text_qa_template": self._text_qa_template}

    def _update_prompts(self, prompts: dict[str, BasePromptTemplate]) -> None:
        if "text_qa_template" in prompts:
            self._text_qa_template = prompts["text_qa_template"]

    def _prepare(self, query_str: str, text_chunks: Sequence[str],
                 response_kwargs: Mapping[str, Any]) -> tuple[list[ChatMessage], ChatRequest]:
        """(the messages callbacks and traces see, the request the engine answers)."""
        chunks = _check_chunks(query_str, text_chunks)
        template = self._text_qa_template.partial_format(query_str=query_str)
        args = {**response_kwargs, "context_str": SEPARATOR.join(chunks)}
        request = self._llm.template_request(template, args, documents=chunks)
        if request is None:
            raise InvalidRequestError("text_qa_template must hold {context_str} exactly once: it places the nodes.")
        return self._llm._get_messages(template, **args), request

    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any):
        """`str`, or a generator of text deltas when streaming."""
        messages, request = self._prepare(query_str, text_chunks, response_kwargs)
        with _scoped(request):
            if self._streaming:
                return (response.delta for response in self._llm.stream_chat(messages) if response.delta)
            return self._llm.chat(messages).message.content

    async def aget_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any):
        """`str`, or an async generator of text deltas when streaming."""
        messages, request = self._prepare(query_str, text_chunks, response_kwargs)
        with _scoped(request):
            if self._streaming:
                responses = await self._llm.astream_chat(messages)
                return (response.delta async for response in responses if response.delta)
            return (await self._llm.achat(messages)).message.content
