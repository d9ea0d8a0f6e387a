"""prophet_focus's signals per case, stopped before the selective forward: each chunk's anchored relevance (share of
the best), the focus size, the normalised entropy of the relevance and whether `Selection.spread` holds.

    python focus_signals.py musique MUSIQUE_JSON STORE [CASES]      # development cases (default 0-16), SmolLM2
    python focus_signals.py syn TASKS STORE [MODEL] [CHUNKS CHUNK_TOKENS]  # the bench's tasks, seed 0, 8 cases each
"""

import json
import sys

import torch
from signal_cases import Stop, engine_and_cases, planned

import prophet_rag.selection.prophet_focus as focus

captured: dict = {}


def spy(selection, cache, suffix_rows, budget):
    relevance = selection.anchored.tolist()
    best = max(relevance) or 1.0
    captured.update(rel=[round(x / best, 3) for x in relevance], focus=len(selection.focus),
                    spread=selection.spread, budget=budget)
    raise Stop


focus.focus_plan = spy
engine, cases = engine_and_cases(sys.argv)
for case in planned(engine, cases, captured):
    p = torch.tensor(captured["rel"])
    p = p / p.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum() / torch.log(torch.tensor(float(p.numel()))))
    print(json.dumps({"case": case.case_id, "n": int(p.numel()), "focus": captured["focus"],
                      "spread": captured["spread"], "ent": round(entropy, 3), "rel": captured["rel"],
                      "budget": captured["budget"]}), flush=True)
