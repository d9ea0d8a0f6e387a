"""Turn (chunks, query) into token segments: `prefix | chunk_1 ... chunk_m | suffix`.

The chat template is rendered once around a placeholder user message and split there, so the prefix (template start,
system prompt, instruction) and the suffix (question, template end, assistant start) come from the tokenizer's own
template. Every segment is tokenized on its own: a chunk's token ids are identical wherever it appears, which is what
makes its cached KV reusable, and `full` prefill runs over exactly the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prophet_rag.config import PromptConfig
from prophet_rag.errors import InvalidRequestError

_DOCS = "\x00PROPHET_DOCS\x00"


@dataclass(frozen=True)
class RequestLayout:
    prefix_ids: torch.Tensor
    """`[P]` int64."""
    chunk_ids: tuple[torch.Tensor, ...]
    """One `[n_i]` int64 tensor per chunk, in request order."""
    suffix_ids: torch.Tensor
    """`[S]` int64."""

    @property
    def context_tokens(self) -> int:
        return sum(int(c.numel()) for c in self.chunk_ids)

    @property
    def total_tokens(self) -> int:
        return int(self.prefix_ids.numel()) + self.context_tokens + int(self.suffix_ids.numel())

    def joined_ids(self, order: Sequence[int] | None = None) -> torch.Tensor:
        """`[P + C + S]` the whole prompt with the chunks in `order` (default: request order)."""
        order = range(len(self.chunk_ids)) if order is None else order
        return torch.cat([self.prefix_ids, *(self.chunk_ids[i] for i in order), self.suffix_ids])


class PromptBuilder:
    """Renders and tokenizes requests for one tokenizer and prompt configuration."""

    def __init__(self, tokenizer, prompt: PromptConfig) -> None:
        self.tokenizer = tokenizer
        self.prompt = prompt
        self._prefix_text, self._suffix_template = self._split_template()

    def _split_template(self) -> tuple[str, str]:
        user = f"{self.prompt.instruction}{self.prompt.chunk_separator}{_DOCS}{self.prompt.question_template}"
        messages = [{"role": "user", "content": user}]
        if self.prompt.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.prompt.system_prompt})
        if getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            system = f"{self.prompt.system_prompt}\n\n" if self.prompt.system_prompt else ""
            bos = self.tokenizer.bos_token or ""
            rendered = f"{bos}{system}{user}\nAnswer:"
        if rendered.count(_DOCS) != 1:
            raise InvalidRequestError("the chat template must place the user message verbatim exactly once.")
        prefix, suffix = rendered.split(_DOCS)
        return prefix, suffix

    def encode(self, text: str) -> torch.Tensor:
        # Special tokens are written by the chat template as text, so no tokenizer-added BOS/EOS here.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def sink_ids(self) -> torch.Tensor:
        """`[s]` the tokens every chunk is computed behind: the BOS token, else the template's first token.

        A chunk computed with nothing before it makes its own first token the attention sink; behind a fixed sink
        it is computed much as it will be seen inside a prompt. The sink's own KV is dropped.
        """
        bos = self.tokenizer.bos_token_id
        if bos is not None:
            return torch.tensor([bos], dtype=torch.long)
        return self.encode(self._prefix_text)[:1]

    def layout(self, chunks: Sequence[str], query: str) -> RequestLayout:
        if isinstance(chunks, str) or not isinstance(chunks, Sequence):
            raise InvalidRequestError(f"chunks must be a list of strings, got {type(chunks).__name__}.")
        if not chunks:
            raise InvalidRequestError("chunks is empty: pass at least one retrieved document.")
        for i, chunk in enumerate(chunks):
            if not isinstance(chunk, str) or not chunk.strip():
                raise InvalidRequestError(f"chunk {i} is empty or not a string; drop it or pass its text.")
        if not isinstance(query, str) or not query.strip():
            raise InvalidRequestError("query is empty: pass the user's question.")
        suffix_text = self._suffix_template.replace("{query}", query.strip())
        separator = self.prompt.chunk_separator
        return RequestLayout(
            prefix_ids=self.encode(self._prefix_text),
            chunk_ids=tuple(self.encode(chunk.strip() + separator) for chunk in chunks),
            suffix_ids=self.encode(suffix_text),
        )
