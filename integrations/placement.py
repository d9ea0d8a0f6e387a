"""Where the retrieved documents go in a framework's own prompt template.

The template is rendered with a unique mark in place of its context variable, and every other string variable as
a mark of its own; the one message whose content holds the context mark is cut there into
`[before, DOCUMENTS, after]` and the other marks are filled back with their values. So the system prompt, the
instructions, the chat history and the question stay exactly where the template puts them, and the documents are
passed as documents, never re-split out of a joined string. A template that puts per-call text (the question, a
refine step's answer so far) before the documents makes a one-off prefix, which is then not stored.

Where a framework hands a model only the rendered prompt (LangChain's `prompt | model`), `locate` finds documents
known to belong to the call (the ones its chain retrieved) in that prompt by their exact content, and cuts the one
message that holds them the same way; text that is not a known document stays the template's or the caller's.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prophet_rag.integrations.common import ChatRequest
from prophet_rag.layout import DOCUMENTS


def _mark() -> str:
    # No character a template language escapes (mustache escapes <, >, &, quotes), so the mark renders verbatim.
    return f"@@prophet-rag-{secrets.token_hex(8)}@@"


class Marks:
    """Marks for one template call's variables: render the template with `args`, then `request(...)`."""

    def __init__(self, args: Mapping[str, Any], context_key: str) -> None:
        self.context = _mark()
        self._values: dict[str, str] = {}
        self.args: dict[str, Any] = {}
        for key, value in args.items():
            if key == context_key:
                self.args[key] = self.context
            elif isinstance(value, str):  # other values (a history's message list) render as themselves
                mark = _mark()
                self._values[mark] = value
                self.args[key] = mark
            else:
                self.args[key] = value

    def fill(self, text: str) -> str:
        """`text` with every variable's mark replaced by its value."""
        for mark, value in self._values.items():
            text = text.replace(mark, value)
        return text

    def request(self, messages: Sequence[Mapping[str, str]], documents: Sequence[str],
                transient: Sequence[bool] = ()) -> ChatRequest | None:
        """`messages` ({"role", "content"}) rendered with `args`, as a request with `documents` at the context's
        place; None when the context is not rendered exactly once (the caller then answers the prompt as it is)."""
        holders = [i for i, message in enumerate(messages) if self.context in message["content"]]
        if len(holders) != 1 or messages[holders[0]]["content"].count(self.context) != 1:
            return None
        index = holders[0]
        before, after = messages[index]["content"].split(self.context)
        ahead = "".join(message["content"] for message in messages[:index]) + before
        request = []
        for i, message in enumerate(messages):
            # Each document is followed by the chunk separator, which stands for the whitespace after the context.
            parts = ([self.fill(before), DOCUMENTS, self.fill(after).lstrip()] if i == index
                     else self.fill(message["content"]))
            request.append({"role": message["role"], "content": parts})
        return ChatRequest(tuple(request), tuple(documents), tuple(transient),
                           transient_prefix=any(mark in ahead for mark in self._values))


def _whole(content: str, start: int, end: int) -> bool:
    """True when `content[start:end]` does not begin or end inside a word (a letter or digit on both sides)."""
    cut_before = start > 0 and content[start - 1].isalnum() and content[start].isalnum()
    cut_after = end < len(content) and content[end - 1].isalnum() and content[end].isalnum()
    return not (cut_before or cut_after)


def occurrences(content: str, texts: Iterable[str]) -> list[tuple[int, int]]:
    """The `(start, end)` spans of `content` that are exactly one of `texts` (stripped, blank ones ignored) and
    start and end at a word's edge; non-overlapping, the leftmost first and, at one place, the longest."""
    found = []
    for text in {text.strip() for text in texts} - {""}:
        start = content.find(text)
        while start >= 0:
            if _whole(content, start, start + len(text)):
                found.append((start, start + len(text)))
            start = content.find(text, start + 1)
    spans: list[tuple[int, int]] = []
    for start, end in sorted(found, key=lambda span: (span[0], -span[1])):
        if not spans or start >= spans[-1][1]:
            spans.append((start, end))
    return spans


def locate(messages: Sequence[Mapping[str, str]], texts: Iterable[str],
           per_call: Iterable[str] = ()) -> ChatRequest | None:
    """A request made of rendered `messages` ({"role", "content"}) with the known document `texts` taken out of
    the one message that holds most of them, as documents at their place; None when no message holds one.

    Only exact occurrences count (see `occurrences`): a document's place is found by its content, never guessed
    from separators. Text between two documents that is not whitespace (a per-document header, a custom separator)
    stays in the prompt as a one-off fragment, computed and never stored; whitespace between documents, and after
    the last one, is what the engine's chunk separator stands for. The prefix is one-off when it holds any of the
    `per_call` strings (the prompt's variable values, such as the question).
    """
    texts = list(texts)
    found = [occurrences(message["content"], texts) for message in messages]
    held = [sum(end - start for start, end in spans) for spans in found]
    if not any(held):
        return None
    index = max(range(len(messages)), key=lambda i: (held[i], i))  # most document text; the later on a tie
    content, spans = messages[index]["content"], found[index]
    documents, transient = [], []
    for i, (start, end) in enumerate(spans):
        between = content[spans[i - 1][1]:start].strip() if i else ""
        if between:
            documents.append(between)
            transient.append(True)
        documents.append(content[start:end])
        transient.append(False)
    before, after = content[:spans[0][0]], content[spans[-1][1]:]
    request = [dict(message) for message in messages]
    # The message keeps its other keys (a tool result's `tool_call_id`, an assistant's `tool_calls`).
    request[index] = {**messages[index], "content": [before, DOCUMENTS, after.lstrip()]}
    ahead = "".join(message["content"] for message in messages[:index]) + before
    one_off = any(value.strip() and value in ahead for value in per_call)
    return ChatRequest(tuple(request), tuple(documents), tuple(transient), transient_prefix=one_off)
