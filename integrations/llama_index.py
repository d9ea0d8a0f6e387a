"""LlamaIndex integration: `Settings.llm = ProphetLLM(...)`, with chunk-KV reuse for the retrieved nodes.

- `ProphetLLM` is a `CustomLLM`. Every built-in response synthesizer calls one of its template-level methods
  (`predict`, `stream`, `apredict`, `astream`) with the query (`query_str`) and the retrieved text (`context_str`, or
  `context_msg` in refine steps) still apart. Those methods put a scoped `RAGRequest(query, chunks)` in a ContextVar
  around the normal call path, so every event, callback and template rule upstream still runs; `complete` and
  `stream_complete` then answer the request over the chunks' cached KV. Any other call (chat engines, agents, a plain
  `complete`) carries no request and is answered as a plain prompt.
- `ProphetKVPostprocessor` stores each retrieved node's KV (computed on a miss) and registers the node's text, so
  the LLM can cut the synthesizer's joined `context_str` back into exactly those nodes.
- `ProphetSynthesizer` is the strict mode: the query engine hands it one text per node and it makes one call over
  exactly those chunks, with no repacking and no refine steps.

Guard-rail: leave `context_window` at the model's true maximum (the default). Compact mode repacks the context into
pieces of the window's size when the nodes look too long for it, and then the pieces no longer match any node.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

from llama_index.core import Settings
from llama_index.core.base.llms.types import (
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.prompts.default_prompts import DEFAULT_TEXT_QA_PROMPT
from llama_index.core.response_synthesizers import BaseSynthesizer
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
from llama_index.core.types import TokenAsyncGen, TokenGen

from prophet_rag import GenerationConfig, InvalidRequestError, ProphetEngine, SelectionConfig
from prophet_rag.engine import AnswerStream
from prophet_rag.integrations.common import PLAIN_QUERY, iterate_in_thread, load_engine

SEPARATOR = "\n\n"
"""How LlamaIndex's synthesizers join node texts into one `context_str`."""

@dataclass(frozen=True)
class RAGRequest:
    """The question and the retrieved chunks (in retrieval order) of one synthesizer call."""

    query: str
    chunks: tuple[str, ...]


_REQUEST: ContextVar[RAGRequest | None] = ContextVar("prophet_rag_request", default=None)


