"""Tools a model may call, the calls it made, and `tool_choice`, in the OpenAI shapes both frameworks convert to.

A tool is `{"type": "function", "function": {"name", "description", "parameters"}}` (LangChain's
`convert_to_openai_tool`, LlamaIndex's `to_openai_tool`); a parsed call is a `ToolCall`, and what looked like a call
but does not parse is an `InvalidToolCall` with the error, the shape of LangChain's `invalid_tool_calls`.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from prophet_rag.errors import InvalidRequestError

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""OpenAI's rule for function names; a name this simple can sit verbatim in every family's call format."""


@dataclass(frozen=True)
class Tool:
    """A function the model may call. `parameters` is the JSON schema of its arguments (an object schema)."""

    name: str
    description: str = ""
    parameters: Mapping = field(default_factory=lambda: {"type": "object", "properties": {}})

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TOOL_NAME.fullmatch(self.name):
            raise InvalidRequestError(
                f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-' (OpenAI's rule); rename the tool."
            )
        if not isinstance(self.description, str):
            raise InvalidRequestError(f"tool {self.name!r}: description must be a string.")
        if not isinstance(self.parameters, Mapping) or self.parameters.get("type", "object") != "object":
            raise InvalidRequestError(
                f"tool {self.name!r}: parameters must be a JSON schema of type 'object', got {self.parameters!r}."
            )

    @classmethod
    def from_openai(cls, spec: Mapping) -> Tool:
        """From `{"type": "function", "function": {...}}` or the inner `{"name", "description", "parameters"}`."""
        if not isinstance(spec, Mapping):
            raise InvalidRequestError(f"a tool must be an OpenAI-format mapping, got {type(spec).__name__}.")
        if spec.get("type") == "function" and isinstance(spec.get("function"), Mapping):
            spec = spec["function"]
        elif "type" in spec and "name" not in spec:
            raise InvalidRequestError(f"only function tools are supported, got type {spec.get('type')!r}.")
        parameters = spec.get("parameters") or {"type": "object", "properties": {}}
        return cls(spec.get("name"), spec.get("description") or "", dict(parameters))

    def openai(self) -> dict:
        """The OpenAI shape chat templates take as `tools=[...]`."""
        function = {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}
        return {"type": "function", "function": function}


def as_tools(tools: Sequence[Tool | Mapping]) -> tuple[Tool, ...]:
    if isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence):
        raise InvalidRequestError("tools must be a list of OpenAI-format tool mappings or Tool objects.")
    out = tuple(t if isinstance(t, Tool) else Tool.from_openai(t) for t in tools)
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"tool names must be unique, got {names}.")
    return out


def tool_choice(choice: object, tools: Sequence[Tool]) -> str:
    """`"auto"`, `"none"`, `"required"` or the name of the one tool to call, from OpenAI/LangChain spellings
    (`"any"` is LangChain's `"required"`; `True` means required; `{"type": "function", "function": {"name"}}`)."""
    names = {t.name for t in tools}
    if choice is None:
        return "auto"
    if choice is True or choice == "any":
        return "required"
    if isinstance(choice, Mapping):
        function = choice.get("function")
        choice = function.get("name") if isinstance(function, Mapping) else choice.get("name")
    if choice in ("auto", "none", "required"):
        if choice == "required" and not tools:
            raise InvalidRequestError("tool_choice 'required' needs at least one tool.")
        return choice
    if isinstance(choice, str) and choice in names:
        return choice
    raise InvalidRequestError(
        f"tool_choice must be 'auto', 'none', 'required' or one of the tools ({', '.join(sorted(names))}), "
        f"got {choice!r}."
    )


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict
    id: str


@dataclass(frozen=True)
class InvalidToolCall:
    """Generated text that opened a call but did not parse into a known tool with JSON-object arguments."""

    name: str | None
    arguments: str | None
    """The arguments as generated (text), when they could be isolated."""
    id: str | None
    error: str


@dataclass(frozen=True)
class ParsedOutput:
    content: str
    """The generated text outside the tool calls."""
    tool_calls: tuple[ToolCall, ...] = ()
    invalid_tool_calls: tuple[InvalidToolCall, ...] = ()


_ID_CHARS = string.ascii_letters + string.digits


def new_call_id(length: int = 24, prefix: str = "call_") -> str:
    """A random call id; Mistral's templates want exactly 9 letters and digits (`new_call_id(9, "")`)."""
    return prefix + "".join(secrets.choice(_ID_CHARS) for _ in range(length))
