"""Tool-call formats per model family: how tools reach the prompt, the grammar of a call, and parsing calls back.

- `hermes` (Qwen2.5, Qwen3, Hermes): template holds `<tool_call>`; the template renders the tools; each call is
  `<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>`.
- `llama3` (Llama 3.1+, JSON tool calls): template holds `<|start_header_id|>` and `Environment: ipython` or
  `<|python_tag|>`; the template renders the tools; a call is `{"name": N, "parameters": {...}}`, one per answer,
  possibly after `<|python_tag|>`.
- `mistral`: template holds `[AVAILABLE_TOOLS]` or `[TOOL_CALLS]`; the template renders the tools; the calls are
  `[TOOL_CALLS] [{"name": N, "arguments": {...}}, ...]`.
- `smollm2` (any template without tools): a system message we write lists the tools; the calls are
  `<tool_call>[{"name": N, "arguments": {...}}, ...]</tool_call>`.

SmolLM2-135M-Instruct's template has no tool format (it ignores `tools=`). `smollm2` follows the tool format
Ollama's `smollm2` template uses for the SmolLM2 family (tools listed in `<tools></tools>` in the system prompt,
calls as a JSON list in `<tool_call>`, results in `<tool_response>` user turns), and is the fallback for every
template that does not render tools.

Grammars are llguidance Lark grammars with the arguments' JSON schemas inline, so with `tool_choice="required"` or a
named tool every answer is a valid call of a listed tool with arguments that match its schema; `auto` leaves text free
until a call opens, then constrains it.
Parsing takes the text decoded with special tokens kept (`[TOOL_CALLS]` and `<|python_tag|>` are special tokens).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from prophet_rag.structured.grammar import Grammar, embedded_json
from prophet_rag.structured.tools import InvalidToolCall, ParsedOutput, Tool, ToolCall, new_call_id

FAMILIES = ("hermes", "llama3", "mistral", "smollm2")
_LLAMA_CALL = re.compile(r'\{\s*"name"\s*:')


def detect_family(tokenizer) -> str:
    """The tool-call family of a tokenizer, read from its chat template (see the module docstring)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, Mapping):  # named templates: the tool-use one, else the default
        template = template.get("tool_use") or template.get("default") or ""
    if "[TOOL_CALLS]" in template or "[AVAILABLE_TOOLS]" in template:
        return "mistral"
    if "<tool_call>" in template and "tools" in template:
        return "hermes"
    if "<|start_header_id|>" in template and ("Environment: ipython" in template or "<|python_tag|>" in template):
        return "llama3"
    return "smollm2"


def _call_object(tool: Tool, args_key: str, ref: str) -> dict:
    return {"type": "object", "properties": {"name": {"const": tool.name}, args_key: {"$ref": ref}},
            "required": ["name", args_key]}


def _hoist(schema: Mapping, name: str, defs: dict) -> str:
    """Put `schema` under `$defs/<name>` of an enclosing schema, with its own `$defs` beside it (renamed
    `<name>__X`) and its references rewritten, so it can sit anywhere in the enclosing schema; returns its ref."""
    prefix = f"#/$defs/{name}"

    def rewrite(node):
        if isinstance(node, Mapping):
            out = {}
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    if value == "#":
                        value = prefix
                    else:
                        value = re.sub(r"^#/(\$defs|definitions)/", f"#/$defs/{name}__", value)
                out[key] = rewrite(value) if key != "$ref" else value
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    body = rewrite({k: v for k, v in schema.items() if k not in ("$defs", "definitions")})
    for section in ("$defs", "definitions"):
        for key, sub in (schema.get(section) or {}).items():
            defs[f"{name}__{key}"] = rewrite(sub)
    defs[name] = body
    return prefix


def calls_list_schema(tools: Sequence[Tool], args_key: str = "arguments", max_items: int | None = None) -> dict:
    """JSON schema of a list of calls `[{"name": N, args_key: {...}}, ...]` of `tools` (at least one)."""
    defs: dict = {}
    items = [_call_object(t, args_key, _hoist(t.parameters, f"tool_{i}", defs)) for i, t in enumerate(tools)]
    schema = {"type": "array", "items": {"anyOf": items}, "minItems": 1, "$defs": defs}
    if max_items is not None:
        schema["maxItems"] = max_items
    return schema


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a Lark string literal: JSON's escapes are Lark's


def _token(text: str, token_id: int | None) -> str:
    """`text` in a Lark grammar: the added token's id when the tokenizer has one, else the literal text."""
    return f"<[{token_id}]>" if token_id is not None else _literal(text)


_TEXT = "TEXT: /(.|\\n)*/"


