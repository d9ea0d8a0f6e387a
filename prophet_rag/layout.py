"""Turn a request into token segments: `prefix | chunk_1 ... chunk_m | suffix`.

A request is chat messages rendered by the tokenizer's own chat template, with the retrieved documents at the place
marked `DOCUMENTS` in one message: everything before that place is the prefix, everything after it the suffix.
`PromptBuilder.layout(chunks, query)` builds the default RAG messages (system prompt, instruction, documents,
question); `PromptBuilder.chat_layout(messages, documents)` takes a framework's own.
A conversation's history may hold documents an earlier turn placed (`PlacedDocuments`), tokenized as that turn's
chunks were, so the history's ids are the ids that turn's KV was computed for (the engine's prefix cache).

Untrusted text never becomes template structure. The template is rendered around placeholders, and only the
template's own text is tokenized with special tokens recognised; message contents, documents and queries are
tokenized with special tokens split into plain text, so a document holding `<|im_end|><|im_start|>system` stays
plain text. A message's role is written into the template, so it must be one of the roles the template knows
(`PromptBuilder.roles`). Every chunk is tokenized on its own: its token ids are identical wherever it appears, which
is what makes its cached KV reusable, and full prefill runs over exactly the same ids.

A builder is safe to use from many threads at once: it owns two backend tokenizers, each with its special-token
flag set once (transformers' fast tokenizers switch that flag on their one shared backend per call, so concurrent
calls that want different settings race on it).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from prophet_rag.config import PromptConfig
from prophet_rag.errors import InvalidRequestError


class _Documents:
    """The place of the retrieved documents inside a message's content (see `DOCUMENTS`)."""

    def __repr__(self) -> str:
        return "DOCUMENTS"


DOCUMENTS = _Documents()
"""Put this in a message's content list to mark where the documents go: `["Context:\\n", DOCUMENTS, "\\nQ: ..."]`."""


@dataclass(frozen=True)
class PlacedDocuments:
    """Documents that an earlier turn of a conversation placed with `DOCUMENTS`, in the order it laid them out
    (`Answer.chunk_order`), as part of that turn's message in the history: `["Context:\\n", PlacedDocuments(docs),
    "\\nQuestion: ..."]`. Each is tokenized exactly as a chunk is, so the history's ids are the ids that turn
    computed, and the conversation prefix cache finds that turn's KV. They are history text, not chunks of the
    request."""

    texts: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.texts, str) or not isinstance(self.texts, Sequence) or not self.texts:
            raise InvalidRequestError(
                f"PlacedDocuments takes the list of documents an earlier turn placed, got {self.texts!r}."
            )
        object.__setattr__(self, "texts", tuple(self.texts))


_SENTINEL = "\x00prophet-rag-content-{}\x00"

BASE_ROLES = ("system", "user", "assistant", "tool")
"""Roles every request may use; a template that names others (`message['role'] == 'ipython'`) adds those."""

_ROLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
# A role the template compares a message's role with: `message['role'] == 'x'`, `message.role != "x"`,
# `messages[0]['role'] in ['x', 'y']`.
_ROLE_TEST = re.compile(r"""(?:\.role\b|\[\s*['"]role['"]\s*\])   # message.role, message['role']
                            \s*(?:==|!=|(?:not\s+)?in\b)\s*
                            (\[[^\]]*\]|\([^)]*\)|['"][^'"]*['"])        # a list, a tuple or one string""", re.VERBOSE)
_QUOTED = re.compile(r"""['"]([^'"]*)['"]""")


