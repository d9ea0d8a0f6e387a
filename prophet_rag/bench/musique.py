"""Real multi-hop questions: CacheBlend's MuSiQue subset (`inputs/musique_s.json` in the public repository
YaoJiayi/CacheBlend), 150 questions with 10 Wikipedia passages each and gold answers.

Each passage is one chunk, in the file's order, and the prompt is CacheBlend's own (`MUSIQUE_PROMPT`): its
instruction before the passages, its question block after them. Cases 0-99 are the development set; 100-149 are kept
for an independent check (`DEV_CASES`, `HELD_OUT_CASES`).

The file names no supporting passages. `evidence_chunks` are the passages that contain a gold answer (after SQuAD
normalisation): the last hop's passage where the answer string can be found, empty where it cannot. The first hop
(the bridge entity's passage) cannot be told from this file.
"""

from __future__ import annotations

import json
from pathlib import Path

from prophet_rag.bench.scoring import normalize_answer
from prophet_rag.bench.tasks import Case
from prophet_rag.config import PromptConfig
from prophet_rag.errors import InvalidRequestError

DEV_CASES = range(0, 100)
HELD_OUT_CASES = range(100, 150)

MUSIQUE_PROMPT = PromptConfig(
    instruction=(
        "You will be asked a question after reading several passages. Please directly answer the question based on "
        "the given passages. Do NOT repeat the question. The answer should be within 5 words..\nPassages:"
    ),
    chunk_separator="\n\n",
    question_template=(
        "\n\nAnswer the question directly based on the given passages. Do NOT repeat the question. The answer "
        "should be within 5 words. \nQuestion:{query}\nAnswer:"
    ),
)
"""CacheBlend's instruction (example/blend_musique.py) around the passages, in the model's chat template."""


def _question(text: str) -> str:
    """CacheBlend's normalisation: a trailing question mark, the first letter lower-cased."""
    text = text.strip()
    if not text.endswith("?"):
        text += "?"
    return text[0].lower() + text[1:]


def _answers(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a.strip() for a in value):
        raise InvalidRequestError(f"{where}: 'answers' must be a non-empty list of strings.")
    return tuple(value)


def _passages(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(f"{where}: 'ctxs' must be a non-empty list of {{'title', 'text'}} passages.")
    passages = []
    for ctx in value:
        if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str) or not ctx["text"].strip():
            raise InvalidRequestError(f"{where}: every passage needs a non-empty 'text'.")
        title = ctx.get("title") or ""
        passages.append(f"{title}\n\n{ctx['text']}" if title else ctx["text"])
    return tuple(passages)


def answer_passages(passages: tuple[str, ...], answers: tuple[str, ...]) -> tuple[int, ...]:
    """Indices of the passages that contain a gold answer, compared after SQuAD normalisation."""
    golds = [f" {normalize_answer(a)} " for a in answers if normalize_answer(a)]
    return tuple(i for i, p in enumerate(passages) if any(g in f" {normalize_answer(p)} " for g in golds))


def load_musique(path: str | Path, cases: range = DEV_CASES) -> list[Case]:
    """The cases of `path` (CacheBlend's `musique_s.json` format) whose index is in `cases`."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidRequestError(
            f"{path} does not exist; download inputs/musique_s.json from the GitHub repository YaoJiayi/CacheBlend."
        ) from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{path} is not JSON ({exc.msg}); expected CacheBlend's musique_s.json.") from None
    if not isinstance(rows, list) or not rows:
        raise InvalidRequestError(f"{path} must hold a JSON list of {{ctxs, question, answers}} objects.")
    if cases.start < 0 or cases.stop > len(rows) or len(cases) == 0:
        raise InvalidRequestError(f"cases {cases.start}-{cases.stop - 1} are outside the file's 0-{len(rows) - 1}.")
    out = []
    for index in cases:
        row, where = rows[index], f"{path} case {index}"
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise InvalidRequestError(f"{where}: needs a non-empty 'question'.")
        passages, answers = _passages(row.get("ctxs"), where), _answers(row.get("answers"), where)
        out.append(Case("musique", f"musique-{index}", passages, _question(row["question"]), answers,
                        answer_passages(passages, answers)))
    return out
