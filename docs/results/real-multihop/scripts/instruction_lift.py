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
from pathlib import Path

import torch

import prophet_rag.selection.prophet_focus as focus
from prophet_rag.bench.musique import MUSIQUE_PROMPT, load_musique
from prophet_rag.bench.runner import BenchConfig, make_cases
from prophet_rag.config import StoreConfig
from prophet_rag.engine import ProphetEngine
from prophet_rag.selection.signals import FOCUS_LIFT, anchor_lift, anchor_mask


class Stop(Exception):
    pass


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
which, store = sys.argv[1], StoreConfig(directory=Path(sys.argv[3]))
if which == "musique":
    model = sys.argv[5] if len(sys.argv) > 5 else None
    engine = ProphetEngine.from_pretrained(model, store=store, prompt=MUSIQUE_PROMPT)
    wanted = [int(c) for c in sys.argv[4].split(",")]
    cases = [c for c in load_musique(sys.argv[2], range(0, 100)) if int(c.case_id.split("-")[1]) in wanted]
else:
    model = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    engine = ProphetEngine.from_pretrained(model, store=store)
    chunks, tokens = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else ((8, 10), (150, 300))
    config = BenchConfig(tasks=tuple(sys.argv[2].split(",")), num_cases=8, seed=0, num_chunks=chunks,
                         chunk_tokens=tokens)
    cases = make_cases(config, engine.tokenizer)
for case in cases:
    engine.ingest(list(case.chunks))
    cap.clear()
    try:
        engine.answer(list(case.chunks), case.query, method="prophet_focus", ratio=0.2)
    except Stop:
        pass
    print(json.dumps({"case": case.case_id, **cap}), flush=True)
