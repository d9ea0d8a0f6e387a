"""Run a Hugging Face decoder's own modules layer by layer, for any subset of token rows.

The engine needs Q/K/V and attention for arbitrary rows (recomputed tokens, the suffix, one decoded token), so it
drives the model's embedding, attention projections, norms and MLPs itself instead of calling `model.forward`.
Supported: the Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm) families with GQA, and RoPE `default`,
`linear` and `llama3` scaling. Anything the engine would run wrongly is refused at construction with
`UnsupportedModelError`.

Row tensors are token-major: hidden `[rows, hidden]`, q `[rows, q_heads, head_dim]`, k/v `[rows, kv_heads, head_dim]`.

Queries and keys leave the adapter with their channels interleaved: transformers rotates channel i with channel
i + head_dim/2, and the adapter reorders them as (0, D/2, 1, D/2 + 1, ...) after RoPE, so each rotated pair sits
side by side. Every q.k product is the same sum in another order; in exchange a cached key moves to a new position
with one complex multiplication per pair (see `kernels.rope_shift`), which is what re-positioning chunks costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prophet_rag.errors import UnsupportedModelError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# RoPE variants whose rotation angle is exactly position * inv_freq, so a cached key moves by one delta rotation.
# dynamic scaling changes inv_freq with sequence length; yarn and longrope fold a magnitude factor into cos/sin.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelSpec:
    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    dtype: torch.dtype


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) or "default"


def _check_supported(model) -> None:
    config = model.config
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model_type {family!r} is not supported; prophet-rag runs {', '.join(SUPPORTED_FAMILIES)} models. "
            "Use one of those families or open an issue for this architecture."
        )
    rope_type = _rope_type(config)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE scaling {rope_type!r} is not supported (cached keys cannot be re-positioned exactly under it); "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    partial = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    rope_params = getattr(config, "rope_parameters", None) or {}
    partial = rope_params.get("partial_rotary_factor", partial)
    if partial != 1.0:
        raise UnsupportedModelError(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported.")
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", family == "mistral")
    layer_types = getattr(config, "layer_types", None) or ()
    if (window is not None and uses_window and window < config.max_position_embeddings) or (
        "sliding_attention" in layer_types
    ):
        raise UnsupportedModelError(
            f"sliding-window attention (sliding_window={window}) is not supported: the engine attends over the "
            "whole stitched cache. Use a checkpoint without a sliding window."
        )
    rotary = model.model.rotary_emb
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise UnsupportedModelError("RoPE with an attention scaling factor (YaRN-style) is not supported.")


Linear = Callable[[torch.Tensor], torch.Tensor]
"""A projection `[..., in] -> [..., out]`."""


def _packs_weights(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether projections run on weights packed once for oneDNN: bf16 on a CPU, where torch's matmul lays the weight
    out again on every call. For the few rows of decode steps that costs more than the product: SmolLM2's four
    projection shapes, one thread, 1-16 rows, 0.46-0.52 ms a layer plain against 0.27-0.32 ms packed, the same bits
    (benchmarks/RESULTS.md, "Packed bf16 weights"). fp32 matmuls are faster unpacked."""
    return (dtype == torch.bfloat16 and device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _packed(module: torch.nn.Linear) -> Linear:
    """`module` as a function whose weight is packed into oneDNN's blocked layout (a copy: the module keeps its own
    for the model's `forward`)."""
    packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
    bias = None if module.bias is None else module.bias.detach()

    def linear(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    return linear


def _linears(module: torch.nn.Module, names: tuple[str, ...], pack: bool) -> dict[str, Linear]:
    return {name: _packed(getattr(module, name)) if pack else getattr(module, name) for name in names}


class ModelAdapter:
    """Explicit per-layer computation over a causal LM of a supported family."""

    def __init__(self, model) -> None:
        _check_supported(model)
        self.model = model.eval()
        self.body = model.model
        self.layers = list(self.body.layers)
        config = model.config
        attn = self.layers[0].self_attn
        head_dim = attn.head_dim
        self.spec = ModelSpec(
            family=config.model_type,
            num_layers=len(self.layers),
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings,
            dtype=next(model.parameters()).dtype,
        )
        self.scale = float(attn.scaling)
        inv_freq = self.body.rotary_emb.inv_freq.to(torch.float32)
        if inv_freq.numel() * 2 != head_dim:
            raise UnsupportedModelError(
                f"RoPE covers {inv_freq.numel() * 2} of {head_dim} head channels; partial rotary is not supported."
            )
        self.inv_freq = inv_freq
        self.has_qk_norm = hasattr(attn, "q_norm")
        pack = _packs_weights(self.spec.dtype, inv_freq.device)
        with torch.no_grad():
            self._attn = [_linears(block.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj"), pack)
                          for block in self.layers]
            self._mlp = [_linears(block.mlp, ("gate_proj", "up_proj", "down_proj"), pack) for block in self.layers]
            self._lm_head = _packed(model.lm_head) if pack else model.lm_head
        self.packed_weights = pack
        """Whether projections run on weights packed for oneDNN (`_packs_weights`)."""

    @property
    def device(self) -> torch.device:
        return self.inv_freq.device

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`[..., rows]` ids -> `[..., rows, hidden]`."""
        return self.body.embed_tokens(token_ids)

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)` `[..., rows, 1, head_dim]` in `dtype` for `positions` `[..., rows]`, as transformers makes
        them; the same for every layer, so a pass over the layers makes them once."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[..., None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def rope(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate `[..., rows, heads, head_dim]` by `rope_tables`, exactly as transformers does."""
        cos, sin = tables
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @staticmethod
    def interleave(x: torch.Tensor) -> torch.Tensor:
        """`[..., D]` channels in transformers' order (i paired with i + D/2) -> pairs side by side."""
        return x.unflatten(-1, (2, x.shape[-1] // 2)).transpose(-1, -2).flatten(-2)

    def _projected(self, layer: int, hidden: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
        block = self.layers[layer]
        h = block.input_layernorm(hidden)
        lead = h.shape[:-1]
        linears = self._attn[layer]
        return [linears[name](h).view(*lead, -1, self.spec.head_dim) for name in names]

    def qkv(self, layer: int, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """Post-RoPE q `[..., rows, Hq, D]` and k, v `[..., rows, Hkv, D]` of `layer` for `hidden`
        `[..., rows, hidden]` (q and k channels interleaved); `rope` is `rope_tables` of the rows' positions."""
        q, k, v = self._projected(layer, hidden, ("q_proj", "k_proj", "v_proj"))
        if self.has_qk_norm:
            attn = self.layers[layer].self_attn
            q, k = attn.q_norm(q), attn.k_norm(k)
        return self.interleave(self.rope(q, rope)), self.interleave(self.rope(k, rope)), v

    def kv(self, layer: int, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """Post-RoPE k and v of `layer` alone, for rows whose queries are not needed (the layer-0 repair)."""
        k, v = self._projected(layer, hidden, ("k_proj", "v_proj"))
        if self.has_qk_norm:
            k = self.layers[layer].self_attn.k_norm(k)
        return self.interleave(self.rope(k, rope)), v

    def finish_layer(self, layer: int, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual stream after `layer`, given its input `hidden` and attention output `[..., rows, Hq, D]`."""
        block, mlp = self.layers[layer], self._mlp[layer]
        hidden = hidden + self._attn[layer]["o_proj"](attn_out.flatten(-2))
        x = block.post_attention_layernorm(hidden)
        # The families' MLP (`down(act(gate(x)) * up(x))`), run on the adapter's projections.
        return hidden + mlp["down_proj"](block.mlp.act_fn(mlp["gate_proj"](x)) * mlp["up_proj"](x))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[..., rows, hidden]` last-layer states -> `[..., rows, vocab]` fp32 logits."""
        return self._lm_head(self.body.norm(hidden)).to(torch.float32)
