"""The default's move decision per case with the lift before and after commit "no move on the instruction's words":
`old_plain` from the lift over every anchor of the best anchored chunk, `plain` from the engine's (capped by the lift
over the anchors the prompt's fixed prefix does not hold), `qlift` that capped lift, and the best chunk's six
strongest anchors (token, whether the prefix holds it, its share of the question's attention). Stops each case before
the selective forward.

    python instruction_lift.py musique MUSIQUE_JSON STORE CASES [MODEL]
    python instruction_lift.py syn TASKS STORE [MODEL|-] [CHUNKS CHUNK_TOKENS]

e.g. `syn multi_key,multi_query,single_needle,multi_value S -` (SmolLM2, 8 cases each, seed 0) and
`syn multi_key S60 - 8 60` (its 60-token set-up).
"""

import json
import sys

import torch
from signal_cases import Stop, engine_and_cases, planned

import prophet_rag.selection.prophet_focus as focus
from prophet_rag.selection.signals import FOCUS_LIFT, anchor_lift, anchor_mask

cap = {}


def spy(sel, cache, suffix_rows, budget):
    chunks = list(sel.chunk_ids)
    mass = sel.parallel_scores.float()
    best = int(torch.argmax(sel.anchored))
    lens = [int(c.numel()) for c in chunks]
    start = sum(lens[:best])
    mask = anchor_mask(chunks, sel.suffix_ids)
    inside = torch.zeros_like(mask)
    inside[start : start + lens[best]] = True
    prefix = cache.token_ids[: cache.prefix_len]
    own = ~torch.isin(torch.cat(chunks), prefix)
    qlift = anchor_lift(mass, mask & inside & own)
    old_plain = sel.spread or anchor_lift(mass, mask & inside) < FOCUS_LIFT
    toks = torch.cat(chunks)[mask & inside]
    weights = mass[mask & inside]
    strongest = torch.argsort(weights, descending=True)[:6]
    anchors = [(engine.tokenizer.decode([int(toks[i])]), bool(torch.isin(toks[i], prefix)),
                round(float(weights[i] / mass.sum()), 4)) for i in strongest]
    cap.update(changed=old_plain != sel.plain, old_plain=old_plain, plain=sel.plain, spread=sel.spread,
               lift=round(sel.lift, 3), qlift=round(qlift, 3), anchors=anchors)
    raise Stop


focus.focus_plan = spy
engine, cases = engine_and_cases(sys.argv)
for case in planned(engine, cases, cap):
    print(json.dumps({"case": case.case_id, **cap}), flush=True)
