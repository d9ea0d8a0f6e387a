"""The stitched cache of one request and the selective forward pass over it.

Slots are laid out `prefix | chunks (in layout order) | suffix | generated tokens`; slot i holds the token at RoPE
position `positions[i]` (the global position i once the chunks are re-positioned). `kv` is
`[layers, 2, capacity, kv_heads, head_dim]`; slots `[0, length)` hold valid K/V.

`forward_rows` is the one code path for full prefill, ProphetKV's Stage I and Stage II, the baselines and decoding:
it recomputes a set of rows through the layers, writes their fresh K/V into the cache before each layer's attention,
and attends with the exact position mask (key position <= query position) over every valid slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from prophet_rag.compute.model_adapter import ModelAdapter
from prophet_rag.kernels import attention_plan, rope_shift, sparse_attention, stage1_attention

RowFilter = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""Called as filter(layer, rows, fresh_k, fresh_v) before the cache is updated; returns the row positions (indices
into `rows`) that stay recomputed from this layer on. The fresh K/V of every row is still written at this layer."""


@dataclass
class StitchedCache:
    kv: torch.Tensor
    token_ids: torch.Tensor
    """`[capacity]` int64."""
    positions: torch.Tensor
    """`[capacity]` int64 RoPE positions."""
    length: int
    prefix_len: int
    chunk_spans: tuple[tuple[int, int], ...]
    """Slot range `[start, end)` of each chunk, in layout order."""
    order: tuple[int, ...] = ()
    """`order[i]` is the request index of the chunk at `chunk_spans[i]`."""
    layer_ready: Callable[[int], None] | None = None
    """While blocks are still arriving layer by layer: called before a pass reads or writes a layer, it returns once
    that layer's blocks are in place (see `chunk_cache.PendingLayers`)."""

    @classmethod
    def empty(cls, adapter: ModelAdapter, capacity: int, dtype: torch.dtype) -> StitchedCache:
        spec = adapter.spec
        kv = torch.empty(spec.num_layers, 2, capacity, spec.num_kv_heads, spec.head_dim, dtype=dtype,
                         device=adapter.device)
        return cls(
            kv=kv,
            token_ids=torch.zeros(capacity, dtype=torch.long, device=adapter.device),
            positions=torch.arange(capacity, device=adapter.device),
            length=0,
            prefix_len=0,
            chunk_spans=(),
        )

    @property
    def capacity(self) -> int:
        return int(self.kv.shape[2])

    @property
    def context_end(self) -> int:
        """First slot after the last chunk."""
        return self.chunk_spans[-1][1] if self.chunk_spans else self.prefix_len

    def eligible_slots(self) -> torch.Tensor:
        """`[C]` the chunk slots: the only ones a selector may choose."""
        return torch.arange(self.prefix_len, self.context_end, device=self.kv.device)

    def append_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Reserve slots for `token_ids` at the end; returns their slot indices `[n]`."""
        start, end = self.length, self.length + int(token_ids.numel())
        assert end <= self.capacity, f"stitched cache overflow: {end} > {self.capacity}"
        self.token_ids[start:end] = token_ids
        self.length = end
        return torch.arange(start, end, device=self.kv.device)


def stitched_layout(adapter: ModelAdapter, prefix_ids: torch.Tensor, chunk_ids: Sequence[torch.Tensor],
                    order: Sequence[int], capacity: int, dtype: torch.dtype) -> StitchedCache:
    """A cache of `capacity` slots holding the prefix and the chunks in `order`, tokens and spans set, KV not yet
    filled (the chunk cache writes each block into its slots); the suffix and generated tokens are appended after."""
    cache = StitchedCache.empty(adapter, capacity, dtype)
    cache.append_tokens(prefix_ids.to(adapter.device))
    cache.prefix_len = int(prefix_ids.numel())
    spans = []
    for i in order:
        slots = cache.append_tokens(chunk_ids[i].to(adapter.device))
        spans.append((int(slots[0]), int(slots[-1]) + 1))
    cache.chunk_spans, cache.order = tuple(spans), tuple(order)
    return cache


def reorder(adapter: ModelAdapter, cache: StitchedCache, order: Sequence[int], sink_len: int) -> None:
    """Lay `cache` out again in `order`, in its own buffers, and place its blocks at their global positions.

    `cache` holds the request in another order with its blocks as stored (parallel geometry, every layer in): a
    method that scored chunks before ordering them; or at its slots' positions already (`lay_out_by_layer`), left as
    it is when `order` is its own. The result is what `stitched_layout` in `order`, a copy of every
    block and `reposition` give, without a second cache (a fresh one costs more in page faults than the copy
    itself). Every key is read and written once, rotated on the way (`rope_shift`'s `source`): a chunk that stays
    is rotated in place; one that moves towards the front is moved piece by piece, each piece no longer than the
    distance moved, so no piece overwrites keys not read yet; the others (moved back, or forward by little) go
    through a copy. Layer 0 is recomputed for every chunk token, as `reposition` does. Slots past the context (the
    scoring pass's suffix) are dropped.
    """
    assert sorted(order) == sorted(cache.order), "order must hold every chunk of the request once"
    where = dict(zip(cache.order, cache.chunk_spans, strict=True))
    moves, start = [], cache.prefix_len
    for i in order:
        src, n = where[i][0], where[i][1] - where[i][0]
        moves.append((src, start, n))
        start += n
    cache.chunk_spans, cache.order = tuple((dst, dst + n) for _, dst, n in moves), tuple(order)
    cache.length, cache.layer_ready = cache.context_end, None
    ids = cache.token_ids[cache.prefix_len : cache.context_end].clone()
    stored = cache.positions[cache.prefix_len : cache.context_end].clone()
    slots = torch.arange(cache.prefix_len, cache.context_end, device=stored.device)
    if all(src == dst for src, dst, _ in moves) and torch.equal(stored, slots):
        return
    # Layer 0 is recomputed below: only layers 1.. are moved and rotated.
    keys, values = cache.kv[1:, 0], cache.kv[1:, 1]

    def put(src: int, dst: int, n: int, source: torch.Tensor | None) -> None:
        """Slots `[dst, dst + n)` get the block at `[src, src + n)` (from `source` when given), rotated."""
        delta = torch.arange(dst, dst + n, device=stored.device) - stored[src - cache.prefix_len :][:n]
        cache.token_ids[dst : dst + n] = ids[src - cache.prefix_len :][:n]
        if source is not None:
            values[:, dst : dst + n] = source[:, 1]
            rope_shift(keys[:, dst : dst + n], delta, adapter.inv_freq, interleaved=True, source=source[:, 0])
        elif src == dst:
            rope_shift(keys[:, dst : dst + n], delta, adapter.inv_freq, interleaved=True)
        else:
            values[:, dst : dst + n] = values[:, src : src + n]
            rope_shift(keys[:, dst : dst + n], delta, adapter.inv_freq, interleaved=True,
                       source=keys[:, src : src + n])

    forward = [m for m in moves if m[1] < m[0] and 4 * (m[0] - m[1]) >= m[2]]
    copied = [m for m in moves if m[1] != m[0] and m not in forward]
    # Copies first, before any slot is written; then the blocks moved forward, front first (a block's new slots end
    # before the next one's old slots start); the copies last, into slots whose blocks have all been read.
    saved = [cache.kv[1:, :, src : src + n].clone() for src, _, n in copied]
    stays = [m for m in moves if m[1] == m[0]]
    lead = 0  # the chunks that stay at the front are rotated in one call
    while lead < len(stays) and stays[lead][1] == cache.prefix_len + sum(m[2] for m in stays[:lead]):
        lead += 1
    if lead:
        put(cache.prefix_len, cache.prefix_len, sum(m[2] for m in stays[:lead]), None)
    for src, dst, n in stays[lead:]:
        put(src, dst, n, None)
    for src, dst, n in forward:
        step = src - dst
        for piece in range(0, n, step):
            put(src + piece, dst + piece, min(step, n - piece), None)
    for (src, dst, n), block in zip(copied, saved, strict=True):
        put(src, dst, n, block)
    cache.positions[cache.prefix_len : cache.context_end] = slots
    _repair_layer0(adapter, cache)


def lay_out_by_layer(adapter: ModelAdapter, cache: StitchedCache) -> tuple[torch.Tensor, Callable[[int], None]]:
    """Declare `cache`, assembled in request order with its blocks as stored (parallel geometry), laid out at its
    slots' positions, a layer at a time: returns the positions it had (for a pass that still reads it as it was) and
    `place(layer)`, which places that layer as `reorder` into the same order does (layer 0 recomputed, the others'
    keys rotated). Every layer must be placed once before a pass reads it at the new positions; `reorder` into
    request order then leaves the cache as it is."""
    assert cache.order == tuple(range(len(cache.order))), "the blocks in request order"
    context = slice(cache.prefix_len, cache.context_end)
    stored = cache.positions.clone()
    cache.positions[context] = torch.arange(cache.prefix_len, cache.context_end, device=stored.device)
    delta = cache.positions[context] - stored[context]

    def place(layer: int) -> None:
        if layer == 0:
            _repair_layer0(adapter, cache)
        else:
            rope_shift(cache.kv[layer : layer + 1, 0, context], delta, adapter.inv_freq, interleaved=True)

    return stored, place


def reposition(adapter: ModelAdapter, cache: StitchedCache, sink_len: int, global_positions: bool = True,
               layers: range | None = None) -> None:
    """Place filled chunk blocks, each computed at positions `sink_len ... sink_len + n - 1`, in the request.

    With `global_positions`, chunk keys are delta-rotated to their slots' positions and layer 0's K/V is
    recomputed for every chunk token (it depends only on token and position, so this is exact and cheap).
    Without, each chunk keeps the positions it was computed at (the parallel geometry, where every chunk sits at
    the same distance from the question: used to score chunks before reordering them). `layers` (default: all)
    places only those layers, for blocks that arrive layer by layer.
    """
    context = slice(cache.prefix_len, cache.context_end)
    if not global_positions:
        cache.positions[context] = _stored_positions(cache, sink_len)
        return
    layers = range(adapter.spec.num_layers) if layers is None else layers
    delta = cache.positions[context] - _stored_positions(cache, sink_len)
    rope_shift(cache.kv[layers.start : layers.stop, 0, context], delta, adapter.inv_freq, interleaved=True)
    if 0 in layers:
        _repair_layer0(adapter, cache)


def _repair_layer0(adapter: ModelAdapter, cache: StitchedCache) -> None:
    """Layer 0's K/V of every chunk token from its id and position alone (exact: layer 0 sees no other token)."""
    context = slice(cache.prefix_len, cache.context_end)
    ids, positions = cache.token_ids[context], cache.positions[context]
    with torch.no_grad():
        hidden = adapter.embed(ids)
        k, v = adapter.kv(0, hidden, adapter.rope_tables(positions, hidden.dtype))
    cache.kv[0, 0, context], cache.kv[0, 1, context] = k, v


class LayerGate:
    """`StitchedCache.layer_ready` for blocks arriving layer by layer: waits for each layer in turn (`arrived`) and
    places it (`place(range)`, the re-rotation and layer-0 repair of `reposition`) before any pass touches it."""

    def __init__(self, arrived: Callable[[int], None], place: Callable[[range], None]) -> None:
        self._arrived, self._place = arrived, place
        self._next = 0

    def __call__(self, layer: int) -> None:
        while self._next <= layer:
            self._arrived(self._next)
            self._place(range(self._next, self._next + 1))
            self._next += 1


def _stored_positions(cache: StitchedCache, sink_len: int) -> torch.Tensor:
    return torch.cat([torch.arange(sink_len, sink_len + end - start, device=cache.positions.device)
                      for start, end in cache.chunk_spans])


@dataclass(frozen=True)
class Scoring:
    """Scores a pass accumulates on the way (ProphetKV's Stage I): on `layers`, the rows' attention over the context
    keys `[0, context_end)` is added into `prophet` and/or `norm` (see `kernels.stage1_attention`)."""

    layers: frozenset[int]
    prophet: torch.Tensor | None
    """`[>= context_end]` fp32 accumulator, or None."""
    norm: torch.Tensor | None
    context_end: int
    """Context slots scored; under CUDA-graph replay the bucket's maximum, the real count being in `bounds`."""
    bounds: torch.Tensor | None = None
    """None, or int32 `[3]` on the device: (rows to score, context_end, keys) (see `kernels.stage1_attention`)."""


@torch.inference_mode()
def forward_rows(
    adapter: ModelAdapter,
    cache: StitchedCache,
    rows: torch.Tensor,
    *,
    scoring: Scoring | None = None,
    row_filter: tuple[int, RowFilter] | None = None,
    last_layer: int | None = None,
    keys: int | None = None,
    outputs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute `rows` (slot indices `[R]`, sorted) through the layers.

    Returns the final hidden states of the rows still recomputed at the end and those rows. `last_layer` stops after
    that layer (the hidden states are then that layer's output), for scoring passes that need no more. The rows
    attend over the first `keys` slots (default: the cache's length); slots past the length keep their own
    positions, later than any row's, so a larger `keys` (a CUDA graph's bucket) changes nothing.

    `outputs` (not with `scoring`): only the last `outputs` rows' final hidden states are wanted, as by a prefill that
    needs the next token's logits alone. Every row still writes its K/V in every layer, but the others skip the last
    layer's attention and MLP (a 30th of a SmolLM2 selective forward), and the hidden states returned are the last
    `outputs` rows' (the rows returned are all the rows recomputed to the end).
    """
    assert outputs is None or scoring is None, "a scoring pass needs every row's attention"
    n = cache.length if keys is None else keys
    keys_k, positions = cache.kv[:, 0, :n], cache.positions[:n]
    keys_v = cache.kv[:, 1, :n]
    hidden = adapter.embed(cache.token_ids[rows])
    row_pos = positions[rows]
    # Positions are the same in every layer: RoPE tables and the attention plan are worked out once.
    rope = adapter.rope_tables(row_pos, hidden.dtype)
    kv_heads = adapter.spec.num_kv_heads
    group = adapter.spec.num_heads // kv_heads
    plan = attention_plan(row_pos, positions, hidden.dtype, group, kv_heads)
    stop = adapter.spec.num_layers - 1 if last_layer is None else last_layer
    for layer in range(stop + 1):
        if cache.layer_ready is not None:
            cache.layer_ready(layer)
        q, k, v = adapter.qkv(layer, hidden, rope)
        if row_filter is not None and row_filter[0] == layer:
            keep = row_filter[1](layer, rows, k, v)
            cache.kv[layer, 0, rows], cache.kv[layer, 1, rows] = k, v
            rows, row_pos, hidden, q = rows[keep], row_pos[keep], hidden[keep], q[keep]
            rope = adapter.rope_tables(row_pos, hidden.dtype)
            plan = attention_plan(row_pos, positions, hidden.dtype, group, kv_heads)
        else:
            cache.kv[layer, 0, rows], cache.kv[layer, 1, rows] = k, v
        if layer == stop and outputs is not None and outputs < hidden.shape[0]:
            tail = slice(hidden.shape[0] - outputs, None)
            hidden, q, row_pos = hidden[tail], q[tail], row_pos[tail]
            plan = attention_plan(row_pos, positions, hidden.dtype, group, kv_heads)
        if scoring is not None and layer in scoring.layers:
            out = stage1_attention(q, keys_k[layer], keys_v[layer], row_pos, positions, adapter.scale,
                                   scoring.context_end, scoring.prophet, scoring.norm, scoring.bounds, plan)
        else:
            out = sparse_attention(q, keys_k[layer], keys_v[layer], row_pos, positions, adapter.scale, plan)
        hidden = adapter.finish_layer(layer, hidden, out)
    return hidden, rows
