"""Merge the bench run folders into docs/results/real-multihop/results.jsonl (complete cases only, one record per
case and method) with the pilot's prophet_focus records as `prophet_focus_pilot`, and write the reports.

    python merge.py PILOT_FOCUS_JSONL RUN_DIR...
"""

import json
import sys
from pathlib import Path

from prophet_rag.bench.report import write_reports

out = Path(__file__).resolve().parents[1]
records = []
for run in sys.argv[2:]:
    if (Path(run) / "results.jsonl").exists():
        records += [json.loads(line) for line in open(Path(run) / "results.jsonl")]
# The pilot's full / prophet / cacheblend records were copied into each run folder: keep one per case and method.
unique = {}
for r in records:
    unique.setdefault((r["case_id"], r["method"], r["ratio"]), r)
methods = {"full", "prophet", "cacheblend", "prophet_focus"}
by_case: dict = {}
for r in unique.values():
    by_case.setdefault(r["case_id"], set()).add(r["method"])
complete = {case for case, have in by_case.items() if methods <= have}
kept = [r for r in unique.values() if r["case_id"] in complete and r["method"] in methods]
for line in open(sys.argv[1]):  # the pilot's prophet_focus (commit a5b164e) on the same cases
    r = json.loads(line)
    if r["case_id"] in complete:
        kept.append({**r, "method": "prophet_focus_pilot"})
path = out / "results.jsonl"
path.write_text("".join(json.dumps(r) + "\n" for r in kept))
print(len(complete), "complete cases:", sorted(complete, key=lambda case: int(case.split("-")[1])))
write_reports(path, out, with_plot=False, baseline="prophet")
