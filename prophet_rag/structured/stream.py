"""Streaming tool-call parsing: text deltas in; text deltas and tool-call chunks out, as the text arrives.

A chunk is LangChain's `tool_call_chunk` shape: the call's `index`, and its `id` and `name` on the first chunk of
that index (as soon as the name is complete), then pieces of the arguments' JSON text as they are generated.
Concatenating a call's argument pieces gives its arguments' JSON. `finish()` returns the authoritative
`ParsedOutput` of the whole text (with the ids the chunks carried), which also reports what did not parse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prophet_rag.structured.formats import ToolFormat
from prophet_rag.structured.tools import ParsedOutput, Tool


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCallChunk:
    index: int
    id: str | None
    name: str | None
    arguments: str


Event = TextDelta | ToolCallChunk


class ToolCallStream:
    """Incremental parser for one generation in `fmt`'s call format."""

    def __init__(self, fmt: ToolFormat, new_id: Callable[[], str] | None = None) -> None:
        self.fmt = fmt
        self._new_id = new_id or fmt.new_id
        self.ids: list[str] = []
        self.text = ""
        self._pending = ""  # text mode: not yet emitted, may be the start of the call marker
        self._in_calls = False
        self._after_call = False
        self._end = fmt.end
        self._call_level = 2 if fmt.family in ("smollm2", "mistral") else 1
        self._args_keys = {fmt.args_key, "arguments", "parameters"}
        self._markers = (fmt.start, "<|python_tag|>") if fmt.family == "llama3" else (fmt.start,)
        self._reset_scanner()

    def _reset_scanner(self) -> None:
        self._depth = 0
        self._in_str = self._escape = False
        self._str = ""
        self._key: str | None = None
        self._expect_key = False
        self._args = "off"  # off | pending (after "arguments":) | on
        self._args_closes_at = 0
        self._index_named = -1

    # ---- public ------------------------------------------------------------------------------------------------

    def feed(self, delta: str) -> list[Event]:
        self.text += delta
        events: list[Event] = []
        rest = delta
        while rest:
            rest = self._scan(rest, events) if self._in_calls else self._text_mode(rest, events)
        return _coalesce(events)

    def finish(self, tools: Sequence[Tool] = ()) -> tuple[list[Event], ParsedOutput]:
        """Flush held-back text; the whole output parsed (calls keep the ids their chunks had)."""
        events: list[Event] = []
        if not self._in_calls and self._pending:
            events.append(TextDelta(self._pending))
            self._pending = ""
        ids = iter(list(self.ids))
        parsed = self.fmt.parse(self.text, tools, new_id=lambda: next(ids, None) or self._new_id())
        return events, parsed

    # ---- text between calls ------------------------------------------------------------------------------------

    def _text_mode(self, text: str, events: list[Event]) -> str:
        pending = self._pending + text
        if self.fmt.family == "llama3":  # the special token that may open a Llama call is not text
            pending = pending.replace("<|python_tag|>", "")
        if self._end and self._after_call:  # the closing tag of the call just scanned (whitespace before it)
            stripped = pending.lstrip()
            if self._end.startswith(stripped) and stripped != self._end:
                self._pending = pending  # could still become the closing tag: wait
                return ""
            if stripped.startswith(self._end):
                pending = stripped[len(self._end):]
            self._after_call = False
        at = pending.find(self.fmt.start)
        if at >= 0:
            if pending[:at]:
                events.append(TextDelta(pending[:at]))
            self._pending, self._in_calls = "", True
            self._reset_scanner()
            body = pending[at:] if self.fmt.family == "llama3" else pending[at + len(self.fmt.start):]
            return body
        hold = max((k for marker in self._markers for k in range(1, len(marker)) if pending.endswith(marker[:k])),
                   default=0)
        if pending[: len(pending) - hold]:
            events.append(TextDelta(pending[: len(pending) - hold]))
        self._pending = pending[len(pending) - hold:]
        return ""

    # ---- inside the calls: a small JSON scanner ----------------------------------------------------------------

    def _call_index(self) -> int:
        return len(self.ids) - 1

    def _scan(self, text: str, events: list[Event]) -> str:
        level = self._call_level
        for i, ch in enumerate(text):
            if self._args == "pending" and not ch.isspace():
                self._args, self._args_closes_at = "on", self._depth
            if self._args == "on":
                events.append(ToolCallChunk(self._call_index(), None, None, ch))
            if self._in_str:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_str = False
                    self._end_string(events)
                elif self._depth == level and self._args != "on":
                    self._str += ch  # keys and names are plain: their escapes are not decoded
                continue
            if ch == '"':
                self._in_str, self._str = True, ""
            elif ch in "{[":
                self._depth += 1
                if self._depth == level and ch == "{" and self._args != "on":
                    self.ids.append(self._new_id())
                    self._expect_key, self._key = True, None
            elif ch in "}]":
                self._depth -= 1
                if self._args == "on" and self._depth <= self._args_closes_at:
                    self._args = "off"
                if self._depth == 0:
                    self._in_calls, self._after_call = False, True
                    return text[i + 1:]
            elif self._depth == level and self._args != "on":
                if ch == ":":
                    self._expect_key = False
                    if self._key in self._args_keys:
                        self._args = "pending"
                elif ch == ",":
                    self._expect_key = True
        return ""

    def _end_string(self, events: list[Event]) -> None:
        if self._depth != self._call_level or self._args == "on":
            if self._args == "on" and self._depth == self._args_closes_at:
                self._args = "off"  # arguments given as one JSON string
            return
        if self._expect_key:
            self._key = self._str
        elif self._key == "name" and self._index_named < self._call_index():
            self._index_named = self._call_index()
            events.append(ToolCallChunk(self._call_index(), self.ids[-1], self._str, ""))


def _coalesce(events: list[Event]) -> list[Event]:
    """Merge neighbouring text deltas, and argument pieces of the same call."""
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, TextDelta) and isinstance(last, TextDelta):
            out[-1] = TextDelta(last.text + event.text)
        elif (isinstance(event, ToolCallChunk) and isinstance(last, ToolCallChunk) and event.index == last.index
              and event.name is None and last.name is None):
            out[-1] = ToolCallChunk(last.index, None, None, last.arguments + event.arguments)
        else:
            out.append(event)
    return out
