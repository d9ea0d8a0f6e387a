"""`ProphetRAG`: the runnable that takes the place of `prompt | llm` and hands the model the retrieved documents
themselves, each a cached chunk; it owns the parsing of its input dict and the rendering of its prompt template with
the context's place marked."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Literal

from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.prompts import BasePromptTemplate, ChatPromptTemplate, PromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from pydantic import ConfigDict, field_validator

from prophet_rag import InvalidRequestError
from prophet_rag.config import DEFAULT_INSTRUCTION
from prophet_rag.integrations.common import check_documents
from prophet_rag.integrations.langchain.messages import engine_message
from prophet_rag.integrations.langchain.models import ChatProphet, ProphetLangChainLLM
from prophet_rag.integrations.placement import Marks

DEFAULT_PROMPT = ChatPromptTemplate.from_messages(
    [("human", DEFAULT_INSTRUCTION + "\n\n{context}\n\nQuestion: {question}")]
)
"""`ProphetRAG`'s default: the same request `engine.answer(documents, question)` makes."""


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
        if not isinstance(text, str):
            raise InvalidRequestError(f"context document {i} is {type(doc).__name__} {doc!r:.60}; each must be a "
                                      "Document or a string.")
        texts.append(text)
    return question, check_documents(texts, "context document")


_MODELS = (ChatProphet, ProphetLangChainLLM)


def _model_of(llm: Runnable) -> ChatProphet | ProphetLangChainLLM:
    """The prophet-rag model inside `llm`: itself, or the model a binding (`bind`, `with_config`, `with_retry`) or a
    configurable (`configurable_fields`) wraps."""
    inner = llm
    while not isinstance(inner, _MODELS):
        inner = getattr(inner, "bound", None) or getattr(inner, "default", None)
        if not isinstance(inner, Runnable):
            raise InvalidRequestError(
                f"ProphetRAG needs a ChatProphet or ProphetLangChainLLM as llm (bound or configured ones too), got "
                f"{type(llm).__name__}: only they can take documents as cached chunks."
            )
    return inner


class ProphetRAG(RunnableSerializable[dict, Any]):
    """Answers `{"context": list[Document | str], "question": str}` with each document as its own cached chunk.

    `"input"` is accepted for `"question"` (the `create_retrieval_chain` convention) and `"documents"` for
    `"context"`; other keys fill the prompt's other variables (a `MessagesPlaceholder` history, say). `prompt` is a
    prompt template (or a string) with `{context}`, usually `{question}` too; its messages are what the model
    answers, with the documents at `{context}`. `llm` is a `ChatProphet` or `ProphetLangChainLLM`, also bound or
    configured (`chat.bind(stop=["."])`, `chat.with_config(...)`, `configurable_fields`); per-call options bound to
    the runnable itself (`ProphetRAG(...).bind(max_new_tokens=4)`) reach the model.

    Output: with `output="message"` (the default) the model's own, an `AIMessage` from `ChatProphet` (chunks when
    streaming; its `response_metadata["prophet_rag"]` holds the request's statistics) or a string from
    `ProphetLangChainLLM`; with `output="text"` the answer's text, a string (string deltas when streaming), as
    `create_retrieval_chain`'s "answer" expects. Bad input raises `InvalidRequestError` naming the problem.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    llm: Runnable
    prompt: BasePromptTemplate = DEFAULT_PROMPT
    output: Literal["message", "text"] = "message"

    @field_validator("prompt", mode="before")
    @classmethod
    def _template(cls, prompt: Any) -> Any:
        return PromptTemplate.from_template(prompt) if isinstance(prompt, str) else prompt

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _model_of(self.llm)
        if "context" not in self.prompt.input_variables:
            raise InvalidRequestError(
                f"ProphetRAG's prompt must have a {{context}} variable, where the documents go; it has "
                f"{self.prompt.input_variables}."
            )

    def _request(self, value: Any) -> tuple[Any, dict[str, Any]]:
        """(the rendered prompt callbacks and traces see, the keyword that carries the request to the model)."""
        question, texts = _parse_input(value)
        args = {}
        for name in self.prompt.input_variables:
            if name in ("question", "input"):
                args[name] = question
            elif name != "context" and name not in value:
                raise InvalidRequestError(f"ProphetRAG's prompt needs {{{name}}}: pass it in the input dict.")
            else:
                args[name] = value.get(name)
        marks = Marks(args, "context")
        marked = self.prompt.invoke(marks.args).to_messages()
        request = marks.request([engine_message(m, i) for i, m in enumerate(marked)], texts)
        if request is None:
            raise InvalidRequestError("ProphetRAG's prompt must render {context} exactly once, where the documents go.")
        readable = self.prompt.invoke({**args, "context": "\n\n".join(texts)})
        chat = isinstance(_model_of(self.llm), BaseChatModel)
        return readable.to_messages() if chat else readable.to_string(), {"prophet_request": request}

    def _shaped(self, output: Any) -> Any:
        if self.output == "text" and isinstance(output, BaseMessage):
            return output.content
        return output

    def invoke(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(self._invoke, input, config, **kwargs)

    def _invoke(self, value: dict, config: RunnableConfig, **options: Any) -> Any:
        readable, request = self._request(value)
        return self._shaped(self.llm.invoke(readable, config=config, **request, **options))

    async def ainvoke(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._acall_with_config(self._ainvoke, input, config, **kwargs)

    async def _ainvoke(self, value: dict, config: RunnableConfig, **options: Any) -> Any:
        readable, request = self._request(value)
        return self._shaped(await self.llm.ainvoke(readable, config=config, **request, **options))

    def stream(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        yield from self._transform_stream_with_config(iter([input]), self._transform, config, **kwargs)

    def _transform(self, values: Iterator[dict], config: RunnableConfig, **options: Any) -> Iterator[Any]:
        for value in values:
            readable, request = self._request(value)
            for delta in self.llm.stream(readable, config=config, **request, **options):
                yield self._shaped(delta)

    async def astream(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        async def values() -> AsyncIterator[dict]:
            yield input

        async for delta in self._atransform_stream_with_config(values(), self._atransform, config, **kwargs):
            yield delta

    async def _atransform(self, values: AsyncIterator[dict], config: RunnableConfig,
                          **options: Any) -> AsyncIterator[Any]:
        async for value in values:
            readable, request = self._request(value)
            async for delta in self.llm.astream(readable, config=config, **request, **options):
                yield self._shaped(delta)
