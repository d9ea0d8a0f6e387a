"""Candidate signals of prophet_focus per case, stopped before the selective forward: the anchors' attention
mass, their lift (mass per anchor token over mean mass per context token) in the best chunk and overall, and the
IDF-weighted form.

    python lift_signals.py musique MUSIQUE_JSON STORE CASES [MODEL]
    python lift_signals.py syn TASKS STORE [MODEL|-] [CHUNKS CHUNK_TOKENS]
"""
import json
import sys

import torch
from signal_cases import Stop, engine_and_cases, planned

import prophet_rag.selection.prophet_focus as focus

cap = {}

def longest_ngram(chunk, q):
    best = 0
    c, ql = chunk.tolist(), q.tolist()
    for n in range(1, 40):
        grams = {tuple(ql[i:i + n]) for i in range(len(ql) - n + 1)}
        if not grams:
            break
        found = any(tuple(c[i:i + n]) in grams for i in range(len(c) - n + 1))
        if not found:
            break
        best = n
    return best

def spy(sel, cache, suffix_rows, budget):
    mass = sel.parallel_scores.float()
    total = float(mass.sum())
    rel = sel.anchored
    best = int(torch.argmax(rel))
    chunks = list(sel.chunk_ids)
    lens = [int(c.numel()) for c in chunks]
    per = torch.split(mass, lens)
    m = len(chunks)
    words = sel.suffix_ids.unique()
    df = torch.stack([torch.isin(words, c) for c in chunks]).sum(0)
    rare = words[(df <= 0.75 * m) & (df > 0)]
    anchor_tok = torch.isin(torch.cat(chunks), rare)
    at = torch.split(anchor_tok, lens)
    focus_set = sel.focus
    excl = [w for w in rare.tolist() if all((i in focus_set) for i, c in enumerate(chunks) if bool((c == w).any()))]
    cap.update(n=m, focus=len(focus_set), spread=sel.spread, budget=budget,
               rel=[round(float(x / rel.max()), 3) for x in rel],
               best_mass=round(float(per[best].sum()) / total, 4),
               anchor_mass=round(float(mass[anchor_tok].sum()) / total, 4),
               best_anchor_mass=round(float(per[best][at[best]].sum()) / total, 4),
               focus_mass=round(sum(float(per[i].sum()) for i in focus_set) / total, 4),
               last_mass=round(float(per[-1].sum()) / total, 4),
               excl=len(excl), rare=int(rare.numel()), qlen=int(sel.suffix_ids.numel()),
               ngram=longest_ngram(chunks[best], sel.suffix_ids),
               best=best, lens=lens, k_best=int(at[best].sum()), k_all=int(anchor_tok.sum()),
               lift_best=round(float(per[best][at[best]].sum()) / total / max(int(at[best].sum()), 1) * sum(lens), 2),
               lift_all=round(float(mass[anchor_tok].sum()) / total / max(int(anchor_tok.sum()), 1) * sum(lens), 2),
               weighted_best=round(float(rel.max()) / total * sum(lens), 3))
    raise Stop

focus.focus_plan = spy
engine, cases = engine_and_cases(sys.argv)
for case in planned(engine, cases, cap):
    print(json.dumps({"case": case.case_id, "ev": list(case.evidence_chunks), **cap}), flush=True)
