"""LangChain integration: an LLM over a `ProphetEngine`, and a runnable that keeps retrieved documents apart.

In the usual chain `{"context": retriever | format_docs, "question": ...} | prompt | llm` the LLM only ever sees one
formatted string, so the documents (and their cached KV) are lost. `ProphetRAG` takes the place of `prompt | llm`:

    chain = {"context": retriever, "question": RunnablePassthrough()} | ProphetRAG(llm=llm) | StrOutputParser()

It renders a readable prompt (what callbacks and traces see) and passes the question and the document texts beside
it as the `rag_query`/`rag_chunks` keyword arguments of `llm.invoke`/`stream`/`ainvoke`/`astream`, which
`ProphetLangChainLLM` answers over each document's cached KV. Callbacks, token streaming, `batch` and async work as
for any LLM run. Without those arguments `ProphetLangChainLLM` answers a plain prompt.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import GenerationChunk
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from pydantic import Field, PrivateAttr

from prophet_rag import GenerationConfig, InvalidRequestError, ProphetEngine, SelectionConfig
from prophet_rag.engine import AnswerStream
from prophet_rag.integrations.common import PLAIN_QUERY, iterate_in_thread, load_engine

DEFAULT_PROMPT = "Answer the question using the documents below.\n\n{context}\n\nQuestion: {question}"


class ProphetLangChainLLM(LLM):
    """A LangChain LLM over a `ProphetEngine`.

    `ProphetLangChainLLM(engine=engine)` wraps an engine; without one, `ProphetEngine.from_pretrained(model,
    device=device)` is loaded (`model=None`: the embedded SmolLM2-135M) with its store in `store_dir` (None: the
    default store). Called with `rag_query=str, rag_chunks=list[str]` (as `ProphetRAG` does) it answers the query
    over the chunks' cached KV with `method`/`ratio`; called with a prompt alone it answers that prompt with full
    prefill. `stop` strings end generation.
    """

    model: str | None = Field(default=None, description="Checkpoint to load when no engine is passed.")
    store_dir: str | None = Field(default=None, description="KV store directory when no engine is passed.")
    device: str = Field(default="cpu", description="Device to load the model on when no engine is passed.")
    method: str = Field(default="prophet", description="Selection method for RAG requests.")
    ratio: float = Field(default=0.2, description="Share of the context tokens recomputed.")
    max_new_tokens: int = Field(default=256, description="Most tokens generated per answer.")
    temperature: float = Field(default=0.0, description="Sampling temperature; 0 is greedy.")

    _engine: ProphetEngine = PrivateAttr()

    def __init__(self, engine: ProphetEngine | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if engine is None:
            engine = load_engine(self.model, self.device, self.store_dir)
        self._engine = engine
        # Bad settings fail here rather than at the first call.
        self._selection()
        self._generation(None)

    @property
    def engine(self) -> ProphetEngine:
        return self._engine

    @property
    def _llm_type(self) -> str:
        return "prophet-rag"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self._engine.model_name,
            "method": self.method,
            "ratio": self.ratio,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
        }

    def _selection(self) -> SelectionConfig:
        return replace(self._engine.selection, method=self.method, ratio=self.ratio)

    def _generation(self, stop: list[str] | None) -> GenerationConfig:
        stop = tuple(stop) if stop else self._engine.generation.stop
        return replace(self._engine.generation, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                       stop=stop)

    def _open(self, prompt: str, stop: list[str] | None, rag_query: str | None,
              rag_chunks: Sequence[str] | None) -> AnswerStream:
        """Start answering; bad input raises here, before any token is generated."""
        if (rag_query is None) != (rag_chunks is None):
            raise InvalidRequestError("pass rag_query and rag_chunks together (the question and the document texts).")
        if rag_query is not None:
            return self._engine.stream(list(rag_chunks), rag_query, selection=self._selection(),
                                       generation=self._generation(stop))
        # A plain prompt has no documents to reuse; full prefill also keeps one-off prompts out of the store.
        return self._engine.stream([prompt], PLAIN_QUERY, method="full", generation=self._generation(stop))

    def _call(self, prompt: str, stop: list[str] | None = None, run_manager: CallbackManagerForLLMRun | None = None,
              *, rag_query: str | None = None, rag_chunks: Sequence[str] | None = None) -> str:
        return "".join(self._open(prompt, stop, rag_query, rag_chunks))

    async def _acall(self, prompt: str, stop: list[str] | None = None,
                     run_manager: AsyncCallbackManagerForLLMRun | None = None, *, rag_query: str | None = None,
                     rag_chunks: Sequence[str] | None = None) -> str:
        return await asyncio.to_thread(self._call, prompt, stop, rag_query=rag_query, rag_chunks=rag_chunks)

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, *, rag_query: str | None = None,
                rag_chunks: Sequence[str] | None = None) -> Iterator[GenerationChunk]:
        for delta in self._open(prompt, stop, rag_query, rag_chunks):
            chunk = GenerationChunk(text=delta)
            if run_manager is not None:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None, *, rag_query: str | None = None,
                       rag_chunks: Sequence[str] | None = None) -> AsyncIterator[GenerationChunk]:
        async for delta in iterate_in_thread(self._open(prompt, stop, rag_query, rag_chunks)):
            chunk = GenerationChunk(text=delta)
            if run_manager is not None:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk


def _parse_input(value: Any) -> tuple[str, list[str]]:
    """`{"context" | "documents": list[Document | str], "question" | "input": str}` -> (question, document texts)."""
    if not isinstance(value, Mapping):
        raise InvalidRequestError(
            f"ProphetRAG takes a dict with 'context' and 'question', got {type(value).__name__}; put "
            "{'context': retriever, 'question': RunnablePassthrough()} in front of it."
        )
    question = value.get("question", value.get("input"))
    if not isinstance(question, str) or not question.strip():
        raise InvalidRequestError(
            f"ProphetRAG needs the user's question as a non-empty string under 'question' (or 'input'), got "
            f"{question!r}."
        )
    docs = value.get("context", value.get("documents"))
    if isinstance(docs, (str, Document)) or not isinstance(docs, Sequence):
        raise InvalidRequestError(
            f"ProphetRAG needs the retrieved documents as a list of Documents or strings under 'context' (or "
            f"'documents'), got {type(docs).__name__}; pass the retriever's output, not a joined string."
        )
    if not docs:
        raise InvalidRequestError("ProphetRAG got an empty 'context' list: the retriever found no documents.")
    texts = []
    for i, doc in enumerate(docs):
        text = doc.page_content if isinstance(doc, Document) else doc
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequestError(
                f"context document {i} is {type(doc).__name__} {doc!r:.60}; each must be a Document or a non-empty "
                "string."
            )
        texts.append(text)
    return question, texts


class ProphetRAG(RunnableSerializable[dict, str]):
    """Answers `{"context": list[Document | str], "question": str}` with each document as its own cached chunk.

    `"input"` is accepted for `"question"` (the `create_retrieval_chain` convention) and `"documents"` for
    `"context"`. `prompt` (with `{context}` and `{question}`; documents joined by `document_separator`) renders the
    prompt that callbacks and traces see; the engine lays out the request with its own template. Bad input raises
    `InvalidRequestError` (a `ValueError`) naming the problem.
    """

    llm: ProphetLangChainLLM
    prompt: str = DEFAULT_PROMPT
    document_separator: str = "\n\n"

    def _request(self, value: Any) -> tuple[str, dict[str, Any]]:
        """(rendered prompt, the `rag_*` keyword arguments for the LLM)."""
        question, texts = _parse_input(value)
        rendered = self.prompt.format(context=self.document_separator.join(texts), question=question)
        return rendered, {"rag_query": question, "rag_chunks": texts}

    def invoke(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> str:
        return self._call_with_config(self._invoke, input, config, **kwargs)

    def _invoke(self, value: dict, config: RunnableConfig) -> str:
        rendered, rag = self._request(value)
        return self.llm.invoke(rendered, config=config, **rag)

    async def ainvoke(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> str:
        return await self._acall_with_config(self._ainvoke, input, config, **kwargs)

    async def _ainvoke(self, value: dict, config: RunnableConfig) -> str:
        rendered, rag = self._request(value)
        return await self.llm.ainvoke(rendered, config=config, **rag)

    def stream(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[str]:
        yield from self._transform_stream_with_config(iter([input]), self._transform, config, **kwargs)

    def _transform(self, values: Iterator[dict], config: RunnableConfig) -> Iterator[str]:
        for value in values:
            rendered, rag = self._request(value)
            yield from self.llm.stream(rendered, config=config, **rag)

    async def astream(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[str]:
        async def values() -> AsyncIterator[dict]:
            yield input

        async for delta in self._atransform_stream_with_config(values(), self._atransform, config, **kwargs):
            yield delta

    async def _atransform(self, values: AsyncIterator[dict], config: RunnableConfig) -> AsyncIterator[str]:
        async for value in values:
            rendered, rag = self._request(value)
            async for delta in self.llm.astream(rendered, config=config, **rag):
                yield delta