@dataclass(frozen=True)
class ToolFormat:
    """One family's tool-call format (see the module docstring)."""

    family: str
    native_tools: bool
    """The chat template renders `tools=` itself; else `tool_system_prompt` goes into the system message."""
    start: str
    """The text that opens the calls (the grammar's trigger, the parser's marker)."""
    args_key: str = "arguments"
    parallel: bool = True
    start_id: int | None = None
    """The id of `start` when the tokenizer has it as one added token (Qwen2.5's `<tool_call>`, Mistral's
    `[TOOL_CALLS]`): the model writes that token, and the grammar asks for it (an added token is never text)."""
    end: str = ""
    """The text that closes a block of calls (`</tool_call>`), if any."""
    end_id: int | None = None

    # ---- grammar -----------------------------------------------------------------------------------------------

    def grammar(self, tools: Sequence[Tool], choice: str) -> Grammar:
        """The Lark grammar for `choice` (`"auto"`, `"none"`, `"required"` or a tool name) over `tools`:
        `required` and a named tool allow nothing but calls; `auto` allows free text that, once the call marker
        appears, must go on as a valid call; `none` allows text without the marker."""
        if choice == "none" or not tools:
            if self.start_id is not None:  # an added token is never text
                return Grammar.lark(f"start: TEXT\n{_TEXT}\n")
            return Grammar.lark(f"start: FREE\n{self._free()}\n")
        chosen = [t for t in tools if t.name == choice] or list(tools)
        single = choice not in ("auto", "required") or not self.parallel
        close = "" if not self.end else f" {_token(self.end, self.end_id)}"
        if self.family in ("hermes", "llama3"):
            rules = "".join(self._object_rule(i, t, close) for i, t in enumerate(chosen))
            body = "body: " + " | ".join(f"c{i}" for i in range(len(chosen))) + "\n" + rules
        else:
            schema = calls_list_schema(chosen, self.args_key, 1 if single else None)
            space = ' " "' if self.family == "mistral" else ""
            body = f"body:{space} list{close}\nlist: %json {embedded_json(schema)}\n"
        marker = _token(self.start if self.family != "llama3" else '{"name": "', self.start_id)
        # Parallel calls are one block per call (hermes) or one block holding a list (smollm2, mistral): a second
        # list block is never right, and a small model repeats its block until the budget ends if allowed to.
        blocks = not single and self.family == "hermes"
        if choice != "auto":
            more = f" ({_literal(chr(10))} {marker} body)*" if blocks else ""
            return Grammar.lark(f"start: {marker} body{more}\n{body}")
        repeat = "*" if blocks else "?"
        if self.start_id is not None:  # an added token is never text: TEXT cannot open a second block
            return Grammar.lark(f"start: (TEXT {marker} body){repeat} TEXT\n{body}{_TEXT}\n")
        tail = "TEXT" if blocks else "FREE"  # after the only block, text that cannot open another one
        return Grammar.lark(f"start: (head body){repeat} {tail}\nhead[lazy]: TEXT {marker}\n{body}{_TEXT}\n"
                            f"{self._free()}\n")

    def _free(self) -> str:
        """The Lark terminal FREE: any text without the call marker."""
        return f"FREE: /(?s:.*)/ & ~/(?s:.*){re.escape(self.start)}(?s:.*)/"

    def _object_rule(self, i: int, tool: Tool, close: str) -> str:
        """The Lark rule of a call of `tool` after the marker, and its arguments' schema."""
        if self.family == "hermes":
            begin, end = '\n{"name": "' + tool.name + '", "arguments": ', "}\n"
        else:
            begin, end = tool.name + '", "parameters": ', "}"
        return (f"c{i}: {_literal(begin)} a{i} {_literal(end)}{close}\n"
                f"a{i}: %json {embedded_json(tool.parameters)}\n")

    # ---- the prompt (families whose template has no tools) -----------------------------------------------------

    def tool_system_prompt(self, tools: Sequence[Tool]) -> str:
        """The system text that lists `tools` and the call format, for a template without tools (`smollm2`)."""
        listed = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools)
        return (
            "You are an expert in composing functions. You are given a question and a set of possible functions. "
            "Based on the question, you will need to make one or more function/tool calls to achieve the purpose. "
            "If none of the functions can be used, answer in plain text.\n"
            f"You have access to the following tools:\n<tools>\n{listed}\n</tools>\n"
            "To call tools, answer with this format and no other text:\n"
            '<tool_call>[{"name": "func_name1", "arguments": {"argument1": "value1"}}]</tool_call>'
        )

    # ---- parsing -----------------------------------------------------------------------------------------------

    def parse(self, text: str, tools: Sequence[Tool] = (), new_id: Callable[[], str] | None = None) -> ParsedOutput:
        """Split generated `text` (special tokens kept) into content, calls and invalid calls. With `tools`, a call
        of a tool not listed is invalid."""
        new_id = new_id or self.new_id
        names = {t.name for t in tools} if tools else None
        if self.family == "hermes":
            return _parse_blocks(text, "<tool_call>", "</tool_call>", False, self.args_key, names, new_id)
        if self.family == "smollm2":
            return _parse_blocks(text, "<tool_call>", "</tool_call>", True, self.args_key, names, new_id)
        if self.family == "mistral":
            head, marker, body = text.partition(self.start)
            if not marker:
                return ParsedOutput(text.strip())
            return _parse_tail(head, body, True, self.args_key, names, new_id)
        body = text.replace("<|python_tag|>", "")
        start = _LLAMA_CALL.search(body)
        if start is None:
            return ParsedOutput(body.strip())
        return _parse_tail(body[: start.start()], body[start.start():], False, self.args_key, names, new_id)

    def new_id(self) -> str:
        return new_call_id(9, "") if self.family == "mistral" else new_call_id()


