"""LangChain messages as the engine takes them, and the engine's answers as LangChain messages: a `BaseMessage` as
an engine message dict (its text, an assistant's tool calls, a tool result's call id), a parsed answer as an
`AIMessage` with `tool_calls`, a streamed piece of one as a chunk with `tool_call_chunks`."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, ToolMessage
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.outputs import ChatGenerationChunk

from prophet_rag import InvalidRequestError
from prophet_rag.structured import ParsedOutput
from prophet_rag.structured.stream import TextDelta
from prophet_rag.structured.tools import TOOL_NAME

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "function"}


_CALL_BLOCKS = ("tool_use", "tool_call", "function_call")
"""Content blocks that repeat an assistant message's tool calls (Anthropic's `tool_use`, LangChain's v1 blocks); the
calls themselves are in `tool_calls`."""


def _text(content: str | list, index: int, calls: bool = False) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for block in content:
        if isinstance(block, str):
            texts.append(block)
        elif isinstance(block, Mapping) and block.get("type") == "text":
            texts.append(block.get("text", ""))
        elif calls and isinstance(block, Mapping) and block.get("type") in _CALL_BLOCKS:
            continue
        else:
            kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
            raise InvalidRequestError(f"message {index} holds a {kind!r} block; prophet-rag models read text only.")
    return "".join(texts)


def _call_id(call_id: object) -> str:
    """A call id as the chat templates may place it (`[A-Za-z0-9_-]{1,64}`): itself, else a stable stand-in, the
    same for the assistant's call and the tool result that answers it."""
    if isinstance(call_id, str) and TOOL_NAME.fullmatch(call_id):
        return call_id
    return "call_" + hashlib.sha256(str(call_id).encode()).hexdigest()[:24]


def engine_message(message: BaseMessage, index: int) -> dict[str, Any]:
    """A LangChain message as the engine takes it: an assistant's tool calls and a tool result's call id kept."""
    role = message.role if isinstance(message, ChatMessage) else _ROLES.get(message.type)
    if role is None:
        raise InvalidRequestError(f"message {index} is a {type(message).__name__}, which has no chat template role.")
    calls = message.tool_calls if isinstance(message, AIMessage) else []
    out: dict[str, Any] = {"role": role, "content": _text(message.content, index, calls=bool(calls))}
    if calls:
        out["tool_calls"] = [{"id": _call_id(c.get("id")), "type": "function",
                              "function": {"name": c["name"], "arguments": c.get("args") or {}}} for c in calls]
    if isinstance(message, ToolMessage):
        out["tool_call_id"] = _call_id(message.tool_call_id)
        if message.name and TOOL_NAME.fullmatch(message.name):
            out["name"] = message.name
    return out


def parsed_message(parsed: ParsedOutput, **fields: Any) -> AIMessage:
    """An `AIMessage` of a generation split into text, tool calls and what looked like a call but did not parse."""
    return AIMessage(
        content=parsed.content,
        tool_calls=[tool_call(name=c.name, args=c.arguments, id=c.id) for c in parsed.tool_calls],
        invalid_tool_calls=[invalid_tool_call(name=c.name, args=c.arguments, id=c.id, error=c.error)
                            for c in parsed.invalid_tool_calls],
        **fields,
    )


def tool_chunk(event: Any) -> ChatGenerationChunk:
    """A streamed piece of an answer with tools: text, or a piece of a tool call."""
    if isinstance(event, TextDelta):
        return ChatGenerationChunk(message=AIMessageChunk(content=event.text))
    piece = tool_call_chunk(name=event.name, args=event.arguments, id=event.id, index=event.index)
    return ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[piece]))
