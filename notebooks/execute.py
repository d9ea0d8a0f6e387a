"""Execute the tutorials and save their outputs into them: `make notebooks` (offline, on the embedded model).

Each notebook runs in a scratch folder holding a copy of data/, so the KV stores the notebooks write stay out of the
tree. The test suite runs the same `execute` on fresh copies (tests/integrations/test_notebooks.py).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NOTEBOOKS = sorted(HERE.glob("*.ipynb"))


def execute(path: Path, workdir: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """`path` run top to bottom with `workdir` as its working folder; raises on the first failing cell."""
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    return book


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        shutil.copytree(HERE / "data", workdir / "data")
        for path in NOTEBOOKS:
            print(f"executing {path.name} ...", flush=True)
            nbformat.write(execute(path, workdir), path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
