"""Relevance signals over the request's token ids: which chunks share the question's rare words, and where the
question's attention is anchored on them. The selection methods read them through `request.Selection`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def lexical_relevance(chunks: list[torch.Tensor], query_ids: torch.Tensor) -> torch.Tensor:
    """`[m]` how strongly each chunk shares the query's rare tokens: sum of the query tokens' in-request IDF.

    IDF is taken over the request's own chunks, so tokens every chunk has (template words, shared phrasing) count
    for almost nothing and a name or number found in one chunk counts most.
    """
    m = len(chunks)
    present = [torch.isin(query_ids.unique(), chunk) for chunk in chunks]
    df = torch.stack(present).sum(dim=0).to(torch.float32)
    idf = torch.log((m + 1) / (df + 0.5))
    return torch.stack([(idf * hit).sum() for hit in present])


def anchor_mask(chunks: list[torch.Tensor], query_ids: torch.Tensor) -> torch.Tensor:
    """`[sum of chunk lengths]` True on each chunk token the question itself contains and that is in at most three
    quarters of the chunks, other than a chunk's first token (`not_chunk_starts`): the tokens `anchored_weights` can
    weigh."""
    words = query_ids.unique()
    df = torch.stack([torch.isin(words, chunk) for chunk in chunks]).sum(dim=0)
    rare = words[df <= 0.75 * len(chunks)]
    return torch.isin(torch.cat(chunks), rare) & not_chunk_starts(chunks)


def not_chunk_starts(chunks: list[torch.Tensor]) -> torch.Tensor:
    """`[sum of chunk lengths]` False on each chunk's first token. In the parallel geometry every chunk's first token
    sits right after the shared sink, where a model may put an attention sink: on one MuSiQue case Qwen2.5-0.5B gave
    15% of the question's attention to a passage's first token, "in", one of the question's words, and 14% to another
    passage's first token; counted as an anchor, it made that passage the focus with a lift of 129 (4.5 at most on
    the 28 other cases), and moving it took the default's KL to full prefill from ProphetKV's 0.23 to 1.02."""
    return torch.cat([torch.arange(int(chunk.numel())) > 0 for chunk in chunks])


def anchor_lift(mass: torch.Tensor, mask: torch.Tensor) -> float:
    """The question's attention `mass` per token on the `mask`ed tokens (one chunk's anchors), over its mass per
    token on the whole context: 1 when its own words get the attention of an average context token. 0 without
    anchors."""
    if not bool(mask.any()):
        return 0.0
    return float(mass[mask].mean() / mass.mean())


def anchored_weights(chunks: list[torch.Tensor], query_ids: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """`[sum of chunk lengths]` each chunk token's share of the question's attention `mass` (same layout: the chunks
    end to end, in `chunks` order) when the question itself contains the token, weighted by the token's in-request
    IDF (see `lexical_relevance`; words in over three quarters of the chunks weigh nothing), else 0 (and 0 on each
    chunk's first token, `not_chunk_starts`): attention anchored on the names and numbers the question asks about."""
    m = len(chunks)
    words = query_ids.unique()
    df = torch.stack([torch.isin(words, chunk) for chunk in chunks]).sum(dim=0).to(torch.float32)
    # Words in over three quarters of the chunks (the documents' shared phrasing) anchor nothing.
    idf = torch.where(df <= 0.75 * m, torch.log((m + 1) / (df + 0.5)), torch.zeros_like(df))
    hit = torch.cat(chunks)[:, None] == words[None, :]  # [C, |words|]
    weight = (hit.to(torch.float32) * idf).sum(dim=1) * not_chunk_starts(chunks)
    return mass.to(torch.float32) * weight.to(mass.device)


def anchored_relevance(chunks: list[torch.Tensor], query_ids: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """`[m]` each chunk's `anchored_weights` summed: the question's attention mass on the chunk's rare words that
    the question itself contains.

    Neither signal alone finds the answer's chunk reliably on both of our models: shared rare words alone picked the
    answer's `multi_key` chunk 10/12 times on SmolLM2 and 9/10 on Qwen2.5-0.5B, attention mass per chunk 1/12 and
    2/10 (it follows recency and sink tokens), the peak attention probability 10/12 and 1/10. Attention mass on the
    question's rare words picked it 12/12 and 10/10 (docs/RESULTS.md).
    """
    return chunk_sums(anchored_weights(chunks, query_ids, mass), chunks)


def chunk_sums(values: torch.Tensor, chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    """`[m]` sums of per-token `values` `[sum of chunk lengths]` over each chunk's tokens, the chunks end to end."""
    return torch.stack([part.sum() for part in torch.split(values, [int(chunk.numel()) for chunk in chunks])])


FOCUS_SHARE = 0.2
"""`prophet_focus` moves every chunk whose anchored relevance is at least this share of the best one. At half the
best, the second chunk of a two-chunk answer stayed behind (on Qwen2.5-0.5B `multi_value` it was at 0.12-0.40 of
the best in 10 of 12 cases): 0.56 against 0.75 at this share over 24 cases (docs/RESULTS.md)."""

FOCUS_SPREAD = 0.5
"""When the chunks at `FOCUS_SHARE` of the best are more than one and at least this share of all chunks, the
question's words anchor nothing in particular and `prophet_focus` behaves as plain ProphetKV. On real multi-hop
passages (MuSiQue) the question's entity recurs across passages: 5-10 of 10 chunks were at a fifth of the best on
development cases 0-17, against 1-4 of 8-10 on the generated tasks (both models); there, recomputing focus chunks
whole and moving them ended farther from full prefill than ProphetKV's token scores. Later cases had as few as 4 of
10 and still lost: the focus size alone does not separate them; `FOCUS_LIFT` does (docs/RESULTS.md, "Real multi-hop
documents")."""


FOCUS_LIFT = 0.66
"""`prophet_focus` moves chunks only when the question's attention per token on its own rare words in the best
anchored chunk is at least this multiple of its attention on an average context token (`anchor_lift`): the model's
attention confirms the lexical match. On the generated tasks (SmolLM2, seed 0, 8 cases each of `multi_key`,
`single_needle`, `multi_query`, `multi_value`, 8-10 chunks of 150-300 tokens) the lift was 1.04-4.55, and 0.67-0.92 on
`multi_key` with 8 documents of ~60 tokens (the slow quality test's set-up: short contexts lift less); on the real
MuSiQue passages (development cases) where the default moved chunks and lost to ProphetKV it was 0.25-0.65: the
question's words match a passage but its attention does not go there (docs/RESULTS.md, "Real multi-hop documents").
The margin to the short set-up is thin. The suffix's attention is averaged over all its rows, so a long instruction
around the question lowers the lift."""


def default_infoflow_layers(num_layers: int) -> tuple[int, ...]:
    """Four consecutive layers from 70% depth: InfoFlow's {22..25} of a 32-layer model, scaled to the model."""
    start = min(int(0.7 * num_layers), max(num_layers - 4, 0))
    return tuple(range(start, min(start + 4, num_layers)))
