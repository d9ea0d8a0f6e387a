"""The OpenAI chat-completions wire format: a request body in, an `EngineRequest`; an `Answer` out, JSON bodies.

A body is the OpenAI one plus `documents`, the retrieved documents: strings, or objects whose `text` is used (a
`title` or any other key is ignored). Each document is a cached chunk. They go where a content part
`{"type": "documents"}` stands in one message's content list, if a message has one, and the messages are otherwise
as sent. Without one, the last user message is laid out as `engine.answer` lays out its request: the engine's
instruction, the documents, then the message's text as the question (`PromptConfig.question_template`), so a plain
question with documents gets the same answer as `engine.answer(documents, question)`. Either way the question
follows the documents and is computed fresh (the suffix), and what comes before them is the prefix. A body with no
documents is a plain chat (full prefill), its messages as sent.

Decoding follows the body: `temperature` 0 is greedy (a body without one gets the engine's default, greedy),
`top_p`, `seed`, `stop`, `max_completion_tokens` (or the older `max_tokens`). `method` and `ratio` choose how much
context is recomputed, and `top_k` bounds sampling, as in-process calls do.

Structured answers are constrained decoding in the engine, so they always parse:
- `tools` (OpenAI format), `tool_choice` (`auto`, `none`, `required`, or `{"type": "function", "function":
  {"name": ...}}`) and `parallel_tool_calls`: the tools reach the prompt through the model's chat template, the
  calls come back as the message's `tool_calls` (streamed as `tool_calls` deltas) with `finish_reason`
  `"tool_calls"`; text that opened a call but did not parse is listed under `invalid_tool_calls` (LangChain's
  name). History may hold assistant `tool_calls` and `tool` messages.
- `response_format`: `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"schema": {...}}}`.
- prophet-rag's own fields: `grammar` (`{"kind": "json_schema" | "regex" | "lark" | "any_json", "source": ...}`,
  `structured.Grammar`) and `parse_tool_calls: false`, which returns a call's text as the model wrote it (what
  `ProphetClient` parses with the served model's `tool_format`, listed on /v1/models).
A document object may say `"transient": true` (one-off text: computed, never stored), and `transient_prefix: true`
marks the text before the documents the same way. Fields the engine cannot honour (logprobs, several choices,
penalties) are refused with a 400 that names them, never ignored.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from prophet_rag.config import GenerationConfig
from prophet_rag.errors import InvalidRequestError
from prophet_rag.layout import DOCUMENTS
from prophet_rag.results import Answer, RequestStats
from prophet_rag.serve.config import ServeConfig
from prophet_rag.serve.scheduler import EngineRequest
from prophet_rag.structured import Grammar, Tool, ToolFormat, as_tools, tool_choice
from prophet_rag.structured.stream import Event, TextDelta

SUPPORTED = ("model", "messages", "documents", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop",
             "seed", "n", "stream", "stream_options", "user", "method", "ratio", "top_k", "tools", "tool_choice",
             "parallel_tool_calls", "response_format", "grammar", "parse_tool_calls", "transient_prefix")
# Fields a client may send at their neutral value (some send them always); any other value is refused.
NEUTRAL = {"n": (1,), "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,)}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")


class APIError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ChatCall:
    """A parsed /v1/chat/completions body."""

    request: EngineRequest
    stream: bool
    include_usage: bool
    """`stream_options.include_usage`: a last chunk carries the usage."""
    tool_format: ToolFormat | None = None
    """Set when the answer's tool calls are parsed out of its text (a request with tools, unless
    `parse_tool_calls` is false)."""


def parse_chat_body(raw: bytes, defaults: GenerationConfig, config: ServeConfig,
                    rag_messages: Callable[[str], list[dict[str, Any]]],
                    tool_format: ToolFormat | None = None) -> ChatCall:
    """`raw` (a JSON body) as a `ChatCall`; any problem is an `APIError` 400 that names the field and the fix.
    `defaults` is the engine's generation config (temperature, EOS ids); limits come from `config`;
    `rag_messages` is the engine's `PromptBuilder.rag_messages`, whose user message lays out a question with
    documents that no content part places; `tool_format` is the engine's (None: a backend without tools)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(f"the request body is not valid JSON ({error}); send a JSON object.") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object with 'messages'.")
    for name in body:
        if name in NEUTRAL:
            if body[name] is not None and body[name] not in NEUTRAL[name]:
                raise bad_request(f"'{name}' = {body[name]!r} is not supported by prophet-rag; leave it out.", name,
                                  "unsupported_parameter")
        elif name not in SUPPORTED:
            raise bad_request(f"'{name}' is not supported by prophet-rag; its parameters are {', '.join(SUPPORTED)}.",
                              name, "unsupported_parameter")
    documents, transient = _documents(body.get("documents"), config)
    messages = _messages(body.get("messages"))
    chars = sum(map(len, documents)) + sum(len(p) for m in messages for p in _parts(m) if isinstance(p, str))
    if chars > config.max_chars:
        raise bad_request(f"the messages and documents hold {chars} characters, over this server's limit of "
                          f"{config.max_chars}; send fewer or shorter documents.", "documents", "request_too_large")
    _place_documents(messages, bool(documents), rag_messages)
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad_request("stream_options must be {'include_usage': true|false} and needs 'stream': true.",
                          "stream_options")
    include_usage = _typed(options or {}, "include_usage", bool, False)
    _typed(body, "model", str, None)
    _typed(body, "user", str, None)
    tools, grammar = _structure(body, tool_format)
    request = EngineRequest(tuple(messages), tuple(documents), _generation(body, defaults, config),
                            method=_typed(body, "method", str, None), ratio=_number(body, "ratio"),
                            transient=tuple(transient), transient_prefix=_typed(body, "transient_prefix", bool, False),
                            tools=tools, grammar=grammar)
    parse = tools and _typed(body, "parse_tool_calls", bool, True)
    return ChatCall(request, stream, include_usage, tool_format if parse else None)


