"""Merge the Qwen2.5-Coder-0.5B development runs (cases 0-49 and 50-99, run side by side into two folders) into
docs/results/real-multihop/qwen05/: the cases where all four methods finished, the report (`write_reports`), and per
case whether the default's plan was ProphetKV's (same tokens recomputed per chunk, no chunk moved).

    python merge_qwen.py RUN_DIR...
"""

import json
import sys
from pathlib import Path

from prophet_rag.bench.report import write_reports

out = Path(__file__).resolve().parents[1] / "qwen05"
METHODS = {"full", "prophet", "cacheblend", "prophet_focus"}

records: dict = {}
for run in sys.argv[1:]:
    for line in open(Path(run) / "results.jsonl"):
        r = json.loads(line)
        records.setdefault((r["case_id"], r["method"]), r)
cases = sorted({case for case, _ in records if all((case, m) in records for m in METHODS)},
               key=lambda case: int(case.split("-")[1]))
kept = [records[(case, m)] for case in cases for m in sorted(METHODS)]
out.mkdir(parents=True, exist_ok=True)
path = out / "results.jsonl"
path.write_text("".join(json.dumps(r) + "\n" for r in kept))
write_reports(path, out, with_plot=False, baseline="prophet")
moved = []
for case in cases:
    focus, prophet = records[(case, "prophet_focus")], records[(case, "prophet")]
    same = (focus["selected_per_chunk"] == prophet["selected_per_chunk"]
            and focus["chunk_order"] == sorted(focus["chunk_order"]))
    if not same:
        moved.append(case)
        cells = {m: records[(case, m)] for m in ("prophet_focus", "prophet", "cacheblend")}
        fields = "  ".join(f"{m}: kl8 {r['kl8']:.3f} agree {r['agreement_f1']:.2f} "
                           f"first {r['first_token_agree']:.0f} gap {r['gold_ll_gap']:+.2f}" for m, r in cells.items())
        print(case, "default differs from prophet; order", focus["chunk_order"], "evidence",
              focus.get("evidence_chunks"), "|", fields)
print(len(cases), "complete cases:", ", ".join(c.split("-")[1] for c in cases), "; default differs from prophet on",
      len(moved), ":", ", ".join(c.split("-")[1] for c in moved))
