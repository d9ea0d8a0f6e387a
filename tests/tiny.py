"""Tiny random-weight models of each supported family and a small trained tokenizer, built offline in code."""

from __future__ import annotations

import functools

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

CHUNKS = (
    "The vault code of Alpha is 4821.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
)
QUERY = "what is the vault code of Alpha?"
FILLERS = (
    "Berlin and Paris.",
    "Germany and France.",
    "A quick brown fox.",
    "Give a helpful answer.",
)
"""Chunks sharing no word with `QUERY`: beside `CHUNKS`, a request whose few anchored chunks are not spread
(`Selection.spread`)."""

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The vault code of Alpha is 4821. The vault code of Beta is 9034.",
    "Question: what is the vault code? Answer the question using the documents below.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "You are a helpful assistant. Only give the answer and do not output any other words.",
]


@functools.cache
def tiny_tokenizer():
    """A byte-level BPE tokenizer (~400 tokens) with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def tiny_config(family: str = "llama", **overrides):
    """A 2-layer config of `family` with GQA (4 query heads, 2 KV heads, head_dim 16)."""
    import transformers

    vocab = len(tiny_tokenizer())
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif family == "mistral":
        cfg = transformers.MistralConfig(sliding_window=None, **common)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(use_sliding_window=False, **common)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=16, use_sliding_window=False, **common)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A random-weight causal LM of `family` in eval mode, fp32, eager-free (sdpa)."""
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    # Random init gives near-uniform attention; scaling the projections makes attention peaky enough that a wrong
    # mask or position shows up clearly in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(4.0)
    return model.eval()


class ForcedToken:
    """A decoding constraint for tests: allows one token, `steps` times, then nothing more; counts its masks."""

    def __init__(self, token: int, steps: int) -> None:
        self.token, self.steps, self.masked, self.taken = token, steps, 0, []

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        self.masked += 1
        keep = logits[self.token].clone()
        logits.fill_(float("-inf"))
        logits[self.token] = keep
        return logits

    def advance(self, token: int) -> None:
        self.taken.append(token)

    def is_finished(self) -> bool:
        return len(self.taken) >= self.steps
