"""Check the import contracts in pyproject.toml (`[tool.importlinter]`) over the package as it is installed.

import-linter reads a package from its folder. Here kernels/ and integrations/ are mapped into prophet_rag by
pyproject's `package-dir`, so from the checkout it would see neither: this copies the folders into the installed
layout (prophet_rag/kernels/, prophet_rag/integrations/) in a temporary directory and runs `lint-imports` there.
`make lint` runs it (`python tests/import_contracts.py`); tests/test_import_contracts.py runs it too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def assemble(target: Path) -> Path:
    """Copy every package folder of pyproject's `package-dir` to where it is installed under `target`."""
    folders = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    for package in sorted(folders, key=len):  # prophet_rag first, then the folders mapped into it
        shutil.copytree(ROOT / folders[package], target / package.replace(".", "/"),
                        ignore=shutil.ignore_patterns("__pycache__"))
    return target


def lint(tree: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over an assembled `tree` (which it finds first on sys.path: it runs from there)."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    command = [str(lint_imports), "--config", str(PYPROJECT), "--no-cache", "--no-logo"]
    return subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=300)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="prophet-rag-imports-") as tmp:
        result = lint(assemble(Path(tmp)))
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