def _typed(body: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_request(f"'{name}' must be a {kind.__name__}, got {value!r}.", name)
    return value


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise bad_request(f"'{name}' must be a number, got {value!r}.", name)
    return value


def _documents(value: Any, config: ServeConfig) -> tuple[list[str], list[bool]]:
    """The documents' texts, and per document whether it is one-off text (`"transient": true`)."""
    if value is None:
        return [], []
    if not isinstance(value, list):
        raise bad_request("'documents' must be a list of strings or of {'text': ...} objects.", "documents")
    if len(value) > config.max_documents:
        raise bad_request(f"{len(value)} documents, over this server's limit of {config.max_documents}; send the "
                          "most relevant ones.", "documents", "request_too_large")
    texts, transient = [], []
    for i, document in enumerate(value):
        text = document.get("text") if isinstance(document, dict) else document
        if not isinstance(text, str):
            raise bad_request(f"documents[{i}] must be a string or an object with a string 'text', got "
                              f"{document!r:.80}.", "documents")
        texts.append(text)
        transient.append(_typed(document, "transient", bool, False) if isinstance(document, dict) else False)
    return texts, transient


def _structure(body: Mapping[str, Any], fmt: ToolFormat | None) -> tuple[tuple[Tool, ...], Grammar | None]:
    """The request's tools and the grammar its answer must match: `grammar`, else `response_format`'s, else the
    calls `tool_choice` allows over the tools (the engine's own choice of grammar, see `ProphetEngine.chat`)."""
    parsed = {}
    for name, parse in (("tools", as_tools), ("grammar", _grammar), ("response_format", _response_format)):
        try:
            parsed[name] = parse(body.get(name) or ([] if name == "tools" else None))
        except InvalidRequestError as error:
            raise bad_request(str(error), name) from None
    tools, grammar, formatted = parsed["tools"], parsed["grammar"], parsed["response_format"]
    if tools and fmt is None:
        raise bad_request("this server's backend cannot call tools (`--backend hf`); serve the prophet-rag engine "
                          "for tools.", "tools")
    if grammar is not None and formatted is not None:
        raise bad_request("send 'grammar' or 'response_format', not both.", "grammar")
    choice = body.get("tool_choice")
    if choice is not None and not tools:
        raise bad_request("'tool_choice' was sent without 'tools'; send the tools too, or drop it.", "tool_choice")
    if formatted is not None and tools and choice != "none":
        raise bad_request("'response_format' with tools is not supported (an answer is either a call or a JSON "
                          "value); send tool_choice 'none' to answer in the format, or drop one of them.",
                          "response_format")
    grammar = grammar if grammar is not None else formatted
    if grammar is None and tools:
        parallel = _typed(body, "parallel_tool_calls", bool, True)
        try:
            grammar = replace(fmt, parallel=fmt.parallel and parallel).grammar(tools, tool_choice(choice, tools))
        except InvalidRequestError as error:
            raise bad_request(str(error), "tool_choice") from None
    return tools, grammar


def _grammar(value: Any) -> Grammar | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"kind", "source"} or "kind" not in value:
        raise InvalidRequestError("'grammar' must be {'kind': 'json_schema' | 'regex' | 'lark' | 'any_json', "
                                  "'source': text}.")
    return Grammar(value["kind"], value.get("source", ""))


