"""What every framework adapter shares: its settings, the engine configs built from them, and how a call runs.

`ProphetSettings` is a pydantic mixin: LlamaIndex's `ProphetLLM` and LangChain's `ChatProphet` and
`ProphetLangChainLLM` list it as a base, so the fields, their checks and the per-call options are declared once.
A call becomes a `ChatRequest`: chat messages for the model's own chat template and, when the call carries retrieved
documents, those documents and the place they go in one message (placement.py finds it in a framework's prompt).
A call with no documents is a plain chat: full prefill over the rendered template, nothing stored.
With `base_url`, the adapter answers through a running `prophet-rag serve` (`prophet_rag.client.ProphetClient`, which
has the engine's `stream_chat`) instead of loading a model: the same requests, documents as documents.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr

from prophet_rag import (
    GenerationConfig,
    InvalidRequestError,
    PrefixCacheConfig,
    ProphetEngine,
    SelectionConfig,
    StoreConfig,
)
from prophet_rag.client import ProphetClient
from prophet_rag.engine import AnswerStream
from prophet_rag.layout import check_text
from prophet_rag.results import Answer
from prophet_rag.structured import Tool, as_tools, tool_choice

OPTIONS = ("method", "ratio", "max_new_tokens", "temperature", "stop", "top_k", "top_p", "seed", "eos_token_ids")
"""What one call may override (`llm.invoke(..., max_new_tokens=8)`, `llm.complete(..., stop=["\\n"])`)."""

DECODING = ("top_k", "top_p", "seed", "eos_token_ids")
"""The `GenerationConfig` fields with no field of their own on an adapter: set them in `generate_kwargs`."""

_ALIASES = {"max_tokens": "max_new_tokens"}  # the name LangChain's and LlamaIndex's remote models use


@dataclass(frozen=True)
class ChatRequest:
    """One call for `engine.stream_chat`: messages (one content may hold `DOCUMENTS`), documents and one-off flags."""

    messages: tuple[dict[str, Any], ...]
    documents: tuple[str, ...] = ()
    transient: tuple[bool, ...] = ()
    """Per document: True for one-off text (a fragment that matches no retrieved node), computed but not stored."""
    transient_prefix: bool = False
    """True when per-call text (the question, an answer so far) comes before the documents: not stored."""


def load_engine(model: str | None, device: str, store: StoreConfig | None,
                prefix_cache_bytes: int = 0) -> ProphetEngine:
    """`ProphetEngine.from_pretrained(model)` (None: the embedded SmolLM2-135M) on `device` ("auto": CUDA when
    available), with `store` (None: the default store directory) and a conversation prefix cache of
    `prefix_cache_bytes` (0: none)."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return ProphetEngine.from_pretrained(model, device=device, store=store,
                                         prefix_cache=PrefixCacheConfig(max_bytes=prefix_cache_bytes))


def check_documents(texts: Sequence[object], name: str) -> list[str]:
    """`texts` if each is a document's text. An empty or whitespace-only document is refused on every path, as the
    engine refuses it, with the index and the fix: such a document says nothing, and answering without it would
    hide that the retriever returned nothing useful."""
    for i, text in enumerate(texts):
        try:
            check_text(f"{name} {i}", text)
        except InvalidRequestError as error:
            raise InvalidRequestError(
                f"{error} Drop empty documents before they reach the model: when you index them, or in a step "
                "after the retriever."
            ) from None
    return list(texts)


class Call:
    """One running answer: iterate for text deltas; then `answer`, `usage` and `report` describe it."""

    def __init__(self, stream: AnswerStream, generation: GenerationConfig, model_name: str) -> None:
        self._stream = stream
        self._max_new_tokens = generation.max_new_tokens
        self.model_name = model_name

    def __iter__(self) -> Iterator[str]:
        return iter(self._stream)

    @property
    def answer(self) -> Answer:
        if self._stream.answer is None:
            raise RuntimeError("the answer is known once its text has been iterated to the end")
        return self._stream.answer

    def text(self) -> str:
        """Run to the end; the whole text."""
        return "".join(self)

    @property
    def usage(self) -> dict[str, Any]:
        """Token counts in the frameworks' common shape: the whole prompt in, the generated tokens out, and the
        prompt tokens read from a cache (chunks from a tier, a conversation's earlier turns) as `cache_read`."""
        stats = self.answer.stats
        prompt = stats.prefix_tokens + stats.context_tokens + stats.suffix_tokens
        return {"input_tokens": prompt, "output_tokens": stats.new_tokens, "total_tokens": prompt + stats.new_tokens,
                "input_token_details": {"cache_read": stats.cached_tokens}}

    @property
    def finish_reason(self) -> str:
        return "length" if self.answer.stats.new_tokens >= self._max_new_tokens else "stop"

    def report(self) -> dict[str, Any]:
        """What a framework response carries beside the text: model, finish reason and the request's statistics
        (`RequestStats.to_dict()`: cache hits and misses, recomputed tokens, TTFT...) under "prophet_rag"."""
        return {"model_name": self.model_name, "finish_reason": self.finish_reason,
                "prophet_rag": self.answer.stats.to_dict()}