@dataclass(frozen=True)
class RequestLayout:
    prefix_ids: torch.Tensor
    """`[P]` int64."""
    chunk_ids: tuple[torch.Tensor, ...]
    """One `[n_i]` int64 tensor per chunk, in request order."""
    suffix_ids: torch.Tensor
    """`[S]` int64."""
    transient: tuple[bool, ...] = ()
    """Per chunk: True for one-off text whose KV is computed but never stored (empty: every chunk is stored)."""
    transient_prefix: bool = False
    """True when the prefix is one-off (it holds a conversation's history), so its KV is not stored."""

    @property
    def context_tokens(self) -> int:
        return sum(int(c.numel()) for c in self.chunk_ids)

    @property
    def total_tokens(self) -> int:
        return int(self.prefix_ids.numel()) + self.context_tokens + int(self.suffix_ids.numel())

    def is_transient(self, chunk: int) -> bool:
        return bool(self.transient) and self.transient[chunk]

    def joined_ids(self, order: Sequence[int] | None = None) -> torch.Tensor:
        """`[P + C + S]` the whole prompt with the chunks in `order` (default: request order)."""
        order = range(len(self.chunk_ids)) if order is None else order
        return torch.cat([self.prefix_ids, *(self.chunk_ids[i] for i in order), self.suffix_ids])


