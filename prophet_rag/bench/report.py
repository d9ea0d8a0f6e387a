"""Aggregate bench records into `summary.json`, a Markdown report and a PNG plot."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

_METRICS = ("score", "f1", "first_token_agree", "kl", "ttft_s", "load_s", "rerotate_s", "select_s", "recompute_s",
            "recomputed_tokens", "context_tokens")
_PHASES = ("load_s", "rerotate_s", "select_s", "recompute_s")


def load_records(path: Path) -> list[dict]:
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _label(method: str, ratio: float) -> str:
    return method if method in ("full", "reuse") else f"{method}@{ratio:g}"


def summarize(records: list[dict]) -> dict:
    """Per task and overall: each (method, ratio)'s mean metrics, accuracy and TTFT relative to `full`, and the
    accuracy on the discriminative cases (full scores 1, reuse below 1)."""
    groups: dict[tuple[str, str, float], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["method"], float(r["ratio"]))].append(r)
    by_case = defaultdict(dict)
    for r in records:
        by_case[r["case_id"]][(r["method"], float(r["ratio"]))] = r["score"]
    discriminative = {c for c, s in by_case.items() if s.get(("full", 1.0)) == 1.0 and s.get(("reuse", 0.0), 1) < 1}
    tasks: dict[str, dict] = defaultdict(dict)
    for (task, method, ratio), rows in sorted(groups.items()):
        entry = {m: mean(r[m] for r in rows) for m in _METRICS}
        picked = [r["score"] for r in rows if r["case_id"] in discriminative]
        entry.update(method=method, ratio=ratio, cases=len(rows),
                     discriminative_score=mean(picked) if picked else None, discriminative_cases=len(picked))
        tasks[task][_label(method, ratio)] = entry
    for rows in tasks.values():
        full = rows.get("full")
        for entry in rows.values():
            entry["relative_accuracy"] = entry["score"] / full["score"] if full and full["score"] else None
            entry["relative_ttft"] = entry["ttft_s"] / full["ttft_s"] if full else None
    overall = {}
    labels = sorted({label for rows in tasks.values() for label in rows})
    for label in labels:
        entries = [rows[label] for rows in tasks.values() if label in rows]
        disc = [(e["discriminative_score"], e["discriminative_cases"]) for e in entries if e["discriminative_cases"]]
        overall[label] = {
            "method": entries[0]["method"], "ratio": entries[0]["ratio"],
            "score": mean(e["score"] for e in entries),
            "discriminative_score": (sum(s * n for s, n in disc) / sum(n for _, n in disc)) if disc else None,
            "discriminative_cases": sum(n for _, n in disc),
            "first_token_agree": mean(e["first_token_agree"] for e in entries),
            "kl": mean(e["kl"] for e in entries),
            "ttft_s": mean(e["ttft_s"] for e in entries),
            "relative_ttft": mean(e["relative_ttft"] for e in entries if e["relative_ttft"] is not None),
            **{p: mean(e[p] for e in entries) for p in _PHASES},
        }
    # Overall accuracy relative to full is a ratio of task-averaged accuracies, not a mean of per-task ratios: a task
    # that full prefill itself rarely solves would otherwise turn one lucky case into a ratio of 2 or more.
    full_score = overall.get("full", {}).get("score")
    for entry in overall.values():
        entry["relative_accuracy"] = entry["score"] / full_score if full_score else None
    return {"tasks": dict(tasks), "overall": overall, "cases": len(by_case),
            "discriminative_cases": len(discriminative)}


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(summary: dict) -> str:
    lines = [f"{summary['cases']} cases; {summary['discriminative_cases']} discriminative (full right, reuse wrong).",
             "", "## Overall (mean over tasks)", "",
             "| method | accuracy | rel. to full | discriminative | first-token agree | KL | TTFT s | TTFT x full |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, e in summary["overall"].items():
        lines.append(f"| {label} | {_fmt(e['score'])} | {_fmt(e['relative_accuracy'])} | "
                     f"{_fmt(e['discriminative_score'])} ({e['discriminative_cases']}) | "
                     f"{_fmt(e['first_token_agree'])} | "
                     f"{_fmt(e['kl'], 3)} | {_fmt(e['ttft_s'], 3)} | {_fmt(e['relative_ttft'])} |")
    for task, rows in summary["tasks"].items():
        lines += ["", f"## {task}", "",
                  "| method | cases | accuracy | rel. to full | discriminative | agree | KL | recomputed/context "
                  "| TTFT s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for label, e in rows.items():
            lines.append(f"| {label} | {e['cases']} | {_fmt(e['score'])} | {_fmt(e['relative_accuracy'])} | "
                         f"{_fmt(e['discriminative_score'])} ({e['discriminative_cases']}) | "
                         f"{_fmt(e['first_token_agree'])} | {_fmt(e['kl'], 3)} | "
                         f"{e['recomputed_tokens']:.0f}/{e['context_tokens']:.0f} | {_fmt(e['ttft_s'], 3)} |")
    lines += ["", "## TTFT phases (mean over tasks, seconds)", "",
              "| method | load | re-rotate | select | recompute | total |", "| --- | --- | --- | --- | --- | --- |"]
    for label, e in summary["overall"].items():
        lines.append(f"| {label} | " + " | ".join(_fmt(e[p], 3) for p in _PHASES) + f" | {_fmt(e['ttft_s'], 3)} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Two panels: accuracy relative to full vs ratio per method; TTFT phases per method at the ratio nearest 0.2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = summary["overall"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = sorted({e["method"] for e in overall.values()} - {"full", "reuse"})
    for method in methods:
        points = sorted((e["ratio"], e["relative_accuracy"] or 0.0) for e in overall.values() if e["method"] == method)
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    for method, style in (("full", "--"), ("reuse", ":")):
        if method in overall and overall[method]["relative_accuracy"] is not None:
            left.axhline(overall[method]["relative_accuracy"], linestyle=style, color="gray", label=method)
    left.set(xlabel="recompute ratio", ylabel="accuracy relative to full", title="Accuracy vs ratio")
    left.legend(fontsize=8)
    ratios = sorted({e["ratio"] for e in overall.values() if e["method"] not in ("full", "reuse")})
    nearest = min(ratios, key=lambda r: abs(r - 0.2)) if ratios else 0.2
    bars = [(label, e) for label, e in overall.items() if e["method"] in ("full", "reuse") or e["ratio"] == nearest]
    bottom = [0.0] * len(bars)
    for phase in _PHASES:
        heights = [e[phase] for _, e in bars]
        right.bar([label for label, _ in bars], heights, bottom=bottom, label=phase.removesuffix("_s"))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    right.set(ylabel="TTFT (s)", title=f"TTFT by phase (ratio {nearest:g})")
    right.tick_params(axis="x", rotation=45)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(results_path: Path, output_dir: Path, with_plot: bool = True) -> dict:
    summary = summarize(load_records(results_path))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (output_dir / "results.md").write_text(markdown(summary), encoding="utf-8")
    if with_plot:
        plot(summary, output_dir / "plot.png")
    return summary
