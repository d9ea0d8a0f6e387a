"""Decoding after the first token: one step, n steps (gpt-fast style), sampling, and incremental detokenization.

`decode` yields token ids lazily: a consumer that stops iterating (a stop string was found) costs no further forward
pass. `TextAssembler` turns generated ids into text deltas safe to show: it holds back a trailing partial UTF-8
character and any tail that could still grow into a stop string, and cuts the text at the first stop string.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Protocol

import torch

from prophet_rag.compute.model_adapter import ModelAdapter
from prophet_rag.compute.stitched import StitchedCache, forward_rows
from prophet_rag.config import GenerationConfig


@torch.inference_mode()
def decode_one(adapter: ModelAdapter, cache: StitchedCache, token: int) -> torch.Tensor:
    """Append `token` to the cache, run it through every layer; returns the next token's `[vocab]` fp32 logits."""
    rows = cache.append_tokens(torch.tensor([token], device=adapter.device))
    hidden, _ = forward_rows(adapter, cache, rows)
    return adapter.logits(hidden)[-1]


class LogitsConstraint(Protocol):
    """A per-request rule on which token may come next (a grammar: `structured.TokenConstraint`).

    `mask(logits)` sets forbidden tokens' `[vocab]` fp32 logits to -inf (in place) and returns them; `advance(token)`
    records the token taken; `is_finished()` says no further token is allowed.
    """

    def mask(self, logits: torch.Tensor) -> torch.Tensor: ...

    def advance(self, token: int) -> None: ...

    def is_finished(self) -> bool: ...


@torch.inference_mode()  # a constraint masks the logits in place, and they are inference tensors
def next_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None,
               constraint: LogitsConstraint | None = None) -> int:
    """One request's next token from its `[vocab]` fp32 logits: masked by its constraint, sampled, recorded.

    The one place a token is chosen: serial decoding and a batched scheduler both call it per request, so a
    request's tokens do not depend on what it was batched with.
    """
    if constraint is not None:
        logits = constraint.mask(logits)
    token = sample(logits, config, generator)
    if constraint is not None:
        constraint.advance(token)
    return token


class Decoding:
    """One request's decoding rules, whichever loop runs its forward passes (`decode` here, the batcher's steps):
    its sampling generator (seeded per request), its constraint, its EOS ids and its token budget.

    `take(logits)` chooses the next token with `next_token`; None means the request ends here (an EOS id, not
    emitted). After a token, `finished` says whether it was the last one (the budget is spent or the constraint
    allows nothing more), so no forward pass is needed for it.
    """

    def __init__(self, config: GenerationConfig, eos: Collection[int], constraint: LogitsConstraint | None = None):
        self.config, self.eos, self.constraint = config, frozenset(eos), constraint
        self.generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        self.produced = 0
        self.finished = False

    def take(self, logits: torch.Tensor) -> int | None:
        assert not self.finished, "take after the request finished"
        token = next_token(logits, self.config, self.generator, self.constraint)
        if token in self.eos:
            self.finished = True
            return None
        self.produced += 1
        self.finished = self.produced == self.config.max_new_tokens or (
            self.constraint is not None and self.constraint.is_finished())
        return token


def decode(adapter: ModelAdapter, cache: StitchedCache, logits: torch.Tensor, config: GenerationConfig,
           eos: Collection[int], constraint: LogitsConstraint | None = None) -> Iterator[int]:
    """Sample up to `config.max_new_tokens` tokens, starting from the first token's `logits`; ends at an EOS id
    (not yielded) or when `constraint` allows nothing more. One request alone: `batcher` decodes many together."""
    state = Decoding(config, eos, constraint)
    while (token := state.take(logits)) is not None:
        yield token
        if state.finished:
            return
        logits = decode_one(adapter, cache, token)


def sample(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> int:
    """Next token id from `[vocab]` fp32 logits: argmax when temperature is 0, else top-k / top-p sampling."""
    if config.temperature == 0.0:
        return int(torch.argmax(logits))
    scores = logits / config.temperature
    if config.top_k > 0:
        kth = torch.topk(scores, min(config.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens before it already cover top_p; the most likely token always stays.
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= config.top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class TextAssembler:
    """Accumulates generated token ids and yields the text that is final."""

    def __init__(self, tokenizer, stop: tuple[str, ...], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        """False keeps special tokens in the text (a tool-call format's `[TOOL_CALLS]`, `<|python_tag|>`)."""
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add a token; return the newly final text (possibly empty). Sets `stopped` at a stop string."""
        self.ids.append(token_id)
        text = self._text()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(text[:cut])
        safe = len(text)
        if text.endswith("\ufffd"):
            safe -= 1  # an incomplete multi-byte character: wait for its other bytes
        head = text[:safe]
        hold = max((k for s in self.stop for k in range(1, min(len(s), safe + 1)) if head.endswith(s[:k])), default=0)
        return self._emit(head[: safe - hold])

    def finish(self) -> str:
        """Flush what was held back when generation ends without a stop string."""
        if self.stopped:
            return ""
        return self._emit(self._text())

    def _emit(self, final: str) -> str:
        if not final.startswith(self.emitted) or len(final) <= len(self.emitted):
            return ""
        delta, self.emitted = final[len(self.emitted) :], final
        return delta
