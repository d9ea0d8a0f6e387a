"""Every notebook in notebooks/ is valid nbformat-4 JSON whose code cells compile (IPython magics and shell lines
excepted), so a syntax error in a tutorial fails CI without running the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb file"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_and_its_code_compiles(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4
    cells = notebook["cells"]
    assert any(cell["cell_type"] == "code" for cell in cells)
    for i, cell in enumerate(cells):
        assert cell["cell_type"] in ("markdown", "code", "raw"), f"cell {i} has type {cell['cell_type']!r}"
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        # Magics and shell escapes are IPython syntax; blanking them keeps the line numbers of errors right.
        lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()]
        compile("\n".join(lines), f"{path.name}:cell{i}", "exec")
