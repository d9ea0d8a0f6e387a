"""`prophet_focus`, the default method: ProphetKV's Stage I in the parallel geometry, the chunks the question's
attention is anchored on moved next to it and recomputed whole, windows around the strongest anchors when they do not
fit, and ProphetKV's token scores for any rest. When the anchors are spread over many chunks, or the question's
attention does not confirm its words' match in the best chunk (`Selection.plain`), it is plain ProphetKV: no chunk
moves and the question's attention in the retrieval layout picks the tokens.
"""

from __future__ import annotations

import torch

from prophet_rag.compute.scoring import query_relevance, query_relevance_twice
from prophet_rag.compute.stitched import StitchedCache
from prophet_rag.selection.request import Assemble, Plan, Selection, attention_plan, selected, top_slots


def focus_order(selection: Selection, assemble: Assemble) -> list[int]:
    """The chunks the question's attention is anchored on (at least `FOCUS_SHARE` of the best) move last, next to
    the question, in their retrieval order; the others keep theirs. No chunk moves when the question shares no word
    with any chunk, nor when ProphetKV's plan applies (`Selection.plain`: anchors spread over many chunks, or the
    question's attention on its words in the best chunk no more than an average token's). Moving only the best one
    kept multi-key lookups but lost multi-value and multi-query questions, whose answers span chunks; moving every
    chunk by a lexical prior (`prophet_plus`) over-moves look-alikes.

    The question is scored in the parallel geometry (each chunk at the positions it was computed at), where no chunk
    sits nearer the question than another (see `anchored_relevance`). When the question's words make ProphetKV's
    plan certain or possible (`Selection.plain_likely`: no chunk holds them, or many do), the same forward also
    scores it in the retrieval layout, which that plan reads (`query_relevance_twice`): on the 4K-token bench the
    fallback's second Stage I then costs its attention alone.
    """
    identity = list(range(len(selection.chunk_ids)))
    cache = assemble(identity, False)
    suffix_rows = cache.append_tokens(selection.suffix_ids.to(cache.kv.device))
    with torch.inference_mode():
        if selection.plain_likely:
            selection.parallel, selection.laid_out = query_relevance_twice(selection.adapter, cache, suffix_rows)
        else:
            selection.parallel = query_relevance(selection.adapter, cache, suffix_rows, "prophet", None)
    focus = frozenset() if selection.plain else selection.focus
    return [i for i in identity if i not in focus] + [i for i in identity if i in focus]


def anchored_in_place(selection: Selection, assemble: Assemble) -> list[int]:
    """`focus_order`'s parallel Stage I without its move: every chunk keeps its retrieval place, so the layout is
    full prefill's. For questions whose answer needs a chain of passages, where moving the first hop's chunks away
    from the passages they lead to may cost more than being nearer the question gains."""
    focus_order(selection, assemble)
    return list(range(len(selection.chunk_ids)))


def anchor_window(weights: torch.Tensor, size: int) -> tuple[int, int]:
    """`[start, end)` of the `size` consecutive tokens of a chunk centred on its strongest anchor (the largest of
    its tokens' anchored `weights` `[n]`), moved inward at the chunk's edges."""
    n = int(weights.numel())
    size = min(size, n)
    centre = int(torch.argmax(weights))
    start = min(max(centre - size // 2, 0), n - size)
    return start, start + size


def focus_plan(selection: Selection, cache: StitchedCache, suffix_rows: torch.Tensor, budget: int) -> Plan:
    """Whole chunks by anchored relevance, most relevant first, while they fit in the budget (the focus chunk, moved
    last, first of all). The focus chunks that did not fit share what is left equally, each as a window around its
    strongest anchor: a question whose answer spans chunks (several values, several keys) needs the answer's
    sentence in each, and ProphetKV's scattered tokens rarely hold it. Any budget the windows leave goes on the
    parallel Stage I's attention mass.

    With the anchors spread over many chunks (real passages that all name the question's entity), whole chunks and
    windows leave the cross-attention of every other passage stale: ProphetKV's token scores in the layout the answer
    is computed in are then the plan. So too when the question's words match a passage but its attention does not
    go there (real passages under an instruction: the lift was 0.25-0.65 where the focus plan lost to ProphetKV)."""
    if selection.plain:
        if selection.laid_out is None:
            return attention_plan(selection, cache, suffix_rows, budget)
        assert cache.order == tuple(range(len(cache.order))), "the retrieval layout the scores were taken in"
        return selected(top_slots(selection.laid_out, budget, cache.prefix_len), suffix_rows)
    lengths = [int(ids.numel()) for ids in selection.chunk_ids]
    starts = torch.cumsum(torch.tensor([0, *lengths]), 0).tolist()
    # Token scores to layout order: the chunk at layout position j is chunk cache.order[j] of the request.
    index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in cache.order]).to(cache.kv.device)
    scores = selection.parallel_scores[index].clone()
    weights = selection.anchored_tokens[index]
    relevance = selection.anchored[list(cache.order)]
    ranked = torch.sort(relevance, descending=True, stable=True).indices.tolist()
    used, whole = 0, 0
    for j in ranked:
        start, end = cache.chunk_spans[j]
        if relevance[j] <= 0 or used + (end - start) > budget:
            break
        scores[start - cache.prefix_len : end - cache.prefix_len] = float("inf")
        used, whole = used + end - start, whole + 1
    partial = [j for j in ranked[whole:] if cache.order[j] in selection.focus]
    for j in partial:
        start, end = (slot - cache.prefix_len for slot in cache.chunk_spans[j])
        low, high = anchor_window(weights[start:end], (budget - used) // len(partial))
        scores[start + low : start + high] = float("inf")
    return selected(top_slots(scores, budget, cache.prefix_len), suffix_rows)
