"""Where the retrieved documents go in a framework's own prompt template.

The template is rendered with a unique mark in place of its context variable, and every other string variable as
a mark of its own; the one message whose content holds the context mark is cut there into
`[before, DOCUMENTS, after]` and the other marks are filled back with their values. So the system prompt, the
instructions, the chat history and the question stay exactly where the template puts them, and the documents are
passed as documents, never re-split out of a joined string. A template that puts per-call text (the question, a
refine step's answer so far) before the documents makes a one-off prefix, which is then not stored.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
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
