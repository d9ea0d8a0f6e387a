"""Render a conversation with tools through the chat template, keeping untrusted text out of template structure.

`layout.PromptBuilder` renders message contents as placeholders and tokenizes only the template's own text with
special tokens recognised. Tools bring more places where outside text lands in the template: tool descriptions and
schemas (`tool | tojson`), the arguments of earlier calls (`tool_call.arguments | tojson`, written by the model,
often from documents), and tool results (`<tool_response>...`, `{"output": ...}`; documents, web pages, anything).
`render` generalises the placeholder discipline to all of them:

- every string leaf of those structures (and every key that is not a fixed JSON-schema keyword) is replaced by a
  placeholder of private-use characters, which `tojson` leaves verbatim, and the template is rendered once;
- the template is rendered again with the real values, and each placeholder is matched to the text the template
  made of its value there (verbatim, JSON-escaped inside a JSON string, or trimmed); a template that transforms a
  value any other way is refused, never guessed at;
- the result is a list of pieces, `Piece(text, trusted)`: trusted pieces are the template's own text (tokenize with
  special tokens), the others came from outside (tokenize with `split_special_tokens=True`), and the pieces joined
  are exactly what the template renders.

Kept verbatim, since they are checked to be plain: roles (system, user, assistant, tool), tool names and call ids
(`[A-Za-z0-9_-]{1,64}`), JSON-schema keywords and `type` values, numbers, booleans and null. A message's content may
be a list of strings and marker objects (`layout.DOCUMENTS`); a marker comes back as itself, in place.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prophet_rag.errors import InvalidRequestError
from prophet_rag.layout import PromptBuilder, RequestLayout
from prophet_rag.structured.formats import ToolFormat
from prophet_rag.structured.tools import TOOL_NAME, Tool, ToolCall

ROLES = ("system", "user", "assistant", "tool")
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")
_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_NAME_MAPS = {"properties", "$defs", "definitions", "patternProperties", "dependentSchemas"}
_KEYWORDS = {
    "type", "properties", "required", "items", "prefixItems", "enum", "const", "anyOf", "oneOf", "allOf", "not",
    "$ref", "$defs", "definitions", "description", "title", "default", "examples", "format", "pattern",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength",
    "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties", "additionalProperties",
    "patternProperties", "dependentSchemas", "nullable", "strict", "name", "parameters", "function",
}


@dataclass(frozen=True)
class Piece:
    text: str
    trusted: bool
    """True for the chat template's own text (may hold special tokens); False for text from outside."""


class _Values:
    """Placeholders handed out for untrusted values, and the values (or markers) they stand for."""

    def __init__(self) -> None:
        self.values: list[object] = []

    def __call__(self, value: object) -> str:
        self.values.append(value)
        return f"{_OPEN}{len(self.values) - 1}{_CLOSE}"


def _plain(name: str, value: object) -> str:
    if not isinstance(value, str) or not TOOL_NAME.fullmatch(value):
        raise InvalidRequestError(f"{name} must be 1-64 letters, digits, '_' or '-', got {value!r}.")
    return value


def _schema(node: object, hold: _Values) -> object:
    """A JSON schema with its outside text held by placeholders."""
    if isinstance(node, str):
        return hold(node)
    if isinstance(node, list):
        return [_schema(v, hold) for v in node]
    if not isinstance(node, Mapping):
        return node
    out = {}
    for key, value in node.items():
        if key in _NAME_MAPS and isinstance(value, Mapping):
            out[key] = {hold(k): _schema(v, hold) for k, v in value.items()}
        elif key == "type" and (value in _JSON_TYPES or (isinstance(value, list) and set(value) <= _JSON_TYPES)):
            out[key] = value
        else:
            out[key if key in _KEYWORDS else hold(key)] = _schema(value, hold)
    return out


def _arguments(node: object, hold: _Values, real: bool) -> object:
    """Call arguments (model output): every key and string held."""
    if isinstance(node, str):
        return node if real else hold(node)
    if isinstance(node, list):
        return [_arguments(v, hold, real) for v in node]
    if isinstance(node, Mapping):
        return {(k if real else hold(k)): _arguments(v, hold, real) for k, v in node.items()}
    return node


