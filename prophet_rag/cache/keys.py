"""Content keys for stored chunk KV caches: SHA-256 over canonical bytes, never Python `hash()`.

A chunk's KV depends on the model (config and weights), the token ids, the tokens it was computed behind (the sink
prefix, `context_ids`) and how the KV is laid out. `chunk_key` hashes exactly these, so a key is identical across
processes, machines and `PYTHONHASHSEED`s, and any change to one of them gives a different key. The key holds no
position and no preceding document: a chunk is cached once and reused wherever it appears.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence

import torch

from prophet_rag.config import STORAGES

FORMAT_VERSION: int = 2
"""Version of the key derivation and of the stored entry format; bumping it orphans every existing entry.
2: one value file per entry, header then per-layer tensor regions (codec.py)."""

_CONFIG_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "attention_bias",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "max_position_embeddings",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
    "vocab_size",
    "rms_norm_eps",
    "quantization_config",
)
"""Config fields that change the KV a model computes. Deeper layers' KV depends on the whole forward pass, so the
list goes beyond attention: activation, MLP width and norm epsilon count too. `max_position_embeddings` scales
some RoPE variants (dynamic, longrope)."""

_SAMPLE = 1024
"""Elements taken from each parameter's head, tail and an evenly strided pass over it."""


def _canonical(value: object) -> object:
    """A JSON-ready copy of a config value with a representation that is stable across processes."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value)
    if hasattr(value, "to_dict"):  # quantization configs and other config objects
        return _canonical(value.to_dict())
    return str(value)


def _sha256_json(obj: object) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name, dtype, shape and a fixed sample of its values.

    Hashing all weights of a 7B model would take seconds; a sample of head, tail and a stride through each tensor
    changes whenever a layer is re-initialised, fine-tuned or loaded from another checkpoint. A single edited
    element away from the sampled positions is not detected. Samples are gathered on the parameters' device and
    copied to the host once.
    """
    digest = hashlib.sha256()
    samples = []
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        n = flat.numel()
        digest.update(f"{name}|{param.dtype}|{tuple(param.shape)}\n".encode())
        if n <= 3 * _SAMPLE:
            sample = flat
        else:
            stride = n // _SAMPLE
            sample = torch.cat([flat[:_SAMPLE], flat[-_SAMPLE:], flat[::stride][:_SAMPLE]])
        # Raw bytes rather than numpy: bf16 has no numpy dtype.
        samples.append(sample.contiguous().view(torch.uint8))
    if samples:
        digest.update(torch.cat(samples).cpu().numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 hex of the KV-relevant config fields, the parameter dtype and the weights identity of `model`.

    Fields a config lacks are recorded as null. When the config has no `head_dim`, `hidden_size //
    num_attention_heads` is used, as the attention layers do.
    """
    config = model.config
    fields = {name: _canonical(getattr(config, name, None)) for name in _CONFIG_FIELDS}
    if fields["head_dim"] is None and fields["hidden_size"] and fields["num_attention_heads"]:
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    param = next(model.parameters(), None)
    return _sha256_json(
        {
            "config": fields,
            "dtype": None if param is None else str(param.dtype),
            "weights": _weights_digest(model),
        }
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 hex of the tokenizer's serialized model, its special tokens with their ids and its chat template.

    Uses the fast tokenizer's JSON (`backend_tokenizer.to_str()`: vocabulary, merges, normalizer, added tokens)
    when there is one, else the sorted vocabulary.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialized = backend.to_str()
    else:
        serialized = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=True)
    specials = sorted(tokenizer.all_special_tokens)
    return _sha256_json(
        {
            "tokenizer": hashlib.sha256(serialized.encode("utf-8")).hexdigest(),
            "special_tokens": [[token, tokenizer.convert_tokens_to_ids(token)] for token in specials],
            "chat_template": _canonical(getattr(tokenizer, "chat_template", None)),
        }
    )


def kv_spec(dtype: torch.dtype, shape: tuple[int, int, int], storage: str = "lossless") -> str:
    """The layout, shape `(layers, kv_heads, head_dim)`, RoPE convention, dtype and storage encoding of stored KV,
    e.g. `"layout=L,2,T,Hkv,D;shape=30,3,64;rope=rotated-at-positions;channels=interleaved;dtype=float32"`
    (lossless; keys' rotated channel pairs side by side, see `model_adapter`) or `"...;dtype=float32;storage=bfloat16"`.

    The model fingerprint already implies the shape; naming it here makes an entry's own fields, hashed into its
    key, say what its tensors must look like, so an entry can be checked without the model. Compacting to the KV's
    own dtype is lossless and named so, which keeps one key per distinct stored content.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"kv_spec needs a floating-point torch.dtype such as torch.float16, got {dtype!r}.")
    if len(shape) != 3 or not all(type(n) is int and n > 0 for n in shape):
        raise ValueError(f"shape must be (layers, kv_heads, head_dim) positive ints, got {shape!r}.")
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}.")
    name = str(dtype).removeprefix("torch.")
    spec = (f"layout=L,2,T,Hkv,D;shape={','.join(map(str, shape))};rope=rotated-at-positions;channels=interleaved;"
            f"dtype={name}")
    return spec if storage in ("lossless", name) else f"{spec};storage={storage}"


def _ids_bytes(ids: Sequence[int] | torch.Tensor, name: str) -> bytes:
    """Length-prefixed little-endian int64 bytes of a 1-D id sequence."""
    tensor = torch.as_tensor(ids).detach().cpu()
    if tensor.numel() == 0:
        tensor = tensor.to(torch.int64)
    if tensor.dim() != 1 or tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(
            f"{name} must be a 1-D sequence of integer token ids, got {tensor.dtype} of shape {tuple(tensor.shape)}."
        )
    data = tensor.to(torch.int64).numpy().astype("<i8", copy=False).tobytes()
    return struct.pack("<Q", tensor.numel()) + data


def _str_bytes(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def chunk_key(
    model_fp: str,
    tokenizer_fp: str,
    kv_spec: str,
    token_ids: Sequence[int],
    context_ids: Sequence[int],
) -> str:
    """SHA-256 hex key of one chunk's KV: the chunk's `token_ids` computed behind `context_ids` (the sink prefix;
    `()` for an exact prefix) by the model, tokenizer and KV layout the three fingerprints name.

    Every field is length-prefixed, so no two different inputs concatenate to the same bytes.
    """
    digest = hashlib.sha256(b"prophet-rag/chunk-kv\x00")
    digest.update(struct.pack("<I", FORMAT_VERSION))
    for text in (model_fp, tokenizer_fp, kv_spec):
        digest.update(_str_bytes(text))
    digest.update(_ids_bytes(token_ids, "token_ids"))
    digest.update(_ids_bytes(context_ids, "context_ids"))
    return digest.hexdigest()
