"""Fidelity to full prefill, for real documents where gold accuracy cannot tell methods apart on small models.

Per case, full prefill gives the reference: its greedy answer and, by teacher forcing, its next-token distributions
along that answer and its log-likelihood of each gold answer. Every method is then measured against it on the same
tokens (`engine.continuation_logits`):

- `gold_ll`: the summed log-probability of the best gold alias (the answer's tokens fed after the prompt), and
  `gold_ll_gap`, the method's minus full prefill's (0 is as good as full; negative is worse);
- `kl8`: KL(full || method) of the next-token distributions, averaged over the first `KL_POSITIONS` tokens of full
  prefill's answer (the method is forced along full's answer, so the distributions compare like for like);
- `first_token_agree` (in every record already) and `agreement_f1`: token F1 between the method's answer and full
  prefill's.

`summarize` gives per method and ratio the means with bootstrap 95% intervals over cases, and the paired difference
of the default method against each other method at the same ratio.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import torch

from prophet_rag.bench.scoring import token_f1
from prophet_rag.config import SelectionConfig

KL_POSITIONS = 8
FIDELITY_METRICS = ("f1", "gold_ll", "gold_ll_gap", "kl8", "first_token_agree", "agreement_f1", "evidence_share",
                    "evidence_moved")


def answer_ids(tokenizer, answer: str) -> list[int]:
    """A gold answer's token ids as the model would write it after the prompt's "Answer:" (one leading space)."""
    return tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Reference:
    """Full prefill's side of one case."""

    text: str
    forced: list[int]
    """The first `KL_POSITIONS` (or fewer) token ids of full prefill's greedy answer."""
    log_probs: torch.Tensor
    """`[len(forced), vocab]` full prefill's next-token log-probabilities along `forced`."""
    gold_ll: float

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"text": self.text, "forced": self.forced, "log_probs": self.log_probs.half(),
                    "gold_ll": self.gold_ll}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Reference | None:
        if not path.exists():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return cls(str(data["text"]), [int(t) for t in data["forced"]], data["log_probs"].float(),
                       float(data["gold_ll"]))
        except Exception:  # a file torn by an interrupted write: measure the reference again
            return None


def _gold_ll(logits: list[torch.Tensor], golds: list[list[int]]) -> float:
    """The best alias's summed log-probability."""
    return max(float(torch.log_softmax(rows, -1).gather(1, torch.tensor(ids)[:, None]).sum())
               for rows, ids in zip(logits, golds, strict=True))