def _content(content: object, hold: _Values, real: bool, where: str) -> str:
    parts = [content] if isinstance(content, str) else content
    if content is None:
        parts = []
    if not isinstance(parts, Sequence):
        raise InvalidRequestError(f"{where} content must be a string or a list of strings and markers.")
    if real:
        return "".join(p for p in parts if isinstance(p, str))
    return "".join(hold(p) for p in parts if not isinstance(p, str) or p)


def _call(call: object) -> ToolCall:
    if isinstance(call, ToolCall):
        return call
    if isinstance(call, Mapping):
        function = call.get("function") if isinstance(call.get("function"), Mapping) else call
        args = function.get("arguments", function.get("args", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise InvalidRequestError(f"tool call arguments must be a JSON object, got {args!r}.") from None
        if isinstance(args, Mapping):
            return ToolCall(function.get("name"), dict(args), call.get("id"))
    raise InvalidRequestError(f"a tool call must be a ToolCall or an OpenAI-format mapping, got {call!r}.")


def _messages(messages: Sequence[Mapping], hold: _Values, real: bool) -> list[dict]:
    out = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ROLES:
            raise InvalidRequestError(f"message {i} role must be one of {', '.join(ROLES)}, got {role!r}.")
        rendered = {"role": role, "content": _content(message.get("content"), hold, real, f"message {i}")}
        if role == "assistant" and message.get("tool_calls"):
            rendered["tool_calls"] = [
                {"id": _plain("a tool call id", c.id), "type": "function",
                 "function": {"name": _plain("a tool name", c.name), "arguments": _arguments(c.arguments, hold, real)}}
                for c in map(_call, message["tool_calls"])
            ]
        if role == "tool":
            for key, name in (("tool_call_id", "a tool call id"), ("name", "a tool name")):
                if message.get(key) is not None:
                    rendered[key] = _plain(name, message[key])
        out.append(rendered)
    return out


def fold_tools(messages: Sequence[Mapping], tools: Sequence[Tool], fmt: ToolFormat) -> list[dict]:
    """For a family whose template has no tools (`smollm2`): the same conversation in plain roles. The tool list
    goes into the system message (after the caller's own system text), earlier calls into the assistant's text in
    the family's call format, and each tool result into a user turn inside `<tool_response>`."""
    out: list[dict] = []
    for message in messages:
        role = message.get("role")
        parts = message.get("content")
        parts = [] if parts is None else [parts] if isinstance(parts, str) else list(parts)
        if role == "assistant" and message.get("tool_calls"):
            calls = [{"name": c.name, "arguments": c.arguments} for c in map(_call, message["tool_calls"])]
            said = any(not isinstance(p, str) or p.strip() for p in parts)
            parts = [*parts, ("\n" if said else "") + "<tool_call>" + json.dumps(calls, ensure_ascii=False)
                     + "</tool_call>"]
        elif role == "tool":
            role, parts = "user", ["<tool_response>\n", *parts, "\n</tool_response>"]
        out.append({"role": role, "content": parts})
    if tools:
        prompt = fmt.tool_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": [*out[0]["content"], "\n\n", prompt]}
        else:
            out.insert(0, {"role": "system", "content": [prompt]})
    return out


def render(tokenizer, messages: Sequence[Mapping], tools: Sequence[Tool] = (), fmt: ToolFormat | None = None,
           add_generation_prompt: bool = True) -> list[Piece | object]:
    """`messages` (and `tools`) rendered by the tokenizer's chat template as trusted and untrusted pieces (see the
    module docstring); markers in message contents come back in place. `fmt` (default: the tokenizer's family)
    decides whether the template renders the tools or `fold_tools` does."""
    if fmt is None:
        from prophet_rag.structured.formats import tool_format

        fmt = tool_format(tokenizer)
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role': ..., 'content': ...} mappings.")
    if not fmt.native_tools and (tools or uses_tools(messages)):  # a template without tools drops calls too
        messages, tools = fold_tools(messages, tools, fmt), ()
    hold = _Values()
    held_messages = _messages(messages, hold, real=False)
    held_tools = [{"type": "function", "function": {"name": t.name, "description": hold(t.description),
                                                    "parameters": _schema(t.parameters, hold)}}
                  for t in tools]
    real_messages = _messages(messages, _Values(), real=True)
    real_tools = [t.openai() for t in tools] or None
    kwargs = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
    held = tokenizer.apply_chat_template(held_messages, tools=held_tools or None, **kwargs)
    actual = tokenizer.apply_chat_template(real_messages, tools=real_tools, **kwargs)
    return _match(held, actual, hold.values)


def _candidates(value: object) -> list[str]:
    if not isinstance(value, str):
        return [""]  # a marker: nothing of it is in the real render
    out = []
    for text in (value, value.strip(), value.lstrip(), value.rstrip()):
        for encoded in (text, json.dumps(text, ensure_ascii=False)[1:-1]):
            if encoded not in out:
                out.append(encoded)
    return out


def _match(held: str, actual: str, values: list[object]) -> list[Piece | object]:
    """Pieces from the placeholder render `held`, checked against the real render `actual` (see module doc)."""
    template = _PLACEHOLDER.split(held)  # [text, index, text, index, ..., text]
    texts, indices = template[0::2], [int(i) for i in template[1::2]]
    # A template may leave a value out or render it twice (each copy is an untrusted piece); a marker places the
    # documents, so it must be rendered exactly once.
    for i, value in enumerate(values):
        if not isinstance(value, str) and indices.count(i) != 1:
            raise InvalidRequestError(
                f"the chat template renders the message holding {value!r} {indices.count(i)} times; it must place "
                "every message's content exactly once."
            )

    found = _solve(texts, [_candidates(values[i]) for i in indices], actual)
    if found is None:
        raise InvalidRequestError(
            "the chat template changes message, tool or argument text in a way that cannot be traced (only "
            "verbatim, JSON-escaped or trimmed values are accepted); use a template that places values as they are."
        )
    pieces: list[Piece | object] = [Piece(texts[0], True)] if texts[0] else []
    for k, encoded in enumerate(found):
        value = values[indices[k]]
        pieces.append(Piece(encoded, False) if isinstance(value, str) else value)
        if texts[k + 1]:
            pieces.append(Piece(texts[k + 1], True))
    return [p for p in pieces if not (isinstance(p, Piece) and not p.text)]


def _solve(texts: list[str], candidates: list[list[str]], actual: str) -> list[str] | None:
    """One rendering per value such that `texts[0] + r_0 + texts[1] + r_1 + ... == actual`, searched depth first
    (iteratively: a conversation may hold thousands of values)."""
    if not actual.startswith(texts[0]):
        return None
    chosen: list[tuple[int, int]] = []  # (position the value starts at, candidate index)
    k, pos, c = 0, len(texts[0]), 0
    while True:
        if k == len(candidates):
            if pos == len(actual):
                return [candidates[i][ci] for i, (_, ci) in enumerate(chosen)]
        else:
            while c < len(candidates[k]):
                end = pos + len(candidates[k][c])
                if actual.startswith(candidates[k][c], pos) and actual.startswith(texts[k + 1], end):
                    break
                c += 1
            if c < len(candidates[k]):
                chosen.append((pos, c))
                pos, k, c = pos + len(candidates[k][c]) + len(texts[k + 1]), k + 1, 0
                continue
        if not chosen:
            return None
        (pos, c), k = chosen.pop(), k - 1
        c += 1


def chat_layout(builder: PromptBuilder, messages: Sequence[Mapping], documents: Sequence[str] = (),
                tools: Sequence[Tool] = (), fmt: ToolFormat | None = None, transient: Sequence[bool] = (),
                transient_prefix: bool = False) -> RequestLayout:
    """`PromptBuilder.chat_layout` for a conversation with tools, earlier tool calls or tool results: `messages`
    rendered by `render` (each message's content may hold `DOCUMENTS` once, where `documents` go), its pieces
    tokenized by trust. As there, a prefix that holds a conversation's history is one-off."""
    pieces = render(builder.tokenizer, messages, tools, fmt)
    history = sum(1 for m in messages if isinstance(m, Mapping) and m.get("role") != "system") > 1
    return builder.pieces_layout(pieces, documents, transient, history or transient_prefix)


def uses_tools(messages: Sequence[Mapping]) -> bool:
    """Whether `messages` hold earlier tool calls or results of them (a tool message naming its call), which only
    `render` places in the template as the model's tool format has them."""
    return any(isinstance(m, Mapping) and (m.get("tool_calls") or m.get("tool_call_id")) for m in messages)
