"""keys.py: content keys are canonical (stable across processes) and change with everything the KV depends on."""

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from prophet_rag.cache.keys import FORMAT_VERSION, chunk_key, kv_spec, model_fingerprint, tokenizer_fingerprint
from tiny import tiny_model, tiny_tokenizer

MODEL_FP = "m" * 64
TOKENIZER_FP = "t" * 64
SHAPE = (2, 2, 16)
SPEC = kv_spec(torch.float16, SHAPE)


def _key(token_ids=(5, 6, 7), context_ids=(1, 2), model_fp=MODEL_FP, tokenizer_fp=TOKENIZER_FP, spec=SPEC):
    return chunk_key(model_fp, tokenizer_fp, spec, token_ids, context_ids)


def test_format_version_is_two():
    assert FORMAT_VERSION == 2


def test_kv_spec_names_layout_shape_rope_dtype_and_storage():
    assert kv_spec(torch.float32, (30, 3, 64)) == (
        "layout=L,2,T,Hkv,D;shape=30,3,64;rope=rotated-at-positions;channels=interleaved;dtype=float32"
    )
    assert kv_spec(torch.bfloat16, SHAPE).endswith(";dtype=bfloat16")
    assert len({kv_spec(d, SHAPE) for d in (torch.float32, torch.float16, torch.bfloat16)}) == 3
    assert len({kv_spec(torch.float32, s) for s in ((2, 2, 16), (4, 2, 16), (2, 1, 16), (2, 2, 8))}) == 4
    assert kv_spec(torch.float32, SHAPE, "bfloat16").endswith(";dtype=float32;storage=bfloat16")
    assert kv_spec(torch.bfloat16, SHAPE, "float8_e4m3").endswith(";dtype=bfloat16;storage=float8_e4m3")
    assert kv_spec(torch.bfloat16, SHAPE, "bfloat16") == kv_spec(torch.bfloat16, SHAPE)
    with pytest.raises(ValueError, match="storage"):
        kv_spec(torch.float32, SHAPE, "int4")
    with pytest.raises(ValueError, match="shape"):
        kv_spec(torch.float32, (2, 0, 16))


@pytest.mark.parametrize("bad", [torch.int64, "float16", None])
def test_kv_spec_rejects_non_float_dtypes(bad):
    with pytest.raises(TypeError, match="floating-point torch.dtype"):
        kv_spec(bad, SHAPE)


def test_chunk_key_is_sha256_hex_and_deterministic():
    key = _key()
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == _key()


def test_chunk_key_accepts_lists_tuples_and_tensors_alike():
    as_tensor = chunk_key(
        MODEL_FP, TOKENIZER_FP, SPEC, torch.tensor([5, 6, 7]), torch.tensor([1, 2], dtype=torch.int32)
    )
    assert as_tensor == _key(token_ids=[5, 6, 7], context_ids=[1, 2]) == _key()


@pytest.mark.parametrize(
    "change",
    [
        dict(token_ids=(5, 6, 8)),
        dict(token_ids=(6, 5, 7)),
        dict(token_ids=(5, 6, 7, 0)),
        dict(context_ids=(1, 3)),
        dict(context_ids=()),
        dict(model_fp="n" * 64),
        dict(tokenizer_fp="u" * 64),
        dict(spec=kv_spec(torch.bfloat16, SHAPE)),
        dict(spec=kv_spec(torch.float16, SHAPE, "float8_e4m3")),
        dict(spec=kv_spec(torch.float16, (2, 1, 16))),
    ],
    ids=["one-token", "order", "appended-zero", "context", "no-context", "model", "tokenizer", "dtype", "storage",
         "shape"],
)
def test_chunk_key_changes_with_every_field(change):
    assert _key(**change) != _key()


def test_chunk_key_fields_cannot_alias():
    # Moving a token across the token/context boundary, or characters across string fields, keeps the
    # concatenation the same; the length prefixes must still separate them.
    assert _key(token_ids=(5, 6), context_ids=(7,)) != _key(token_ids=(5,), context_ids=(6, 7))
    assert _key(model_fp="ab", tokenizer_fp="c") != _key(model_fp="a", tokenizer_fp="bc")


