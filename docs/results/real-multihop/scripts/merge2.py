"""Merge the 2026-12-06 (second) runs into docs/results/real-multihop/results.jsonl: the 39 cases of the first merge,
with `prophet_focus` now the version with the lift check (commit a4215bc), the version before it kept as
`prophet_focus_spread` where they differ, and the new development cases.

    python merge2.py FIRST_MERGE_JSONL OLD9_DIR NEW_DIR...   # FIRST_MERGE_JSONL: results.jsonl at commit 5feb321

On the 30 cases of the first merge where the spread fallback applied, the lift check does not change the method's
path (`Selection.plain` holds whenever `spread` does): their `prophet_focus` records stand. On the 9 where it did not,
`OLD9_DIR` holds the new version's records (with full prefill run again in that folder; its answers are compared
with the first run's below). NEW_DIR folders hold complete runs of all four methods on new cases.
"""

import json
import sys
from pathlib import Path

from prophet_rag.bench.report import write_reports

out = Path(__file__).resolve().parents[1]
METHODS = {"full", "prophet", "cacheblend", "prophet_focus"}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if path.exists() else []


old = [r for r in read(Path(sys.argv[1])) if r["method"] != "prophet_focus_pilot"]
rerun = {r["case_id"]: r for r in read(Path(sys.argv[2]) / "results.jsonl") if r["method"] == "prophet_focus"}
full_again = {r["case_id"]: r for r in read(Path(sys.argv[2]) / "results.jsonl") if r["method"] == "full"}
by_key = {(r["case_id"], r["method"]): r for r in old}
# The cases where the version before moved or recomputed differently from prophet (its spread fallback did not apply).
moved = {case for (case, method), r in by_key.items() if method == "prophet_focus"
         and (r["selected_per_chunk"] != by_key[(case, "prophet")]["selected_per_chunk"]
              or r["chunk_order"] != sorted(r["chunk_order"]))}
kept = []
for r in old:
    if r["case_id"] not in moved:
        kept.append(r)  # the lift check leaves the spread cases' path unchanged: their records stand
    elif r["case_id"] in rerun:
        kept.append({**r, "method": "prophet_focus_spread"} if r["method"] == "prophet_focus" else r)
        if r["method"] == "prophet_focus":
            kept.append(rerun[r["case_id"]])
for case, r in full_again.items():
    first = by_key[(case, "full")]
    print(case, "full prefill again: same answer" if first["text"] == r["text"] else "full prefill: ANSWER DIFFERS",
          f"gold_ll {first['gold_ll']:.4f} then {r['gold_ll']:.4f}")
# A formerly moving case whose rerun did not finish is left out whole: its default record would be the old method's.
missing = sorted(moved - set(rerun), key=lambda case: int(case.split("-")[1]))
new = []
for run in sys.argv[3:]:
    new += read(Path(run) / "results.jsonl")
unique = {}
for r in new:
    unique.setdefault((r["case_id"], r["method"], r["ratio"]), r)
by_case: dict = {}
for r in unique.values():
    by_case.setdefault(r["case_id"], set()).add(r["method"])
complete = {case for case, have in by_case.items() if METHODS <= have}
kept += [r for r in unique.values() if r["case_id"] in complete and r["method"] in METHODS]
cases = sorted({r["case_id"] for r in kept}, key=lambda case: int(case.split("-")[1]))
path = out / "results.jsonl"
path.write_text("".join(json.dumps(r) + "\n" for r in kept))
print(len(cases), "cases:", ", ".join(c.split("-")[1] for c in cases), "; formerly moving:", sorted(moved),
      "; left out (rerun not finished):", missing)
write_reports(path, out, with_plot=False, baseline="prophet")