class ProphetSettings(BaseModel):
    """The settings every adapter shares. Pass `engine=` to share a loaded engine (and its store) between adapters;
    without one, `model` is loaded on `device` with its store in `store_dir`, or, with `base_url` (and `api_key`),
    calls go to that `prophet-rag serve` server. Every setting is checked when the
    adapter is built, and `OPTIONS` may be overridden per call."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    # A field rather than a private attribute, so that copies a framework makes (LangChain's configurable_fields,
    # model_copy) keep the loaded engine instead of loading the model again.
    engine: ProphetEngine | ProphetClient | None = Field(
        default=None, exclude=True, repr=False,
        description="The engine to answer with; None: load `model`, or reach the server at `base_url`.")
    base_url: str | None = Field(default=None, description="A running `prophet-rag serve`'s /v1 URL to answer "
                                                           "through, instead of loading a model here.")
    api_key: str | None = Field(default=None, exclude=True, repr=False,
                                description="The server's API key (with base_url); unused by a local engine.")
    timeout: float = Field(default=600.0, description="Seconds a call to the server may take (with base_url).")
    max_retries: int = Field(default=2, description="Retries of a call the server could not take: unreachable, "
                                                    "overloaded, a replica gone (with base_url).")
    model: str | None = Field(default=None, description="Checkpoint to load when no engine is passed; None: the "
                                                        "embedded SmolLM2-135M-Instruct.")
    store_dir: str | None = Field(default=None, description="KV store directory when no engine is passed; None: "
                                                            "the default store ($PROPHET_RAG_HOME/kv).")
    store: StoreConfig | None = Field(default=None, exclude=True, repr=False,
                                      description="The whole store configuration when no engine is passed (an "
                                                  "authentication key, a shared Redis tier, a size limit...); "
                                                  "instead of store_dir.")
    prefix_cache_bytes: int = Field(default=0, description="Bytes of finished calls' KV kept when no engine is "
                                    "passed, so the next turn of a conversation computes only its new tokens "
                                    "(`PrefixCacheConfig`); 0: off. With `engine` or `base_url`, set it there.")
    device: str = Field(default="auto", validation_alias=AliasChoices("device", "device_map"),
                        description="Where to load the model when no engine is passed: 'auto' (CUDA when "
                                    "available), 'cpu', 'cuda' or 'cuda:N'; also accepted as `device_map`.")
    method: str = Field(default=SelectionConfig.method, description="Selection method for calls with retrieved "
                                                                     "documents.")
    ratio: float = Field(default=0.2, description="Share of the context tokens recomputed.")
    max_new_tokens: int = Field(default=256, validation_alias=AliasChoices("max_new_tokens", "max_tokens"),
                                description="Most tokens generated per answer; also accepted as `max_tokens`.")
    temperature: float = Field(default=0.0, description="Sampling temperature; 0 is greedy.")
    stop: list[str] = Field(default_factory=list, description="Strings that end generation (not included).")
    generate_kwargs: dict[str, Any] = Field(default_factory=dict,
                                            description=f"Further decoding options: {', '.join(DECODING)}.")
    system_prompt: str | None = Field(default=None, description="System message put first in calls whose "
                                                                "messages bring none of their own.")

    @classmethod
    def accepted(cls, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """`kwargs`, once every name is known: a name the adapter has no field for is refused, rather than dropped
        as pydantic would."""
        names = set()
        for name, field in cls.model_fields.items():
            alias = field.validation_alias
            names.update([name, *(alias.choices if isinstance(alias, AliasChoices) else [])])
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InvalidRequestError(
                f"{cls.__name__} got unknown argument(s) {', '.join(unknown)}; its prophet-rag settings are "
                f"{', '.join(ProphetSettings.model_fields)}."
            )
        return dict(kwargs)

    _warned: set[str] = PrivateAttr(default_factory=set)

    def _setup(self) -> None:
        """Load the engine when none was passed, and check every setting now rather than at the first call."""
        if self.store is not None and self.store_dir is not None:
            raise InvalidRequestError("pass store_dir or store, not both: store=StoreConfig(directory=...) holds it.")
        if self.prefix_cache_bytes and (self.engine is not None or self.base_url is not None):
            raise InvalidRequestError(
                "prefix_cache_bytes sizes the engine the adapter loads; with engine= pass "
                "ProphetEngine(..., prefix_cache=PrefixCacheConfig(max_bytes=...)), with base_url start the server "
                "with --prefix-cache-bytes."
            )
        if self.base_url is not None:
            given = [name for name in ("engine", "model", "store_dir", "store") if getattr(self, name) is not None]
            if given:
                raise InvalidRequestError(f"base_url answers through a server, which holds the model and its store; "
                                          f"drop {', '.join(given)} (or drop base_url to run the model here).")
            self.engine = ProphetClient(self.base_url, self.api_key, timeout_s=self.timeout,
                                        max_retries=self.max_retries)
        elif self.engine is None:
            store = self.store or (StoreConfig(directory=self.store_dir) if self.store_dir is not None else None)
            self.engine = load_engine(self.model, self.device, store, self.prefix_cache_bytes)
        self.configs({})

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, UserWarning, stacklevel=4)

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def configs(self, options: Mapping[str, Any]) -> tuple[SelectionConfig, GenerationConfig]:
        """The engine configs of one call: the adapter's settings with `options` (see `OPTIONS`) on top."""
        options = {_ALIASES.get(key, key): value for key, value in options.items()}
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidRequestError(
                f"{type(self).__name__} got unknown option(s) {', '.join(unknown)}; the options of a call are "
                f"{', '.join(OPTIONS)}."
            )
        unknown = sorted(set(self.generate_kwargs) - set(DECODING))
        if unknown:
            raise InvalidRequestError(
                f"generate_kwargs holds {', '.join(unknown)}; it takes {', '.join(DECODING)} (the other decoding "
                "options are fields of their own)."
            )
        setting = {name: options.get(name, getattr(self, name, None)) for name in OPTIONS}
        stop = self.stop if setting["stop"] is None else setting["stop"]
        decoding = {**self.generate_kwargs, **{name: options[name] for name in DECODING if name in options}}
        # The configs check every value's type and range themselves, with messages that name the fix.
        selection = replace(self.engine.selection, method=setting["method"], ratio=setting["ratio"])
        generation = replace(self.engine.generation, max_new_tokens=setting["max_new_tokens"],
                             temperature=setting["temperature"], stop=stop, **decoding)
        return selection, generation

    def with_system_prompt(self, request: ChatRequest) -> ChatRequest:
        """`request` behind `system_prompt` when its messages open with no system message of their own."""
        if not self.system_prompt or (request.messages and request.messages[0].get("role") == "system"):
            return request
        return replace(request, messages=({"role": "system", "content": self.system_prompt}, *request.messages))

    def plain_request(self, messages: Sequence[Mapping[str, Any]], *, system_prompt: bool = True) -> ChatRequest:
        """A call with no retrieved documents: `messages`, behind `system_prompt` unless told otherwise."""
        request = ChatRequest(tuple(dict(message) for message in messages))
        return self.with_system_prompt(request) if system_prompt else request

    def start(self, request: ChatRequest, options: Mapping[str, Any], **structured: Any) -> Call:
        """Start answering `request`; bad input raises here, before any token is generated. `structured` holds the
        engine's `tools`, `tool_choice` and `grammar` (see `ProphetEngine.chat`)."""
        selection, generation = self.configs(options)
        stream = self.engine.stream_chat(list(request.messages), request.documents, transient=request.transient,
                                         transient_prefix=request.transient_prefix, selection=selection,
                                         generation=generation, **structured)
        return Call(stream, generation, self.model_name)

    def token_ids(self, text: str) -> list[int]:
        """`text`'s ids in the model's own tokenizer, as the engine tokenizes message contents."""
        if isinstance(self.engine, ProphetClient):
            return self.engine.token_ids(text)
        return self.engine.builder.encode(text).tolist()  # the tokenizer's own call would flip shared state

    def count_chat_tokens(self, messages: Sequence[Mapping[str, Any]]) -> int:
        """How many tokens `messages` take once rendered with the chat template, generation prompt included."""
        if isinstance(self.engine, ProphetClient):
            return self.engine.count_chat_tokens(messages)
        return self.engine.builder.chat_layout(list(messages)).total_tokens


def tool_request(engine: ProphetEngine, tools: Sequence[Mapping[str, Any]], choice: Any = None,
                 parallel: bool | None = None) -> tuple[tuple[Tool, ...], dict[str, Any]]:
    """The tools of a call (OpenAI-format mappings) and the engine's `tools` and `grammar` for them: calls of
    `choice` (see `structured.tool_choice`), one call per answer unless `parallel` (a small model allowed several
    tends to repeat its call until the budget ends)."""
    bound = as_tools(tools)
    fmt = engine.tool_format if parallel else replace(engine.tool_format, parallel=False)
    return bound, {"tools": bound, "grammar": fmt.grammar(bound, tool_choice(choice, bound))}


async def iterate_in_thread(deltas: Iterable[str]) -> AsyncIterator[str]:
    """Iterate blocking text deltas one step at a time in a worker thread, so the event loop stays free."""
    steps = iter(deltas)
    while (delta := await asyncio.to_thread(next, steps, None)) is not None:
        yield delta
