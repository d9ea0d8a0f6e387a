"""prophet_focus's signals per case, stopped before the selective forward: each chunk's anchored relevance (share of
the best), the focus size, the normalised entropy of the relevance and whether `Selection.spread` holds.

    python focus_signals.py musique MUSIQUE_JSON STORE [CASES]      # development cases (default 0-16), SmolLM2
    python focus_signals.py syn TASKS STORE [MODEL] [CHUNKS CHUNK_TOKENS]  # the bench's tasks, seed 0, 8 cases each
"""

import json
import sys
from pathlib import Path

import torch

import prophet_rag.selection.prophet_focus as focus
from prophet_rag.bench.musique import MUSIQUE_PROMPT, load_musique
from prophet_rag.bench.runner import BenchConfig, make_cases
from prophet_rag.config import StoreConfig
from prophet_rag.engine import ProphetEngine


class Stop(Exception):
    """Raised once the signals are read: the selective forward is not needed."""


captured: dict = {}


def spy(selection, cache, suffix_rows, budget):
    relevance = selection.anchored.tolist()
    best = max(relevance) or 1.0
    captured.update(rel=[round(x / best, 3) for x in relevance], focus=len(selection.focus),
                    spread=selection.spread, budget=budget)
    raise Stop


focus.focus_plan = spy
which, store = sys.argv[1], Path(sys.argv[3])
if which == "musique":
    engine = ProphetEngine.from_pretrained(None, store=StoreConfig(directory=store), prompt=MUSIQUE_PROMPT)
    wanted = [int(c) for c in sys.argv[4].split(",")] if len(sys.argv) > 4 else list(range(17))
    cases = [case for case in load_musique(sys.argv[2], range(0, 100)) if int(case.case_id.split("-")[1]) in wanted]
else:
    engine = ProphetEngine.from_pretrained(sys.argv[4] if len(sys.argv) > 4 else None,
                                           store=StoreConfig(directory=store))
    chunks, tokens = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else ((8, 10), (150, 300))
    config = BenchConfig(tasks=tuple(sys.argv[2].split(",")), num_cases=8, seed=0, num_chunks=chunks,
                         chunk_tokens=tokens)
    cases = make_cases(config, engine.tokenizer)
for case in cases:
    engine.ingest(list(case.chunks))
    captured.clear()
    try:
        engine.answer(list(case.chunks), case.query, method="prophet_focus", ratio=0.2)
    except Stop:
        pass
    p = torch.tensor(captured["rel"])
    p = p / p.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum() / torch.log(torch.tensor(float(p.numel()))))
    print(json.dumps({"case": case.case_id, "n": int(p.numel()), "focus": captured["focus"],
                      "spread": captured["spread"], "ent": round(entropy, 3), "rel": captured["rel"],
                      "budget": captured["budget"]}), flush=True)
