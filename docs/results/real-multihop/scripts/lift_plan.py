"""Per MuSiQue case: do prophet_focus and prophet plan the same slots in the same layout, and the default's
`Selection.lift`, `spread` and `plain`? Both plans are taken on the same request and stopped before the selective
forward.

    python lift_plan.py MUSIQUE_JSON STORE CASES [MODEL]   # CASES: comma list of development case numbers
"""

import json
import sys
from pathlib import Path

import prophet_rag.selection.prophet as prophet
import prophet_rag.selection.prophet_focus as focus
from prophet_rag.bench.musique import MUSIQUE_PROMPT, load_musique
from prophet_rag.config import StoreConfig
from prophet_rag.engine import ProphetEngine


class Stop(Exception):
    """Raised once the plan is read."""


got: dict = {}


def spy(name, plan):
    def wrapped(selection, cache, suffix_rows, budget):
        result = plan(selection, cache, suffix_rows, budget)
        signals = {"focus": len(selection.focus), "spread": selection.spread, "lift": round(selection.lift, 3),
                   "plain": selection.plain} if selection.parallel is not None else None
        got[name] = (result.selected.tolist(), list(cache.order), signals)
        raise Stop

    return wrapped


prophet.prophet_plan = spy("prophet", prophet.prophet_plan)
focus.focus_plan = spy("prophet_focus", focus.focus_plan)
engine = ProphetEngine.from_pretrained(sys.argv[4] if len(sys.argv) > 4 else None,
                                       store=StoreConfig(directory=Path(sys.argv[2])), prompt=MUSIQUE_PROMPT)
wanted = [int(c) for c in sys.argv[3].split(",")]
for case in [c for c in load_musique(sys.argv[1], range(0, 100)) if int(c.case_id.split("-")[1]) in wanted]:
    engine.ingest(list(case.chunks))
    got.clear()
    for method in ("prophet", "prophet_focus"):
        try:
            engine.answer(list(case.chunks), case.query, method=method, ratio=0.2)
        except Stop:
            pass
    plain, default = got["prophet"], got["prophet_focus"]
    print(json.dumps({"case": case.case_id, **default[2], "same_selection": plain[0] == default[0],
                      "same_order": plain[1] == default[1], "focus_order": default[1]}), flush=True)
