"""`ProphetLLM`: the LlamaIndex chat LLM over a `ProphetEngine` (see the package docstring for how it finds and answers
retrieved nodes).

It owns the request a template-level call makes (a ContextVar set around the normal call path, `scoped`), its
answer as LlamaIndex responses, plain or streamed, sync or async, and function calling; `SynthesisError` surfaces
request errors that LlamaIndex's refine synthesizers would turn into "Empty Response".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
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
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.tools import ToolSelection
from llama_index.core.types import TokenAsyncGen, TokenGen

from prophet_rag import InvalidRequestError, ProphetRAGError
from prophet_rag.integrations.common import (
    Call,
    ChatRequest,
    ProphetSettings,
    iterate_in_thread,
    tool_request,
)
from prophet_rag.integrations.llama_index import stats
from prophet_rag.integrations.llama_index.messages import (
    TextOfCalls,
    chat_response,
    completion_response,
    engine_message,
)
from prophet_rag.integrations.placement import Marks
from prophet_rag.integrations.registry import ChunkRegistry
from prophet_rag.layout import DOCUMENTS
from prophet_rag.structured import Tool
from prophet_rag.structured.stream import ToolCallStream

CONTEXT_KEYS = ("context_str", "context_msg")
"""The template variables LlamaIndex's synthesizers put the retrieved text in (context_msg: refine steps)."""

_REQUEST: ContextVar[ChatRequest | None] = ContextVar("prophet_rag_request", default=None)


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
def scoped(request: ChatRequest | None) -> Iterator[None]:
    """The request the ProphetLLM calls inside the block answer (None: each answers its own messages)."""
    token = _REQUEST.set(request)
    try:
        yield
    finally:
        _REQUEST.reset(token)


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
        stats.install(ProphetLLM)
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
        request = marks.request([engine_message(m, i) for i, m in enumerate(messages)], documents, transient)
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
        with _surfaced(), scoped(self.template_request(prompt, prompt_args)):
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
        converted = [engine_message(m, i) for i, m in enumerate(messages)]
        request = _REQUEST.get() or self._tool_results(converted, system_prompt) or self.plain_request(
            converted, system_prompt=system_prompt)
        call = self.start(request, options, **structured)
        return call, stats.new_entry(), tools

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

    def _calls(self, tools: Sequence[Tool]) -> TextOfCalls | None:
        return TextOfCalls(ToolCallStream(self.engine.tool_format)) if tools else None

    def _last(self, call: Call, entry: dict[str, Any], make: Callable[..., Any], calls: TextOfCalls | None,
              tools: Sequence[Tool], text: str) -> Any:
        """A stream's last response: empty delta, the statistics and, with tools, the parsed calls."""
        if calls is None:
            return make(text, "", **self._details(call, entry))
        parsed = calls.finish(tools)
        return make(text, "", parsed=parsed, **self._details(call, entry))

    def _chat(self, messages: Sequence[ChatMessage], options: Mapping[str, Any]) -> ChatResponse:
        call, entry, tools = self._start(messages, options)
        return self._answer(call, entry, chat_response, tools)

    def _complete(self, prompt: str, formatted: bool, options: Mapping[str, Any]) -> CompletionResponse:
        # `formatted=True` means the prompt has been through the LLM's own prompt rules, system prompt included.
        call, entry, _ = self._start([ChatMessage(role=MessageRole.USER, content=prompt)], options, not formatted)
        return self._answer(call, entry, completion_response)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        call, entry, tools = self._start(messages, kwargs)
        return self._responses(call, entry, chat_response, tools)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        # The worker thread copies the request's context. Awaiting the decorated `chat` instead (CustomLLM's
        # default) would block the event loop and report the call twice.
        return await asyncio.to_thread(self._chat, messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        call, entry, tools = self._start(messages, kwargs)
        return self._aresponses(call, entry, chat_response, tools)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """`prompt` as one user message (behind `system_prompt` unless `formatted`), rendered by the chat template."""
        return self._complete(prompt, formatted, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        call, entry, _ = self._start([ChatMessage(role=MessageRole.USER, content=prompt)], kwargs, not formatted)
        return self._responses(call, entry, completion_response)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self._complete, prompt, formatted, kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        call, entry, _ = self._start([ChatMessage(role=MessageRole.USER, content=prompt)], kwargs, not formatted)
        return self._aresponses(call, entry, completion_response)