@contextmanager
def _scoped(request: RAGRequest | None) -> Iterator[None]:
    token = _REQUEST.set(request)
    try:
        yield
    finally:
        _REQUEST.reset(token)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class ChunkRegistry:
    """The stripped texts of retrieved nodes, kept as hashes, so `segment` can cut a joined context back into them.

    Thread-safe and bounded: past `max_entries` the oldest text is forgotten, which only loses its boundary (its KV
    stays in the engine's store, and the text is re-registered the next time it is retrieved).
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._pieces: OrderedDict[str, int] = OrderedDict()  # text hash -> how many SEPARATOR pieces it has
        self._max_entries = max_entries
        self._longest = 1
        self._lock = threading.Lock()

    def add(self, text: str) -> None:
        text = text.strip()
        key, pieces = _digest(text), len(text.split(SEPARATOR))
        with self._lock:
            self._pieces[key] = pieces
            self._pieces.move_to_end(key)
            if len(self._pieces) > self._max_entries:
                self._pieces.popitem(last=False)
            self._longest = max(self._longest, pieces)

    def __contains__(self, text: str) -> bool:
        with self._lock:
            return _digest(text.strip()) in self._pieces

    def __len__(self) -> int:
        return len(self._pieces)

    def segment(self, context: str) -> list[str]:
        """Cut `context` into chunks: split at SEPARATOR, then at each point take the longest run of pieces whose
        join is a registered text. A piece in no registered run is a chunk of its own; blank pieces are dropped."""
        pieces = context.split(SEPARATOR)
        chunks, i = [], 0
        while i < len(pieces):
            # Runs of two or more pieces, longest first; a single piece is its own chunk either way.
            for j in range(min(len(pieces), i + self._longest), i + 1, -1):
                run = SEPARATOR.join(pieces[i:j])
                if run in self:
                    chunks.append(run.strip())
                    i = j
                    break
            else:
                if pieces[i].strip():
                    chunks.append(pieces[i].strip())
                i += 1
        return chunks


def _text_responses(deltas: Iterable[str]) -> CompletionResponseGen:
    text = ""
    for delta in deltas:
        text += delta
        yield CompletionResponse(text=text, delta=delta)


class ProphetLLM(CustomLLM):
    """A LlamaIndex LLM over a `ProphetEngine`; retrieved nodes are answered over their cached KV.

    `ProphetLLM(engine=engine)` wraps an engine; without one, `ProphetEngine.from_pretrained(model, device=device)`
    is loaded (`model=None`: the embedded SmolLM2-135M) with its store in `store_dir` (None: the default store).
    `method`/`ratio` choose the recomputation (see `prophet_rag.SelectionConfig`); `max_new_tokens` is also
    `metadata.num_output`. Keyword arguments of `complete` beyond `formatted` are accepted, as the interface
    requires, and ignored.
    """

    model: str | None = Field(default=None, description="Checkpoint to load when no engine is passed.")
    store_dir: str | None = Field(default=None, description="KV store directory when no engine is passed.")
    device: str = Field(default="cpu", description="Device to load the model on when no engine is passed.")
    method: str = Field(default="prophet", description="Selection method for RAG requests.")
    ratio: float = Field(default=0.2, description="Share of the context tokens recomputed.")
    max_new_tokens: int = Field(default=256, description="Most tokens generated per answer.")
    temperature: float = Field(default=0.0, description="Sampling temperature; 0 is greedy.")
    context_window: int | None = Field(
        default=None, description="Context window reported to LlamaIndex; None: the model's true maximum."
    )

    _engine: ProphetEngine = PrivateAttr()
    _registry: ChunkRegistry = PrivateAttr()

    def __init__(self, engine: ProphetEngine | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if engine is None:
            engine = load_engine(self.model, self.device, self.store_dir)
        self._engine = engine
        self._registry = ChunkRegistry()
        # Bad settings fail here rather than at the first query.
        self._selection()
        self._generation()

    @classmethod
    def class_name(cls) -> str:
        return "ProphetLLM"

    @property
    def engine(self) -> ProphetEngine:
        return self._engine

    @property
    def registry(self) -> ChunkRegistry:
        """The node texts `ProphetKVPostprocessor` registered; the LLM segments `context_str` by them."""
        return self._registry

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window or self._engine.context_window,
            num_output=self.max_new_tokens,
            model_name=self._engine.model_name,
        )

    def _selection(self) -> SelectionConfig:
        return replace(self._engine.selection, method=self.method, ratio=self.ratio)

    def _generation(self) -> GenerationConfig:
        return replace(self._engine.generation, max_new_tokens=self.max_new_tokens, temperature=self.temperature)

    # ---- template level: find the request --------------------------------------------------------------------

    def _request(self, prompt: BasePromptTemplate, prompt_args: dict[str, Any]) -> RAGRequest | None:
        """The query and chunks a synthesizer's template call carries, or None when it carries no retrieved text."""
        args = {**prompt.kwargs, **prompt_args}
        query, context = args.get("query_str"), args.get("context_str", args.get("context_msg"))
        if not isinstance(query, str) or not query.strip() or context is None:
            return None
        if not isinstance(context, str):  # simple_summarize passes the list of node texts
            context = SEPARATOR.join(map(str, context))
        chunks = self._registry.segment(context)
        if args.get("existing_answer"):  # a refine step: the answer so far is context for this step
            chunks.insert(0, f"Existing answer: {args['existing_answer']}")
        return RAGRequest(query.strip(), tuple(chunks)) if chunks else None

    def predict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        with _scoped(self._request(prompt, prompt_args)):
            return super().predict(prompt, **prompt_args)

    def stream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenGen:
        # stream_complete reads the request eagerly, so it is set for as long as the generator is built.
        with _scoped(self._request(prompt, prompt_args)):
            return super().stream(prompt, **prompt_args)

    async def apredict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        with _scoped(self._request(prompt, prompt_args)):
            return await super().apredict(prompt, **prompt_args)

    async def astream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenAsyncGen:
        with _scoped(self._request(prompt, prompt_args)):
            return await super().astream(prompt, **prompt_args)

    # ---- string level: answer ---------------------------------------------------------------------------------

    def _open(self, prompt: str, formatted: bool) -> AnswerStream:
        """Start answering the current request, or `prompt` itself when there is none. Bad input raises here."""
        request = _REQUEST.get()
        if request is not None:
            return self._engine.stream(list(request.chunks), request.query, selection=self._selection(),
                                       generation=self._generation())
        prompt = prompt if formatted else self.completion_to_prompt(prompt)
        # A plain prompt has no retrieved documents to reuse; full prefill also keeps one-off prompts out of the store.
        return self._engine.stream([prompt], PLAIN_QUERY, method="full", generation=self._generation())

    def _complete(self, prompt: str, formatted: bool) -> CompletionResponse:
        stream = self._open(prompt, formatted)
        text = "".join(stream)
        return CompletionResponse(text=text, additional_kwargs={"stats": stream.answer.stats.to_dict()})

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """The answer, with the request's `RequestStats` as a dict in `additional_kwargs["stats"]`."""
        return self._complete(prompt, formatted)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return _text_responses(self._open(prompt, formatted))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        # The worker thread inherits the request's context. Awaiting the decorated `complete` instead (CustomLLM's
        # default) would block the event loop and report the completion twice.
        return await asyncio.to_thread(self._complete, prompt, formatted)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        stream = self._open(prompt, formatted)

        async def responses() -> CompletionResponseAsyncGen:
            text = ""
            async for delta in iterate_in_thread(stream):
                text += delta
                yield CompletionResponse(text=text, delta=delta)

        return responses()


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
    """Stores the KV of each retrieved node (computed on a miss) and registers its text with the LLM.

    `ProphetKVPostprocessor(llm=None)` uses `Settings.llm`, which must then be a `ProphetLLM`. The nodes are
    returned unchanged, so `source_nodes` and citations stay intact. A node's text is
    `node.get_content(MetadataMode.LLM)`, exactly what the synthesizers put in `context_str`.
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
        # Stripped, as the synthesizers put them in `context_str`: the same text must give the same token ids.
        texts = [n.node.get_content(metadata_mode=MetadataMode.LLM).strip() for n in nodes]
        texts = [text for text in texts if text]
        if texts:
            self._llm.engine.ingest(texts)
        for text in texts:
            self._llm.registry.add(text)
        return nodes


class ProphetSynthesizer(BaseSynthesizer):
    """Strict mode: one call over exactly the retrieved nodes, one chunk per node, in retrieval order.

    Use it as `index.as_query_engine(response_synthesizer=ProphetSynthesizer(llm=...))`; `streaming=True` makes
    `get_response` return a generator of text deltas (an async one from `aget_response`). `text_qa_template` only
    renders the prompt that callbacks and traces see; the engine lays out the request with its own template.
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
        self._text_qa_template = text_qa_template or DEFAULT_TEXT_QA_PROMPT

    def _get_prompts(self) -> dict[str, BasePromptTemplate]:
        return {"text_qa_template": self._text_qa_template}

    def _update_prompts(self, prompts: dict[str, BasePromptTemplate]) -> None:
        if "text_qa_template" in prompts:
            self._text_qa_template = prompts["text_qa_template"]

    def _prepare(self, query_str: str, text_chunks: Sequence[str]) -> tuple[str, RAGRequest]:
        chunks = tuple(chunk.strip() for chunk in text_chunks)
        rendered = self._text_qa_template.format(context_str=SEPARATOR.join(chunks), query_str=query_str)
        return rendered, RAGRequest(query_str, chunks)

    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any):
        """`str`, or a generator of text deltas when streaming. `response_kwargs` are accepted and ignored."""
        rendered, request = self._prepare(query_str, text_chunks)
        with _scoped(request):
            if self._streaming:
                return (response.delta or "" for response in self._llm.stream_complete(rendered, formatted=True))
            return self._llm.complete(rendered, formatted=True).text

    async def aget_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any):
        """`str`, or an async generator of text deltas when streaming."""
        rendered, request = self._prepare(query_str, text_chunks)
        with _scoped(request):
            if self._streaming:
                responses = await self._llm.astream_complete(rendered, formatted=True)
                return (response.delta or "" async for response in responses)
            return (await self._llm.acomplete(rendered, formatted=True)).text
