"""Paired comparison of two runs' records on the cases and methods both hold (issue 24, seventh run).

    python paired_runs.py NEW.jsonl OLD.jsonl [OLD2.jsonl ...]

For each method and measure: both runs' means, the mean of the per-case differences (new - old) with a bootstrap 95%
interval over cases, and on how many cases the new run is better and worse (KL lower, the others higher).
"""

from __future__ import annotations

import json
import sys

from prophet_rag.bench.fidelity import bootstrap_interval

MEASURES = ("kl8", "first_token_agree", "agreement_f1", "gold_ll_gap")


def records(paths: list[str]) -> dict[tuple[str, str], dict]:
    out = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                out[(record["case_id"], record["method"])] = record
    return out


def main(new_path: str, *old_paths: str) -> None:
    new, old = records([new_path]), records(list(old_paths))
    for method in sorted({m for _, m in new} - {"full"}):
        pairs = [(old[key], record) for key, record in new.items() if key[1] == method and key in old]
        if not pairs:
            continue
        print(f"{method} ({len(pairs)} cases)")
        for measure in MEASURES:
            before, after = [a[measure] for a, _ in pairs], [b[measure] for _, b in pairs]
            diffs = [b - a for a, b in zip(before, after, strict=True)]
            mean, (low, high) = sum(diffs) / len(diffs), bootstrap_interval(diffs, resamples=10000)
            sign = -1 if measure == "kl8" else 1
            better = sum(sign * (b - a) > 0 for a, b in zip(before, after, strict=True))
            worse = sum(sign * (b - a) < 0 for a, b in zip(before, after, strict=True))
            print(f"  {measure:18s} old {sum(before) / len(before):.3f}  new {sum(after) / len(after):.3f}  "
                  f"paired {mean:+.3f} [{low:+.3f}, {high:+.3f}]  better/worse {better}/{worse}")


if __name__ == "__main__":
    main(*sys.argv[1:])
