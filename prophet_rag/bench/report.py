"""Aggregate bench records into `summary.json`, a Markdown report and a PNG plot."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean

from prophet_rag.bench import fidelity
from prophet_rag.bench.runner import slug

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


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a binomial proportion; partial-credit scores count fractionally."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value of `wins` against `losses` (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _paired(scores: dict[str, float], reference: dict[str, float]) -> dict | None:
    """Wins, losses and ties of `scores` against `reference` over the cases both have, and the sign test."""
    common = [c for c in scores if c in reference]
    if not common:
        return None
    wins = sum(scores[c] > reference[c] for c in common)
    losses = sum(scores[c] < reference[c] for c in common)
    return {"wins": wins, "losses": losses, "ties": len(common) - wins - losses, "p": sign_test(wins, losses)}


def _add_paired(acc: dict, paired: dict | None) -> None:
    if paired is None:
        return
    for key in ("wins", "losses", "ties"):
        acc[key] = acc.get(key, 0) + paired[key]
    acc["p"] = sign_test(acc["wins"], acc["losses"])


def _mean_known(values) -> float | None:
    known = [v for v in values if v is not None]
    return mean(known) if known else None


def split_by_model(records: list[dict]) -> dict[str, list[dict]]:
    """Records grouped by their `model` field (records written before the field existed count as "unknown")."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[str(r.get("model") or "unknown")].append(r)
    return dict(groups)


def summarize(records: list[dict], baseline: str = "prophet") -> dict:
    """Per task and overall: each (method, ratio)'s mean metrics, accuracy with its Wilson 95% interval, accuracy and
    TTFT relative to `full`, the accuracy on the discriminative cases (full scores 1, reuse below 1), and paired
    wins/losses case by case against `full` and against `baseline` at the same ratio. Records of one model."""
    groups: dict[tuple[str, str, float], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["method"], float(r["ratio"]))].append(r)
    by_case = defaultdict(dict)
    for r in records:
        by_case[r["case_id"]][(r["method"], float(r["ratio"]))] = r["score"]
    discriminative = {c for c, s in by_case.items() if s.get(("full", 1.0)) == 1.0 and s.get(("reuse", 0.0), 1) < 1}
    scores = {key: {r["case_id"]: r["score"] for r in rows} for key, rows in groups.items()}
    tasks: dict[str, dict] = defaultdict(dict)
    for (task, method, ratio), rows in sorted(groups.items()):
        entry = {m: mean(r[m] for r in rows) for m in _METRICS}
        picked = [r["score"] for r in rows if r["case_id"] in discriminative]
        mine = scores[(task, method, ratio)]
        # Records written before hf_last was timed have none: the ratio then covers the records that have it.
        timed = [r for r in rows if r.get("hf_last_s")]
        entry["relative_hf_last"] = (mean(r["ttft_s"] for r in timed) / mean(r["hf_last_s"] for r in timed)
                                     if timed else None)
        entry.update(method=method, ratio=ratio, cases=len(rows),
                     ci=wilson_interval(sum(r["score"] for r in rows), len(rows)),
                     spent_ratio=mean(r["recomputed_tokens"] / max(r["context_tokens"], 1) for r in rows),
                     discriminative_score=mean(picked) if picked else None, discriminative_cases=len(picked),
                     discriminative_ci=wilson_interval(sum(picked), len(picked)) if picked else None,
                     vs_full=_paired(mine, scores.get((task, "full", 1.0), {})),
                     vs_baseline=_paired(mine, scores.get((task, baseline, ratio), {})))
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
        vs_full: dict = {}
        vs_baseline: dict = {}
        for e in entries:
            _add_paired(vs_full, e["vs_full"])
            _add_paired(vs_baseline, e["vs_baseline"])
        n = sum(e["cases"] for e in entries)
        disc_n = sum(k for _, k in disc)
        overall[label] = {
            "method": entries[0]["method"], "ratio": entries[0]["ratio"], "cases": n,
            "score": mean(e["score"] for e in entries),
            "ci": wilson_interval(sum(e["score"] * e["cases"] for e in entries), n),
            "discriminative_score": (sum(s * k for s, k in disc) / disc_n) if disc else None,
            "discriminative_cases": disc_n,
            "discriminative_ci": wilson_interval(sum(s * k for s, k in disc), disc_n) if disc else None,
            "vs_full": vs_full or None, "vs_baseline": vs_baseline or None,
            "spent_ratio": mean(e["spent_ratio"] for e in entries),
            "first_token_agree": mean(e["first_token_agree"] for e in entries),
            "kl": mean(e["kl"] for e in entries),
            "ttft_s": mean(e["ttft_s"] for e in entries),
            "relative_ttft": _mean_known(e["relative_ttft"] for e in entries),
            "relative_hf_last": _mean_known(e["relative_hf_last"] for e in entries),
            **{p: mean(e[p] for e in entries) for p in _PHASES},
        }
    # Overall accuracy relative to full is a ratio of task-averaged accuracies, not a mean of per-task ratios: a task
    # that full prefill itself rarely solves would otherwise turn one lucky case into a ratio of 2 or more.
    full_score = overall.get("full", {}).get("score")
    for entry in overall.values():
        entry["relative_accuracy"] = entry["score"] / full_score if full_score else None
    task_cases = {task: {"cases": len({r["case_id"] for r in records if r["task"] == task}),
                         "discriminative_cases": len({r["case_id"] for r in records
                                                      if r["task"] == task and r["case_id"] in discriminative})}
                  for task in tasks}
    models = sorted({str(r.get("model") or "unknown") for r in records})
    return {"model": ", ".join(models), "baseline": baseline, "tasks": dict(tasks), "overall": overall,
            "task_cases": task_cases, "cases": len(by_case), "discriminative_cases": len(discriminative)}


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _acc(score: float | None, ci) -> str:
    """Accuracy with its 95% interval: `0.48 [0.30-0.67]`."""
    return "-" if score is None else f"{score:.2f} [{ci[0]:.2f}-{ci[1]:.2f}]"