def _response_format(value: Any) -> Grammar | None:
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return Grammar.any_json()
    spec = value.get("json_schema") if kind == "json_schema" else None
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise InvalidRequestError("'response_format' must be {'type': 'text'}, {'type': 'json_object'} or "
                                  "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}.")
    return Grammar.json_schema(spec["schema"])


def _parts(message: Mapping[str, Any]) -> list:
    content = message["content"]
    return [content] if isinstance(content, str) else content


def _content(i: int, content: Any) -> str | list:
    """A message's content as the engine takes it: a string, or a list of strings and `DOCUMENTS`."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise bad_request(f"messages[{i}].content must be a string or a non-empty list of content parts.",
                          "messages")
    parts: list = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            # Adjacent text parts are one text, joined by a newline (as vLLM joins them).
            if parts and isinstance(parts[-1], str):
                parts[-1] += "\n" + part["text"]
            else:
                parts.append(part["text"])
        elif kind == "documents":
            parts.append(DOCUMENTS)
        else:
            raise bad_request(f"messages[{i}].content holds {part!r:.80}; prophet-rag takes parts of type 'text' and "
                              "'documents' (where the documents go).", "messages")
    return parts


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise bad_request("'messages' must be a non-empty list of {'role', 'content'} objects.", "messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object with 'role' and 'content'.", "messages")
        extra = sorted(set(message) - set(MESSAGE_KEYS))
        if extra:
            raise bad_request(f"messages[{i}] has {', '.join(extra)}, which prophet-rag does not support; send "
                          f"{', '.join(MESSAGE_KEYS)}.", "messages")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role is {role!r}; prophet-rag takes {', '.join(ROLES)}.", "messages")
        calls = message.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list)):
            raise bad_request(f"messages[{i}].tool_calls must be a list, on an assistant message.", "messages")
        if role == "tool" and not any(m.get("tool_calls") for m in messages):
            raise bad_request(f"messages[{i}] is a tool result, but no assistant message before it has tool_calls; "
                              "send the assistant's call before its result.", "messages")
        # An assistant turn that only called tools has no content (OpenAI sends null).
        content = "" if calls and message.get("content") is None else _content(i, message.get("content"))
        out = {"role": ROLES[role], "content": content}
        for key in ("tool_calls", "tool_call_id", "name"):
            if message.get(key) is not None and (key != "name" or role == "tool"):
                out[key] = message[key]  # the engine's renderer checks calls, ids and names
        messages.append(out)
    return messages


def _place_documents(messages: list[dict[str, Any]], with_documents: bool,
                     rag_messages: Callable[[str], list[dict[str, Any]]]) -> None:
    """Lay out the last user message as `engine.answer` does when documents come with no place marked."""
    marked = sum(1 for m in messages for p in _parts(m) if p is DOCUMENTS)
    if with_documents and not marked:
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise bad_request("'documents' go with the last user message, but there is no user message; add one, "
                              "or mark their place with a {'type': 'documents'} content part.", "messages")
        last = messages[users[-1]]
        last["content"] = rag_messages("\n".join(_parts(last)))[-1]["content"]
    elif marked and not with_documents:
        raise bad_request("a {'type': 'documents'} content part marks where documents go, but 'documents' is "
                          "empty; send the documents or drop the part.", "messages")


def _generation(body: Mapping[str, Any], defaults: GenerationConfig, config: ServeConfig) -> GenerationConfig:
    limit = _typed(body, "max_completion_tokens", int, None)
    older = _typed(body, "max_tokens", int, None)
    if limit is not None and older is not None and limit != older:
        raise bad_request("'max_tokens' and 'max_completion_tokens' differ; send one of them.", "max_tokens")
    limit = limit if limit is not None else older
    stop = body.get("stop")
    options = {"max_new_tokens": config.max_tokens if limit is None else limit,
               "stop": () if stop is None else stop}
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            options[name] = _number(body, name)
    for name in ("seed", "top_k"):
        if body.get(name) is not None:
            options[name] = _typed(body, name, int, None)
    # GenerationConfig checks every value's range and type, with a message that names the fix (a 400).
    return replace(defaults, **options)


def tokenize(raw: bytes, builder) -> list[int]:
    """The token ids of a /v1/tokenize body: `{"prompt": text}` as the engine tokenizes a message's content, or
    `{"messages": [...]}` rendered with the chat template, generation prompt included."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(f"the request body is not valid JSON ({error}); send a JSON object.") from None
    if not isinstance(body, dict) or len(set(body) & {"prompt", "messages"}) != 1 or set(body) - {
            "prompt", "messages", "model"}:
        raise bad_request("a tokenize body is {'prompt': text} or {'messages': [...]} (and optionally 'model').")
    if "prompt" in body:
        if not isinstance(body["prompt"], str):
            raise bad_request("'prompt' must be a string.", "prompt")
        return builder.encode(body["prompt"]).tolist()
    return builder.chat_layout(_messages(body["messages"])).joined_ids().tolist()


