"""LlamaIndex messages and responses as the engine takes and gives them: a `ChatMessage` as an engine message dict,
an answer as a `ChatResponse` (its tool calls as `ToolCallBlock`s) or a `CompletionResponse`, and the text deltas of a
stream with tools."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)

from prophet_rag import InvalidRequestError
from prophet_rag.structured import ParsedOutput, Tool
from prophet_rag.structured.stream import TextDelta, ToolCallStream

_ROLES = {MessageRole.CHATBOT: "assistant", MessageRole.MODEL: "assistant", MessageRole.DEVELOPER: "system"}

def engine_message(message: ChatMessage, index: int) -> dict[str, Any]:
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


def chat_response(text: str, delta: str | None = None, parsed: ParsedOutput | None = None,
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


def completion_response(text: str, delta: str | None = None, **details: Any) -> CompletionResponse:
    return CompletionResponse(text=text, delta=delta, **details)


class TextOfCalls:
    """The text deltas of a stream with tools (a call's own text is not content; the last response carries the
    parsed calls)."""

    def __init__(self, calls: ToolCallStream) -> None:
        self._calls = calls

    def feed(self, delta: str) -> list[str]:
        return [event.text for event in self._calls.feed(delta) if isinstance(event, TextDelta)]

    def finish(self, tools: Sequence[Tool]) -> ParsedOutput:
        return self._calls.finish(tools)[1]