def tool_format(tokenizer) -> ToolFormat:
    """The tool-call format of `tokenizer`'s model family."""
    family = detect_family(tokenizer)
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    if family in ("hermes", "smollm2"):
        return ToolFormat(family, family == "hermes", "<tool_call>", start_id=added.get("<tool_call>"),
                          end="</tool_call>", end_id=added.get("</tool_call>"))
    if family == "llama3":
        return ToolFormat("llama3", True, '{"name"', args_key="parameters", parallel=False)
    return ToolFormat("mistral", True, "[TOOL_CALLS]", start_id=added.get("[TOOL_CALLS]"))


# ---- parsing helpers -----------------------------------------------------------------------------------------------


def _one_call(item: object, args_key: str, names: set[str] | None, new_id) -> ToolCall | InvalidToolCall:
    """A call from a decoded JSON value `{"name": N, args_key (or "arguments"): {...}}`."""
    if not isinstance(item, Mapping):
        return InvalidToolCall(None, json.dumps(item, ensure_ascii=False), new_id(), "a call must be a JSON object")
    name = item.get("name")
    args = item.get(args_key, item.get("arguments", item.get("parameters")))
    raw = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False) if args is not None else None
    call_id = item.get("id") if isinstance(item.get("id"), str) else new_id()
    if not isinstance(name, str) or not name:
        return InvalidToolCall(None, raw, call_id, "the call has no 'name' string")
    if names is not None and name not in names:
        return InvalidToolCall(name, raw, call_id, f"unknown tool {name!r}; the tools are {sorted(names)}")
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError as error:
            return InvalidToolCall(name, raw, call_id, f"arguments are not valid JSON: {error}")
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        return InvalidToolCall(name, raw, call_id, "arguments must be a JSON object")
    return ToolCall(name, dict(args), call_id)


def _split(results: list) -> tuple[tuple[ToolCall, ...], tuple[InvalidToolCall, ...]]:
    return (tuple(r for r in results if isinstance(r, ToolCall)),
            tuple(r for r in results if isinstance(r, InvalidToolCall)))


def _decode_calls(body: str, listed: bool, args_key: str, names, new_id) -> list:
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        return [InvalidToolCall(None, body, new_id(), f"the call is not valid JSON: {error}")]
    items = value if listed and isinstance(value, list) else [value]
    return [_one_call(item, args_key, names, new_id) for item in items]


def _parse_blocks(text: str, start: str, end: str, listed: bool, args_key: str, names, new_id) -> ParsedOutput:
    content, results, pos = [], [], 0
    while (open_at := text.find(start, pos)) >= 0:
        content.append(text[pos:open_at])
        close_at = text.find(end, open_at + len(start))
        if close_at < 0:
            body = text[open_at + len(start):].strip()
            results.append(InvalidToolCall(None, body or None, new_id(), f"the call is not closed by {end}"))
            pos = len(text)
            break
        results.extend(_decode_calls(text[open_at + len(start):close_at].strip(), listed, args_key, names, new_id))
        pos = close_at + len(end)
    content.append(text[pos:])
    calls, invalid = _split(results)
    return ParsedOutput("".join(content).strip(), calls, invalid)


def _parse_tail(head: str, body: str, listed: bool, args_key: str, names, new_id) -> ParsedOutput:
    """Calls that run from `body`'s start as one JSON value; `head` and what follows the value are content."""
    stripped = body.strip()
    try:
        value, end = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError as error:
        return ParsedOutput(head.strip(), (), (InvalidToolCall(None, stripped, new_id(),
                                                               f"the call is not valid JSON: {error}"),))
    items = value if listed and isinstance(value, list) else [value]
    calls, invalid = _split([_one_call(item, args_key, names, new_id) for item in items])
    return ParsedOutput((head + stripped[end:]).strip(), calls, invalid)
