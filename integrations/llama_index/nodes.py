"""The retrieved nodes' side of the LlamaIndex integration: `ProphetKVPostprocessor`, which registers each retrieved
node with the LLM, and `ProphetSynthesizer`, the strict mode (one call over exactly the retrieved nodes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llama_index.core import Settings
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.prompts.default_prompt_selectors import DEFAULT_TEXT_QA_PROMPT_SEL
from llama_index.core.response_synthesizers import BaseSynthesizer
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from prophet_rag import InvalidRequestError
from prophet_rag.integrations.common import ChatRequest, check_documents
from prophet_rag.integrations.llama_index.llm import ProphetLLM, scoped

SEPARATOR = "\n\n"
"""How LlamaIndex joins node texts into one context (what traces and callbacks see of a strict-mode call)."""


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
        with scoped(request):
            if self._streaming:
                return (response.delta for response in self._llm.stream_chat(messages) if response.delta)
            return self._llm.chat(messages).message.content

    async def aget_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any):
        """`str`, or an async generator of text deltas when streaming."""
        messages, request = self._prepare(query_str, text_chunks, response_kwargs)
        with scoped(request):
            if self._streaming:
                responses = await self._llm.astream_chat(messages)
                return (response.delta async for response in responses if response.delta)
            return (await self._llm.achat(messages)).message.content