def test_chunk_key_rejects_non_integer_ids():
    with pytest.raises(TypeError, match="integer token ids"):
        chunk_key(MODEL_FP, TOKENIZER_FP, SPEC, torch.tensor([1.0, 2.0]), ())
    with pytest.raises(TypeError, match="1-D"):
        chunk_key(MODEL_FP, TOKENIZER_FP, SPEC, [[1, 2]], ())


def test_keys_and_fingerprints_are_identical_in_another_process(tmp_path):
    # Python's hash() of str/bytes is salted per process; a key that used it would differ here.
    script = f"""
import json, sys
sys.path.append({str(Path(__file__).resolve().parents[2])!r})
import torch
from tiny import tiny_model, tiny_tokenizer
from prophet_rag.cache.keys import chunk_key, kv_spec, model_fingerprint, tokenizer_fingerprint
print(json.dumps(dict(
    key=chunk_key({MODEL_FP!r}, {TOKENIZER_FP!r}, kv_spec(torch.float16, {SHAPE!r}), [5, 6, 7], [1, 2]),
    model=model_fingerprint(tiny_model("llama", seed=0)),
    tokenizer=tokenizer_fingerprint(tiny_tokenizer()),
)))
"""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    other = json.loads(out.stdout.strip().splitlines()[-1])
    assert other["key"] == _key()
    assert other["model"] == model_fingerprint(tiny_model("llama", seed=0))
    assert other["tokenizer"] == tokenizer_fingerprint(tiny_tokenizer())


def test_model_fingerprint_is_stable_for_identical_models():
    assert model_fingerprint(tiny_model("llama", seed=0)) == model_fingerprint(tiny_model("llama", seed=0))


def test_model_fingerprint_changes_with_weights():
    assert model_fingerprint(tiny_model("llama", seed=0)) != model_fingerprint(tiny_model("llama", seed=1))


@pytest.mark.parametrize("param", ["model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"])
def test_model_fingerprint_changes_when_one_layer_is_reinitialised(param):
    model = tiny_model("llama", seed=0)
    before = model_fingerprint(model)
    with torch.no_grad():
        model.get_parameter(param).normal_(generator=torch.Generator().manual_seed(7))
    assert model_fingerprint(model) != before


def test_model_fingerprint_changes_with_rope_config():
    base = model_fingerprint(tiny_model("llama", seed=0))
    # transformers 5 reads RoPE settings from `rope_parameters`; older configs carry `rope_theta`.
    rope_params = tiny_model("llama", seed=0, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert model_fingerprint(rope_params) != base
    assert model_fingerprint(tiny_model("llama", seed=0, rope_theta=500000.0)) != base


def test_model_fingerprint_changes_with_family_and_dtype():
    llama = tiny_model("llama", seed=0)
    assert model_fingerprint(tiny_model("qwen2", seed=0)) != model_fingerprint(llama)
    before = model_fingerprint(llama)
    assert model_fingerprint(llama.to(torch.bfloat16)) != before


def test_model_fingerprint_is_fast_on_a_135m_model():
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")  # uninitialised values: this times hashing, not init
    assert sum(p.numel() for p in model.parameters()) > 130e6
    model_fingerprint(model)
    start = time.perf_counter()
    model_fingerprint(model)
    assert time.perf_counter() - start < 0.5


def test_model_fingerprint_derives_head_dim_when_config_has_none():
    model = tiny_model("llama", seed=0)
    with_head_dim = model_fingerprint(model)
    model.config.head_dim = None  # hidden_size // num_attention_heads == 16, the same value
    assert model_fingerprint(model) == with_head_dim


def test_tokenizer_fingerprint_is_stable_across_copies():
    tok = tiny_tokenizer()
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(copy.deepcopy(tok))


def test_tokenizer_fingerprint_changes_with_an_added_token():
    tok = tiny_tokenizer()
    extra = copy.deepcopy(tok)
    extra.add_tokens(["<extra>"])
    assert len(extra) == len(tok) + 1
    assert tokenizer_fingerprint(extra) != tokenizer_fingerprint(tok)


def test_tokenizer_fingerprint_changes_with_chat_template():
    tok = tiny_tokenizer()
    other = copy.deepcopy(tok)
    other.chat_template = tok.chat_template.replace("tiny test model", "different model")
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