def _wl(paired: dict | None) -> str:
    return "-" if not paired else f"+{paired['wins']}/-{paired['losses']}"


def pivot(summary: dict, ratio: float) -> list[str]:
    """Markdown rows: one per task, one column per method at `ratio` (and full, reuse), accuracy with interval."""
    labels = [label for label, e in summary["overall"].items() if e["method"] in ("full", "reuse")]
    labels += [label for label, e in summary["overall"].items()
               if e["method"] not in ("full", "reuse") and math.isclose(e["ratio"], ratio)]
    lines = ["| task (cases, discr.) | " + " | ".join(labels) + " |", "| --- " * (len(labels) + 1) + "|"]
    for task, rows in summary["tasks"].items():
        counts = summary["task_cases"][task]
        cells = [_acc(rows[label]["score"], rows[label]["ci"]) if label in rows else "-" for label in labels]
        lines.append(f"| {task} ({counts['cases']}, {counts['discriminative_cases']}) | " + " | ".join(cells) + " |")
    cells = [_acc(summary["overall"][label]["score"], summary["overall"][label]["ci"]) for label in labels]
    lines.append("| **overall (mean over tasks)** | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict) -> str:
    base = summary.get("baseline", "prophet")
    lines = [f"Model {summary.get('model', '?')}: {summary['cases']} cases; {summary['discriminative_cases']} "
             "discriminative (full right, reuse wrong). Accuracy [Wilson 95% interval]; +W/-L: paired wins and "
             f"losses case by case against full and against {base} at the same ratio; spent: recomputed/context. "
             "TTFT x hf_last: against `model(ids, logits_to_keep=1)` on the same prompt ids (the prefill "
             "`model.generate` runs), timed once per case beside its runs; TTFT x full: against the engine's own full "
             "prefill. Methods ran at different times, so for speed claims use benchmarks/bench_ttft.py (interleaved).",
             "", "## Overall (mean over tasks)", "",
             f"| method | accuracy | rel. to full | discriminative | vs full | vs {base} | spent | first-token agree "
             "| KL | TTFT s | TTFT x hf_last | TTFT x full |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, e in summary["overall"].items():
        lines.append(f"| {label} | {_acc(e['score'], e['ci'])} | {_fmt(e['relative_accuracy'])} | "
                     f"{_acc(e['discriminative_score'], e['discriminative_ci'])} ({e['discriminative_cases']}) | "
                     f"{_wl(e['vs_full'])} | {_wl(e['vs_baseline'])} | {_fmt(e['spent_ratio'], 3)} | "
                     f"{_fmt(e['first_token_agree'])} | "
                     f"{_fmt(e['kl'], 3)} | {_fmt(e['ttft_s'], 3)} | {_fmt(e['relative_hf_last'], 3)} | "
                     f"{_fmt(e['relative_ttft'])} |")
    ratios = sorted({e["ratio"] for e in summary["overall"].values() if e["method"] not in ("full", "reuse")})
    for ratio in ratios:
        lines += ["", f"## Accuracy per task at ratio {ratio:g}", "", *pivot(summary, ratio)]
    for task, rows in summary["tasks"].items():
        lines += ["", f"## {task}", "",
                  f"| method | cases | accuracy | rel. to full | discriminative | vs full | vs {base} | agree | KL "
                  "| recomputed/context | TTFT s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for label, e in rows.items():
            lines.append(f"| {label} | {e['cases']} | {_acc(e['score'], e['ci'])} | {_fmt(e['relative_accuracy'])} | "
                         f"{_acc(e['discriminative_score'], e['discriminative_ci'])} ({e['discriminative_cases']}) | "
                         f"{_wl(e['vs_full'])} | {_wl(e['vs_baseline'])} | "
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
    left.set(xlabel="recompute ratio", ylabel="accuracy relative to full",
             title=f"Accuracy vs ratio ({summary.get('model', '?')})")
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


def _with_fidelity(text: str, summary: dict) -> str:
    if "fidelity" not in summary:
        return text
    return text + "\n## Fidelity to full prefill\n\n" + fidelity.markdown(summary["fidelity"])


def write_reports(results_path: Path, output_dir: Path, with_plot: bool = True, baseline: str = "prophet") -> dict:
    """`summary.json`, `results.md` and a plot. Records of several models are summarised apart: the summary then
    maps each model to its own (`{"models": {...}}`), the report has one part per model and each model its plot."""
    by_model = split_by_model(load_records(results_path))
    summaries = {model: summarize(rows, baseline) for model, rows in sorted(by_model.items())}
    for model, rows in by_model.items():
        if any("gold_ll" in r for r in rows):
            summaries[model]["fidelity"] = fidelity.summarize(rows)
    output_dir.mkdir(parents=True, exist_ok=True)
    if len(summaries) == 1:
        summary = next(iter(summaries.values()))
        text = _with_fidelity(markdown(summary), summary)
        if with_plot:
            plot(summary, output_dir / "plot.png")
    else:
        summary = {"models": summaries}
        text = "\n".join(f"# {model}\n\n" + _with_fidelity(markdown(s), s).replace("\n## ", "\n### ")
                         for model, s in summaries.items())
        if with_plot:
            for model, s in summaries.items():
                plot(s, output_dir / f"plot-{slug(model)}.png")
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (output_dir / "results.md").write_text(text, encoding="utf-8")
    return summary
