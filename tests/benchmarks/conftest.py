import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def benchmarks_on_path():
    """The benchmarks folder first on sys.path, as python puts it for a script there: the scripts import their
    siblings (bench_scaling imports bench_ttft) by bare name."""
    folder = str(Path(__file__).resolve().parents[2] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)