# ---- responses ------------------------------------------------------------------------------------------------------

def completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def finish_reason(answer: Answer, generation: GenerationConfig, called: bool = False) -> str:
    if called:
        return "tool_calls"
    return "length" if answer.stats.new_tokens >= generation.max_new_tokens else "stop"


def message(answer: Answer, call: ChatCall) -> dict[str, Any]:
    """The assistant message of an answer: its text, or with tools its text outside the calls and the calls."""
    if call.tool_format is None:
        return {"role": "assistant", "content": answer.text}
    parsed = call.tool_format.parse(answer.text, call.request.tools)
    out: dict[str, Any] = {"role": "assistant", "content": parsed.content or None}
    if parsed.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                             for c in parsed.tool_calls]
    if parsed.invalid_tool_calls:
        out["invalid_tool_calls"] = [asdict(c) for c in parsed.invalid_tool_calls]
    return out


def stream_deltas(events: Sequence[Event]) -> list[dict[str, Any]]:
    """`ToolCallStream` events as chat-completion chunk deltas: text as `content`, calls as `tool_calls` pieces
    (the id, type and name on a call's first piece, as OpenAI streams them)."""
    deltas = []
    for item in events:
        if isinstance(item, TextDelta):
            deltas.append({"content": item.text})
            continue
        piece: dict[str, Any] = {"index": item.index, "function": {"arguments": item.arguments}}
        if item.id is not None:
            piece.update(id=item.id, type="function")
        if item.name is not None:
            piece["function"]["name"] = item.name
        deltas.append({"tool_calls": [piece]})
    return deltas


def usage(stats: RequestStats) -> dict[str, Any]:
    """OpenAI's usage; `cached_tokens` counts prompt tokens whose KV came from a cache (a tier, or a conversation's
    earlier turns in the prefix cache), not from compute."""
    prompt = stats.prefix_tokens + stats.context_tokens + stats.suffix_tokens
    return {"prompt_tokens": prompt, "completion_tokens": stats.new_tokens, "total_tokens": prompt + stats.new_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def completion(cid: str, model: str, answer: Answer, call: ChatCall) -> dict[str, Any]:
    """A whole `chat.completion`; `prophet_rag` carries the request's statistics (cache hits, recomputed tokens)."""
    said = message(answer, call)
    finish = finish_reason(answer, call.request.generation, bool(said.get("tool_calls")))
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": said, "logprobs": None, "finish_reason": finish}],
            "usage": usage(answer.stats), "prophet_rag": answer.stats.to_dict()}


def chunk(cid: str, created: int, model: str, delta: dict[str, Any] | None, finish: str | None = None,
          include_usage: bool = False, answer: Answer | None = None) -> str:
    """One `chat.completion.chunk` as an SSE event. `delta` None is the usage chunk (no choices); the chunk that
    finishes also carries the request's statistics under `prophet_rag`."""
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [] if delta is None else
                            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if include_usage:
        body["usage"] = usage(answer.stats) if delta is None else None
    if finish is not None and answer is not None:
        body["prophet_rag"] = answer.stats.to_dict()
    return event(body)


def event(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body, separators=(',', ':'))}\n\n"


DONE = event("[DONE]")
