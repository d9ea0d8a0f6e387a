"""The LangChain models: `ChatProphet` (a chat model, with tools and structured output) and `ProphetLangChainLLM` (a
text LLM), over one shared base that starts their calls: the request `ProphetRAG` passed, else the call's messages
with the documents its run retrieved found in them (see the package docstring)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.llms import BaseLLM
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.messages.ai import add_usage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    Generation,
    GenerationChunk,
    LLMResult,
)
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import Field

from prophet_rag import InvalidRequestError
from prophet_rag.integrations.common import Call, ChatRequest, ProphetSettings, check_documents, tool_request
from prophet_rag.integrations.langchain import runs
from prophet_rag.integrations.langchain.messages import engine_message, parsed_message, tool_chunk
from prophet_rag.integrations.placement import locate
from prophet_rag.structured import Grammar, Tool, as_tools
from prophet_rag.structured import tool_choice as parse_tool_choice
from prophet_rag.structured.grammar import bound_schema
from prophet_rag.structured.render import chat_layout as tool_chat_layout
from prophet_rag.structured.stream import ToolCallStream


def _response_grammar(response_format: Any, max_string_chars: int | None) -> Grammar:
    """The grammar of `response_format`: a JSON schema, OpenAI's `{"type": "json_schema", "json_schema":
    {"schema": ...}}`, or `{"type": "json_object"}` (any JSON object or array)."""
    if isinstance(response_format, Mapping) and response_format.get("type") == "json_object":
        return Grammar.any_json()
    if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
        response_format = (response_format.get("json_schema") or {}).get("schema")
    if not isinstance(response_format, Mapping):
        raise InvalidRequestError(
            f"response_format must be a JSON schema, {{'type': 'json_schema', 'json_schema': {{'schema': ...}}}} or "
            f"{{'type': 'json_object'}}, got {response_format!r:.80}."
        )
    return Grammar.json_schema(response_format, max_string_chars=max_string_chars)


class _LangChainModel(ProphetSettings):
    """What both LangChain models add to the shared settings; listed first among their bases, so these win."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**self.accepted(kwargs))
        self._setup()
        runs.install()

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "method": self.method, "ratio": self.ratio,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature}

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids from the model's own tokenizer (LangChain's default would fetch GPT-2's from the hub)."""
        return self.token_ids(text)

    def _call_start(self, messages: Sequence[Mapping[str, Any]], stop: list[str] | None, kwargs: dict[str, Any],
                    run_manager: CallbackManagerForLLMRun | None, structured: Mapping[str, Any] | None = None,
                    artifacts: Sequence[str] = ()) -> Call:
        """Start answering the call: the request `ProphetRAG` passed, else `messages` with the documents the run
        retrieved at their place (see `_recovered`); `structured`: the engine's tools and grammar."""
        request = kwargs.pop("prophet_request", None) or self._recovered(
            messages, runs.call_parent(run_manager), artifacts)
        # `stream` is LangChain's own flag for whether a call streams; every other keyword is a per-call option.
        options = {key: value for key, value in kwargs.items() if key != "stream"}
        if stop is not None:
            options["stop"] = stop
        return self.start(self.with_system_prompt(request), options, **(structured or {}))

    def _recovered(self, messages: Sequence[Mapping[str, Any]], parent_run_id: Any,
                   artifacts: Sequence[str] = ()) -> ChatRequest:
        """`messages` as a request, with the documents that the run around the call retrieved (and the documents
        tool results carry as their artifact, `artifacts`) taken out of the prompt as documents where they are found
        verbatim; a plain chat when there are none."""
        seen = runs.RUNS.seen(parent_run_id)
        documents = dict.fromkeys([*(seen.documents if seen is not None else ()), *artifacts])
        if not documents:
            return ChatRequest(tuple(dict(message) for message in messages))
        check_documents(list(documents), "retrieved document")
        request = locate(messages, documents, seen.values if seen is not None else ())
        if request is None:
            self._warn_once(
                "documents",
                f"{type(self).__name__} was called in a run that retrieved {len(documents)} document(s), but "
                "none of them is in its prompt verbatim, so the prompt is answered as plain text with no KV reuse. "
                "Put each document's page_content into the prompt unchanged (create_stuff_documents_chain does, and "
                "so does '\\n\\n'.join(doc.page_content for doc in docs)), or use ProphetRAG in place of "
                "`prompt | model`.",
            )
            return ChatRequest(tuple(dict(message) for message in messages))
        return request


class ChatProphet(_LangChainModel, BaseChatModel):
    """A LangChain chat model over a `ProphetEngine`.

    `ChatProphet(engine=engine)` wraps an engine; without one `model` is loaded (None: the embedded SmolLM2-135M)
    on `device`, its store in `store_dir` (or configured whole: `store=StoreConfig(...)`). Messages are rendered with
    the model's chat template; `stop`, `streaming`, async, callbacks and batch work as for any chat model. In a
    retrieval chain the documents the chain retrieved are found in the prompt and answered as cached chunks (see the
    module docstring). Per call, `invoke(..., max_new_tokens=8, temperature=0.7, method="full", ratio=0.5,
    stop=[...])` overrides the settings (`max_tokens` is accepted for `max_new_tokens`); other keywords are refused.
    Answers carry `usage_metadata` and, in `response_metadata`, the model name, finish reason and the request's
    statistics (`"prophet_rag"`).

    Tools: `bind_tools(tools, tool_choice=...)` renders the tools with the model's own tool format and parses its
    calls into `tool_calls` (`invalid_tool_calls` for what does not parse; `tool_call_chunks` when streaming). The
    answer is decoded under the grammar of `tool_choice`: with `"any"`/`"required"` or a tool's name every answer is
    a call of a bound tool whose arguments match its schema, if it ends within `max_new_tokens`.
    `with_structured_output(schema)` decodes under the schema's grammar (see its docstring).
    """

    streaming: bool = Field(default=False, description="Stream tokens, and their callbacks, from invoke too.")

    @property
    def _llm_type(self) -> str:
        return "prophet-rag-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider="prophet_rag",
            ls_model_name=model if isinstance(model, str) else self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_new_tokens", kwargs.get("max_tokens", self.max_new_tokens)),
        )
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence | None = None) -> int:
        """The tokens `messages` take once rendered with the chat template (with `tools` in the model's tool
        format), generation prompt included."""
        converted = [engine_message(m, i) for i, m in enumerate(messages)]
        if not tools:
            return self.count_chat_tokens(converted)
        bound = as_tools([convert_to_openai_tool(t) for t in tools])
        return tool_chat_layout(self.engine.builder, converted, (), bound, self.engine.tool_format).total_tokens

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, parallel_tool_calls: bool | None = None,
                   strict: bool | None = None, **kwargs: Any) -> Runnable:
        """Bind `tools` (LangChain tools, functions, Pydantic models or OpenAI-format tool dicts).

        `tool_choice`: `"auto"` (default: text or calls), `"none"`, `"any"`/`"required"`/`True` (a call), or a
        tool's name (a call of that tool). `parallel_tool_calls=True` allows several calls in one answer (small
        models tend to repeat a call until the budget ends when allowed, so one call is the default). Decoding
        always follows the tools' schemas, so `strict` changes nothing.
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        # A bad tool or tool_choice fails here rather than at the first call; two tools of one name fail there.
        parse_tool_choice(tool_choice, [Tool.from_openai(t) for t in formatted])
        bound: dict[str, Any] = {"tools": formatted}
        if tool_choice is not None:
            bound["tool_choice"] = tool_choice
        if parallel_tool_calls is not None:
            bound["parallel_tool_calls"] = parallel_tool_calls
        return super().bind(**bound, **kwargs)

    def with_structured_output(self, schema: Mapping[str, Any] | type, *,
                               method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
                               include_raw: bool = False, strict: bool | None = None,
                               max_string_chars: int | None = None, **kwargs: Any) -> Runnable:
        """Answers as `schema` (a Pydantic model class, a TypedDict, a JSON schema or an OpenAI tool dict): a
        Pydantic instance for a Pydantic model, else a dict.

        `method="json_schema"` (default) decodes the answer under the schema's grammar, so it is always valid JSON of
        the schema when it ends within `max_new_tokens`; `"json_mode"` does the same (the schema is known here, so it
        is enforced, not just JSON); `"function_calling"` binds the schema as a tool that must be called and parses
        its arguments. `max_string_chars` bounds the strings the schema leaves unbounded (a small model can repeat
        itself inside a string until the budget ends). `include_raw=True` returns `{"raw", "parsed",
        "parsing_error"}`. Decoding is always strict, so `strict` changes nothing.
        """
        if kwargs:
            raise InvalidRequestError(f"with_structured_output got unsupported argument(s) {', '.join(kwargs)}.")
        if method not in ("json_schema", "function_calling", "json_mode"):
            raise InvalidRequestError(
                f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}."
            )
        pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        traced = {"ls_structured_output_format": {"kwargs": {"method": method}, "schema": schema}}
        if max_string_chars is not None:
            traced["max_string_chars"] = max_string_chars
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, **traced)
            parser: Runnable = (PydanticToolsParser(tools=[schema], first_tool_only=True) if pydantic
                                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        else:
            llm = self.bind(response_format=convert_to_json_schema(schema), **traced)
            parser = PydanticOutputParser(pydantic_object=schema) if pydantic else JsonOutputParser()
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")

    def _structured(self, kwargs: dict[str, Any]) -> tuple[tuple[Tool, ...], dict[str, Any]]:
        """The bound tools, and the engine's `tools` and `grammar`, taken out of a call's keywords."""
        tools, choice = kwargs.pop("tools", None) or (), kwargs.pop("tool_choice", None)
        parallel = kwargs.pop("parallel_tool_calls", None)
        response_format, max_chars = kwargs.pop("response_format", None), kwargs.pop("max_string_chars", None)
        if response_format is not None:
            if tools:
                raise InvalidRequestError("pass tools or response_format, not both.")
            return (), {"grammar": _response_grammar(response_format, max_chars)}
        if not tools:
            return (), {} if choice is None else {"tool_choice": choice}
        tools = as_tools([convert_to_openai_tool(t) for t in tools])
        if max_chars is not None:
            tools = tuple(replace(t, parameters=bound_schema(t.parameters, max_chars, None)) for t in tools)
        return tool_request(self.engine, tools, choice, parallel)

    def _open(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any],
              run_manager: CallbackManagerForLLMRun | None) -> tuple[Call, tuple[Tool, ...]]:
        tools, structured = self._structured(kwargs)
        converted = [engine_message(m, i) for i, m in enumerate(messages)]
        artifacts = [doc.page_content for m in messages if isinstance(m, ToolMessage)
                     for doc in (m.artifact if isinstance(m.artifact, list) else []) if isinstance(doc, Document)]
        return self._call_start(converted, stop, kwargs, run_manager, structured, artifacts), tools

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        call, tools = self._open(messages, stop, kwargs, run_manager)
        text = call.text()
        fields = {"usage_metadata": call.usage, "response_metadata": call.report()}
        if tools:
            message = parsed_message(self.engine.tool_format.parse(text, tools), **fields)
            if message.tool_calls:
                message.response_metadata["finish_reason"] = "tool_calls"
        else:
            message = AIMessage(content=text, **fields)
        return ChatResult(generations=[ChatGeneration(message=message)],
                          llm_output={"model_name": self.model_name, "token_usage": call.usage})

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        # BaseChatModel reports each chunk to the callbacks; async streaming runs this in a worker thread.
        call, tools = self._open(messages, stop, kwargs, run_manager)
        calls = ToolCallStream(self.engine.tool_format) if tools else None
        for delta in call:
            if calls is None:
                yield ChatGenerationChunk(message=AIMessageChunk(content=delta))
            else:
                yield from map(tool_chunk, calls.feed(delta))
        report = call.report()
        if calls is not None:
            events, parsed = calls.finish(tools)
            yield from map(tool_chunk, events)
            if parsed.tool_calls:
                report["finish_reason"] = "tool_calls"
        yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=call.usage,
                                                         response_metadata=report, chunk_position="last"))


class ProphetLangChainLLM(_LangChainModel, BaseLLM):
    """A LangChain text LLM over a `ProphetEngine`: a prompt string is one user message (behind `system_prompt`),
    rendered with the model's chat template. Prefer `ChatProphet` for chat prompts: a text LLM receives a
    `ChatPromptTemplate` as one "System: ...\\nHuman: ..." string, as every LangChain text LLM does. Settings,
    per-call options and `ProphetRAG` work as for `ChatProphet`; each `Generation.generation_info` carries the
    finish reason and the request's statistics, and `llm_output["token_usage"]` the token counts."""

    @property
    def _llm_type(self) -> str:
        return "prophet-rag"

    def _open(self, prompt: str, stop: list[str] | None, kwargs: dict[str, Any],
              run_manager: CallbackManagerForLLMRun | None) -> Call:
        return self._call_start([{"role": "user", "content": prompt}], stop, kwargs, run_manager)

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        if "prophet_request" in kwargs and len(prompts) != 1:
            raise InvalidRequestError("prophet_request belongs to one prompt; pass one prompt with it.")
        generations, usage = [], None
        for prompt in prompts:
            call = self._open(prompt, stop, dict(kwargs), run_manager)
            generations.append([Generation(text=call.text(), generation_info=call.report())])
            usage = add_usage(usage, call.usage)
        return LLMResult(generations=generations, llm_output={"model_name": self.model_name,
                                                              "token_usage": dict(usage)})

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        # BaseLLM leaves the callbacks to `_stream`; async streaming runs this in a worker thread.
        call = self._open(prompt, stop, kwargs, run_manager)
        for delta in call:
            chunk = GenerationChunk(text=delta)
            if run_manager is not None:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield GenerationChunk(text="", generation_info=call.report())
