"""What a request returns: the answer text and the statistics of how it was produced."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class RequestStats:
    """Token counts and timings of one request. Times are seconds; TTFT is request start to first token.

    TTFT splits into `load_s` (store reads and missing-chunk prefill), `rerotate_s` (RoPE re-positioning and the exact
    layer-0 K/V), `select_s` (scoring, e.g. ProphetKV's Stage I) and `recompute_s` (the selective forward over the
    selected tokens and the suffix, which yields the first token's logits).
    """

    method: str
    ratio: float
    prefix_tokens: int
    context_tokens: int
    suffix_tokens: int
    recomputed_tokens: int
    cache_hits: int
    cache_misses: int
    ttft_s: float
    load_s: float
    rerotate_s: float
    select_s: float
    recompute_s: float
    new_tokens: int = 0
    decode_s: float = 0.0
    cached_tokens: int = 0
    """Prompt tokens whose KV came from a cache and was used as loaded, not recomputed: the prefix and the chunks
    found in a tier, less the recomputed tokens among them, and the `prefix_cache_tokens` (full prefill of a prompt
    no earlier request started: 0)."""
    prefix_cache_tokens: int = 0
    """Leading prompt tokens whose KV came from the conversation prefix cache (`PrefixCacheConfig`): an earlier
    request's prompt and answer, not computed again."""

    @property
    def reused_tokens(self) -> int:
        return self.context_tokens - self.recomputed_tokens

    def to_dict(self) -> dict:
        """The statistics' one shape: what the framework integrations carry under "prophet_rag"."""
        return {**asdict(self), "reused_tokens": self.reused_tokens}


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: tuple[int, ...]
    stats: RequestStats
    recomputed_positions: torch.Tensor = field(repr=False)
    """`[recomputed_tokens]` int64 global positions of the recomputed context tokens, sorted."""
    first_token_logits: torch.Tensor | None = field(default=None, repr=False)
    """`[vocab]` fp32 logits of the first generated token, when requested."""
    chunk_order: tuple[int, ...] = ()
    """The order the chunks were laid out in (indices into the request's chunks); reordering methods change it."""