def _check_unicode(name: str, text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequestError(
            f"{name} holds {text[error.start:error.end]!r} at index {error.start}, which is not valid Unicode text "
            "(a lone surrogate, often from a broken decode); decode the source with errors='replace'."
        ) from None
    return text


def check_text(name: str, text: object) -> str:
    """`text` if it is a string a tokenizer can take and a person can see; else an `InvalidRequestError`."""
    if not isinstance(text, str):
        raise InvalidRequestError(f"{name} must be a string, got {type(text).__name__}.")
    _check_unicode(name, text)
    # Whitespace, control and format characters (NUL, zero-width spaces, BOMs) alone say nothing to the model.
    if not any(unicodedata.category(ch)[0] not in "CZ" for ch in text):
        raise InvalidRequestError(f"{name} is empty or holds only whitespace or invisible characters; pass its text.")
    return text


def template_roles(chat_template: object) -> frozenset[str]:
    """`BASE_ROLES` and the plain role names `chat_template` (a Jinja source, or a dict of named ones) tests for."""
    sources = chat_template.values() if isinstance(chat_template, Mapping) else [chat_template]
    named = {name for source in sources if isinstance(source, str) for test in _ROLE_TEST.findall(source)
             for name in _QUOTED.findall(test) if _ROLE_NAME.fullmatch(name)}
    return frozenset(BASE_ROLES) | named


def _shown(text: str, limit: int = 40) -> str:
    """`text` quoted for an error message, escaped (repr never fails, not even on a lone surrogate) and shortened."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}..."


def _check_messages(messages: object, roles: frozenset[str]) -> list[Mapping]:
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role': ..., 'content': ...} mappings.")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or not message["role"]:
            raise InvalidRequestError(f"message {i} must be a mapping with a non-empty string 'role'.")
        if message["role"] not in roles:
            # The role is written into the template as is: anything but a role it knows could carry structure.
            raise InvalidRequestError(
                f"message {i} has role {_shown(message['role'])}, which the chat template does not know; use one of "
                f"{', '.join(sorted(roles))}."
            )
        content = message.get("content")
        parts = [content] if isinstance(content, str) else content
        if not isinstance(parts, Sequence) or not all(
                isinstance(p, (str, PlacedDocuments)) or p is DOCUMENTS for p in parts):
            raise InvalidRequestError(
                f"message {i} content must be a string or a list of strings, DOCUMENTS and PlacedDocuments, got "
                f"{content!r}."
            )
    return list(messages)


def _backend_encoders(tokenizer) -> tuple[object, object] | None:
    """`(untrusted, template)`: two copies of a fast tokenizer's backend (a `tokenizers.Tokenizer`), the first
    splitting special tokens into plain text, the second recognising them; None for a tokenizer without one.

    Each copy's settings are made here, once, and never change, so any number of threads can encode with them. They
    encode exactly as `tokenizer(text, add_special_tokens=False, split_special_tokens=...)` does, which also turns
    off any truncation or padding the tokenizer file configures.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    encoders = []
    for split in (True, False):
        encoder = Tokenizer.from_str(backend.to_str())
        encoder.no_truncation()
        encoder.no_padding()
        encoder.encode_special_tokens = split
        encoders.append(encoder)
    return encoders[0], encoders[1]


class PromptBuilder:
    """Renders and tokenizes requests for one tokenizer and prompt configuration."""

    def __init__(self, tokenizer, prompt: PromptConfig) -> None:
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.roles = template_roles(getattr(tokenizer, "chat_template", None))
        """The roles a message may have."""
        self._encoders = _backend_encoders(tokenizer)

    def encode(self, text: str, *, template: bool = False) -> torch.Tensor:
        """`[n]` ids of `text`. Only `template=True` text (the chat template's own) may produce special tokens."""
        if self._encoders is not None:
            ids = self._encoders[template].encode(text, add_special_tokens=False).ids
        else:  # a Python tokenizer reads the flag per call, shared state untouched
            ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=not template)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def sink_ids(self) -> torch.Tensor:
        """`[s]` the tokens every chunk is computed behind: the BOS token, else the template's first token.

        A chunk computed with nothing before it makes its own first token the attention sink; behind a fixed sink
        it is computed much as it will be seen inside a prompt. The sink's own KV is dropped.
        """
        bos = self.tokenizer.bos_token_id
        if bos is not None:
            return torch.tensor([bos], dtype=torch.long)
        return self._segments([{"role": "user", "content": "x"}])[1][:1]

    def rag_messages(self, query: str) -> list[dict]:
        """The default RAG request: system prompt (when set), then instruction, documents and question."""
        question = self.prompt.question_template.replace("{query}", query.strip())
        user = {"role": "user",
                "content": [f"{self.prompt.instruction}{self.prompt.chunk_separator}", DOCUMENTS, question]}
        system = self.prompt.system_prompt
        return [user] if system is None else [{"role": "system", "content": system}, user]

    def layout(self, chunks: Sequence[str], query: str) -> RequestLayout:
        """The default RAG request over `chunks` (retrieved documents, in retrieval order)."""
        if isinstance(chunks, str) or not isinstance(chunks, Sequence):
            raise InvalidRequestError(f"chunks must be a list of strings, got {type(chunks).__name__}.")
        if not chunks:
            raise InvalidRequestError("chunks is empty: pass at least one retrieved document.")
        if not isinstance(query, str) or not query.strip():
            raise InvalidRequestError("query is empty: pass the user's question.")
        check_text("query", query)
        return self.chat_layout(self.rag_messages(query), chunks)

    def chat_layout(self, messages: Sequence[Mapping], documents: Sequence[str] = (),
                    transient: Sequence[bool] = (), transient_prefix: bool = False) -> RequestLayout:
        """`messages` rendered by the chat template, with `documents` (one chunk each, followed by the prompt's
        chunk separator) where one message's content holds `DOCUMENTS`. Without documents there must be no marker,
        and the whole prompt is the suffix. `transient[i]` marks document i as one-off (never stored);
        `transient_prefix` marks the prefix as one-off, as a prefix holding chat history always is."""
        messages = _check_messages(messages, self.roles)
        marked = sum(1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if p is DOCUMENTS)
        if documents and marked != 1:
            raise InvalidRequestError(
                f"pass DOCUMENTS exactly once in the messages' content to place the documents, found {marked}."
            )
        if not documents and marked:
            raise InvalidRequestError("the messages place DOCUMENTS but no documents were given.")
        chunk_ids = self._chunk_ids(documents, transient)
        before, after = self._segments(messages)
        history = sum(1 for m in messages if m["role"] != "system") > 1
        return RequestLayout(before, chunk_ids, after, tuple(bool(t) for t in transient),
                             transient_prefix=(history or transient_prefix) and bool(documents))

    def pieces_layout(self, pieces: Sequence[object], documents: Sequence[str] = (), transient: Sequence[bool] = (),
                      transient_prefix: bool = False) -> RequestLayout:
        """A prompt already rendered as pieces (`structured.render`: objects with `text` and `trusted`, where only
        trusted text may produce special tokens), with `documents` where the one `DOCUMENTS` piece is; as
        `chat_layout`, the prefix is one-off when `transient_prefix`."""
        marked = sum(1 for piece in pieces if piece is DOCUMENTS)
        if marked != (1 if documents else 0):
            raise InvalidRequestError(
                f"pass DOCUMENTS exactly once in the messages' content when there are documents (and never without "
                f"them), found {marked} for {len(documents)} document(s)."
            )
        chunk_ids = self._chunk_ids(documents, transient)
        ids = [torch.zeros(0, dtype=torch.long)]
        split = 0
        for piece in pieces:
            if piece is DOCUMENTS:
                split = len(ids)
            else:
                ids.append(self.encode(_check_unicode("a message", piece.text), template=piece.trusted))
        before, after = torch.cat(ids[:split] or ids[:1]), torch.cat(ids[:1] + ids[split:])
        return RequestLayout(before, chunk_ids, after, tuple(bool(t) for t in transient),
                             transient_prefix=transient_prefix and bool(documents))

    def _chunk_ids(self, documents: Sequence[str], transient: Sequence[bool]) -> tuple[torch.Tensor, ...]:
        """Each document's ids: its text stripped, then the chunk separator, tokenized on its own."""
        chunk_ids = [self._chunk(f"chunk {i}", chunk) for i, chunk in enumerate(documents)]
        if transient and len(transient) != len(chunk_ids):
            raise InvalidRequestError(f"transient has {len(transient)} flags for {len(chunk_ids)} documents.")
        return tuple(chunk_ids)

    def _chunk(self, name: str, text: object) -> torch.Tensor:
        """`[n]` ids of one document as a chunk: on its own, followed by the prompt's chunk separator."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequestError(f"{name} is empty or not a string; drop it or pass its text.")
        return self.encode(check_text(name, text).strip() + self.prompt.chunk_separator)

    def _render(self, messages: list[dict]) -> list[str]:
        """The chat template's render of `messages` whose contents are placeholders, split into the template's own
        text and the placeholders' places: `[template_0, template_1, ...]`, one more piece than messages."""
        placeholders = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
        if getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template(placeholders, tokenize=False, add_generation_prompt=True)
        else:
            bos = self.tokenizer.bos_token or ""
            rendered = bos + "\n\n".join(m["content"] for m in placeholders) + "\nAnswer:"
        pieces = []
        for i in range(len(messages)):
            sentinel = _SENTINEL.format(i)
            if rendered.count(sentinel) != 1:
                raise InvalidRequestError(
                    f"the chat template renders message {i} ({messages[i]['role']!r}) {rendered.count(sentinel)} "
                    "times; it must place every message's content verbatim exactly once."
                )
            head, rendered = rendered.split(sentinel)
            pieces.append(head)
        return [*pieces, rendered]

    def _segments(self, messages: list[Mapping]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(before, after)`: the ids before the documents' place and after it (all of them after, if none)."""
        template = self._render(messages)
        pieces: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long)]
        split = 0
        for text, message in zip(template, messages, strict=False):
            pieces.append(self.encode(text, template=True))
            content = message["content"]
            for part in [content] if isinstance(content, str) else content:
                if part is DOCUMENTS:
                    split = len(pieces)
                elif isinstance(part, PlacedDocuments):
                    pieces += [self._chunk(f"placed document {j}", text) for j, text in enumerate(part.texts)]
                elif part:
                    pieces.append(self.encode(_check_unicode(f"the {message['role']} message", part)))
        pieces.append(self.encode(template[-1], template=True))
        return torch.cat(pieces[:split] or pieces[:1]), torch.cat(pieces[:1] + pieces[split:])