def _forced_logits(engine, chunks: list[str], query: str, selection: SelectionConfig, golds: list[list[int]],
                   forced: list[int]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    targets = golds + ([forced] if forced else [])
    logits = engine.continuation_logits(chunks, query, targets, selection=selection)
    return logits[: len(golds)], (logits[-1] if forced else None)


def reference(engine, chunks: list[str], query: str, answers: tuple[str, ...], full_text: str,
              full_ids: tuple[int, ...]) -> Reference:
    """Full prefill's reference for one case, from its greedy answer (`full_text`, `full_ids`)."""
    golds = [answer_ids(engine.tokenizer, a) for a in answers]
    forced = list(full_ids[:KL_POSITIONS])
    gold_logits, along = _forced_logits(engine, chunks, query, SelectionConfig(method="full"), golds, forced)
    log_probs = torch.log_softmax(along, -1) if along is not None else torch.empty(0)
    return Reference(full_text, forced, log_probs, _gold_ll(gold_logits, golds))


def measure(engine, chunks: list[str], query: str, answers: tuple[str, ...], selection: SelectionConfig,
            text: str, ref: Reference) -> dict:
    """One method's fidelity fields for a record, against full prefill's `ref`."""
    golds = [answer_ids(engine.tokenizer, a) for a in answers]
    gold_logits, along = _forced_logits(engine, chunks, query, selection, golds, ref.forced)
    gold_ll = _gold_ll(gold_logits, golds)
    kl = None
    if along is not None:
        q_log = torch.log_softmax(along.to(torch.float64), -1)
        p_log = ref.log_probs.to(torch.float64)
        kl = float((p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0.0).mean())
    return {"gold_ll": gold_ll, "gold_ll_gap": gold_ll - ref.gold_ll, "kl8": kl,
            "agreement_f1": token_f1(text, (ref.text,)) if ref.text.strip() else float(not text.strip())}


def evidence_fields(record: dict) -> dict:
    """Where the method spent its budget against the answer's passages: the share of their tokens recomputed
    (`evidence_share`) and whether any of them was moved from its retrieval place (`evidence_moved`); empty when
    the case names no evidence passage or the record has no per-chunk counts."""
    evidence, counts, lengths = record.get("evidence_chunks"), record.get("selected_per_chunk"), \
        record.get("chunk_tokens")
    if not evidence or counts is None or lengths is None:
        return {}
    order = record.get("chunk_order") or list(range(len(lengths)))
    share = sum(counts[i] for i in evidence) / max(sum(lengths[i] for i in evidence), 1)
    moved = any(order.index(i) != i for i in evidence if i in order)
    return {"evidence_share": share, "evidence_moved": float(moved)}


def bootstrap_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (math.nan, math.nan)
    rng = random.Random(seed)
    means = sorted(mean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def _label(method: str, ratio: float) -> str:
    return method if method in ("full", "reuse") else f"{method}@{ratio:g}"


def summarize(records: list[dict], default: str = "prophet_focus") -> dict:
    """Per label (method@ratio): cases, each metric's mean and bootstrap interval; and per ratio the paired
    difference `default - other` of every metric, per case, with its interval. Records of one model."""
    rows = [{**r, **evidence_fields(r)} for r in records if "gold_ll" in r]
    by_label: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_label[_label(r["method"], float(r["ratio"]))][r["case_id"]] = r
    out: dict = {"methods": {}, "paired": {}}
    for label, cases in sorted(by_label.items()):
        entry = {"cases": len(cases)}
        for metric in FIDELITY_METRICS:
            values = [float(r[metric]) for r in cases.values() if r.get(metric) is not None]
            entry[metric] = mean(values) if values else None
            entry[f"{metric}_ci"] = bootstrap_interval(values) if values else None
        out["methods"][label] = entry
    for label, cases in by_label.items():
        method, _, ratio = label.partition("@")
        if method != default:
            continue
        for other, theirs in by_label.items():
            if other == label or other.partition("@")[2] not in ("", ratio):
                continue
            common = sorted(set(cases) & set(theirs))
            diffs = {}
            for metric in ("gold_ll_gap", "kl8", "agreement_f1", "first_token_agree"):
                values = [float(cases[c][metric]) - float(theirs[c][metric]) for c in common
                          if cases[c].get(metric) is not None and theirs[c].get(metric) is not None]
                diffs[metric] = {"mean": mean(values), "ci": bootstrap_interval(values)} if values else None
            out["paired"][f"{label} - {other}"] = {"cases": len(common), **diffs}
    return out


def _cell(entry: dict, metric: str, digits: int = 2) -> str:
    value, ci = entry.get(metric), entry.get(f"{metric}_ci")
    if value is None:
        return "-"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def markdown(summary: dict) -> str:
    """The fidelity tables: per method, then the default's paired differences."""
    lines = ["| method | cases | gold F1 | gold log-lik | gap to full | KL to full (8 pos.) | first token = full | "
             "answer F1 vs full | answer passages recomputed | moved |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, e in summary["methods"].items():
        lines.append(f"| {label} | {e['cases']} | {_cell(e, 'f1')} | {_cell(e, 'gold_ll')} | "
                     f"{_cell(e, 'gold_ll_gap')} | {_cell(e, 'kl8', 3)} | {_cell(e, 'first_token_agree')} | "
                     f"{_cell(e, 'agreement_f1')} | {_cell(e, 'evidence_share')} | {_cell(e, 'evidence_moved')} |")
    if summary["paired"]:
        lines += ["", "| paired (per case) | cases | gap to full | KL to full | answer F1 vs full | first token |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for pair, d in sorted(summary["paired"].items()):
            cells = [f"{d[m]['mean']:+.3f} [{d[m]['ci'][0]:+.3f}, {d[m]['ci'][1]:+.3f}]" if d[m] else "-"
                     for m in ("gold_ll_gap", "kl8", "agreement_f1", "first_token_agree")]
            lines.append(f"| {pair} | {d['cases']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
