"""One document's KV cache, computed in isolation, as stored and loaded.

Layout: `kv` is `[layers, 2, tokens, kv_heads, head_dim]` (index 0 of dim 1 is K, 1 is V). Keys carry RoPE at
`positions`, the positions the chunk was computed at (behind the model's sink prefix), so re-positioning a chunk
is one delta rotation by `new_position - positions`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkKV:
    token_ids: torch.Tensor
    """`[tokens]` int64: the chunk's token ids."""
    positions: torch.Tensor
    """`[tokens]` int64: the RoPE positions the keys were computed at."""
    kv: torch.Tensor
    """`[layers, 2, tokens, kv_heads, head_dim]`."""

    def __post_init__(self) -> None:
        shape = tuple(self.kv.shape)
        assert self.kv.dim() == 5 and shape[1] == 2, f"kv must be [L, 2, T, H_kv, D], got {shape}"
        assert self.token_ids.shape == self.positions.shape == (self.kv.shape[2],), (
            f"token_ids {tuple(self.token_ids.shape)} and positions {tuple(self.positions.shape)} "
            f"must be [T={shape[2]}]"
        )

    @property
    def num_tokens(self) -> int:
        return int(self.kv.shape[2])

    def to(self, device: torch.device | str) -> ChunkKV:
        """This chunk with its tensors on `device` (itself when they already are)."""
        if self.kv.device == torch.device(device):
            return self
        return ChunkKV(self.token_ids.to(device), self.positions.to(device), self.kv.to(device))

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()
