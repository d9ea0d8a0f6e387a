"""What the signal scripts share: their command line (MuSiQue cases or generated tasks, a store folder, a model) and
running the default up to its plan, which a script's spy on `prophet_focus.focus_plan` captures and ends with `Stop`.

    SCRIPT musique MUSIQUE_JSON STORE [CASES [MODEL]]     CASES: comma list of development case indices
    SCRIPT syn TASKS STORE [MODEL|-] [CHUNKS CHUNK_TOKENS]  TASKS: comma list; 8 cases each, seed 0
"""

from collections.abc import Iterator
from pathlib import Path

from prophet_rag.bench.musique import MUSIQUE_PROMPT, load_musique
from prophet_rag.bench.runner import BenchConfig, make_cases
from prophet_rag.config import StoreConfig
from prophet_rag.engine import ProphetEngine


class Stop(Exception):
    """Raised by a spy once it has what it wants: the default's selective forward never runs."""


def engine_and_cases(argv: list[str], default_cases: range = range(17)) -> tuple[ProphetEngine, list]:
    which, store = argv[1], StoreConfig(directory=Path(argv[3]))
    if which == "musique":
        model = argv[5] if len(argv) > 5 and argv[5] != "-" else None
        engine = ProphetEngine.from_pretrained(model, store=store, prompt=MUSIQUE_PROMPT)
        wanted = [int(c) for c in argv[4].split(",")] if len(argv) > 4 else list(default_cases)
        return engine, [c for c in load_musique(argv[2], range(0, 100)) if int(c.case_id.split("-")[1]) in wanted]
    model = argv[4] if len(argv) > 4 and argv[4] != "-" else None
    engine = ProphetEngine.from_pretrained(model, store=store)
    chunks, tokens = (int(argv[5]), int(argv[6])) if len(argv) > 6 else ((8, 10), (150, 300))
    config = BenchConfig(tasks=tuple(argv[2].split(",")), num_cases=8, seed=0, num_chunks=chunks,
                         chunk_tokens=tokens)
    return engine, make_cases(config, engine.tokenizer)


def planned(engine: ProphetEngine, cases: list, captured: dict) -> Iterator:
    """Each case, once the default has run up to its plan (`captured` cleared before, filled by the spy)."""
    for case in cases:
        engine.ingest(list(case.chunks))
        captured.clear()
        try:
            engine.answer(list(case.chunks), case.query, method="prophet_focus", ratio=0.2)
        except Stop:
            pass
        yield case

