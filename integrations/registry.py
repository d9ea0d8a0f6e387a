"""The texts of retrieved nodes, so that a context a framework joined into one string can be cut back into them.

LlamaIndex's synthesizers hand the LLM the retrieved nodes joined into one `context_str`: compact and
tree_summarize join them with a blank line, simple_summarize with a newline, and a node's own text may hold both.
`ProphetKVPostprocessor` registers every retrieved node's text here; `ChunkRegistry.segment` then finds those texts
in the joined string, line by line. Text that matches no registered node (a repacked piece, a summary of summaries)
is kept as one-off fragments, which the engine computes without storing.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter, OrderedDict


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class ChunkRegistry:
    """Stripped node texts, kept as hashes with their line counts. Thread-safe and bounded: past `max_entries` the
    oldest text is forgotten, which only loses its boundary (its KV stays stored, and the text is registered again
    the next time it is retrieved)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._lines: OrderedDict[str, int] = OrderedDict()  # text hash -> its number of lines
        self._line_counts: Counter[int] = Counter()
        self._max_entries = max_entries
        self._lock = threading.Lock()

    def add(self, text: str) -> None:
        text = text.strip()
        key, lines = _digest(text), text.count("\n") + 1
        with self._lock:
            if key in self._lines:
                self._lines.move_to_end(key)
                return
            self._lines[key] = lines
            self._line_counts[lines] += 1
            if len(self._lines) > self._max_entries:
                _, dropped = self._lines.popitem(last=False)
                self._line_counts[dropped] -= 1
                if not self._line_counts[dropped]:
                    del self._line_counts[dropped]

    def __contains__(self, text: str) -> bool:
        with self._lock:
            return _digest(text.strip()) in self._lines

    def __len__(self) -> int:
        return len(self._lines)

    def segment(self, context: str) -> list[tuple[str, bool]]:
        """`context` cut into `(text, registered)` pieces, in order: at each line the longest run of lines that is a
        registered text, and the lines between such runs merged into one fragment. Blank pieces are dropped."""
        with self._lock:
            counts = sorted(self._line_counts, reverse=True)
        lines = context.split("\n")
        pieces: list[tuple[str, bool]] = []
        loose: list[str] = []

        def flush() -> None:
            if "\n".join(loose).strip():
                pieces.append(("\n".join(loose).strip(), False))
            loose.clear()

        i = 0
        while i < len(lines):
            for count in counts:
                run = "\n".join(lines[i:i + count]).strip() if i + count <= len(lines) else ""
                if run and run in self:
                    flush()
                    pieces.append((run, True))
                    i += count
                    break
            else:
                loose.append(lines[i])
                i += 1
        flush()
        return pieces
