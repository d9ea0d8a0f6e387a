"""Engines, documents and answer fingerprints shared by the shared-tier tests (importable from spawned processes)."""

from __future__ import annotations

import copy
import hashlib

import torch

from prophet_rag.config import GenerationConfig, StoreConfig
from prophet_rag.engine import ProphetEngine
from tiny import tiny_model, tiny_tokenizer

DOCS = [f"Record {i}: the turbine hall of site {i} holds {10 + 3 * i} turbines and {i % 4} spare rotors."
        for i in range(6)]
REQUESTS = [([DOCS[(2 * i + j) % len(DOCS)] for j in range(3)], f"How many turbines at site {i}?") for i in range(3)]
GEN = GenerationConfig(max_new_tokens=3, eos_token_ids=(10**6,))


def fingerprint(answer) -> tuple:
    logits = answer.first_token_logits.contiguous().view(torch.uint8).numpy().tobytes()
    return answer.token_ids, hashlib.sha256(logits).hexdigest()


def engine_over(store: StoreConfig, **options) -> ProphetEngine:
    return ProphetEngine(tiny_model("llama"), copy.deepcopy(tiny_tokenizer()), store=store, **options)


def answers(engine: ProphetEngine, requests=REQUESTS) -> list[tuple]:
    return [fingerprint(engine.answer(docs, query, generation=GEN, return_logits=True)) for docs, query in requests]
