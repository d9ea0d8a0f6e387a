"""From the repository root, the folder `kernels/` is also found as the top-level module `kernels`, the name of the
Hugging Face package transformers imports. These run a fresh interpreter there (`-S`: no site-packages, so the
outcome does not depend on whether this environment has that package) and check the name is handed over."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(pythonpath)} if pythonpath else {}
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def _fake_hub_package(tmp_path: Path) -> Path:
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text('MARK = "hub"\n')
    (tmp_path / "kernels" / "layer.py").write_text('NAME = "hub layer"\n')
    return tmp_path


def test_root_folder_would_be_found_as_kernels():
    assert (ROOT / "kernels" / "__init__.py").is_file()  # the premise of this file: a checkout has the folder


def test_import_kernels_at_root_gets_the_installed_package(tmp_path):
    result = _python("import kernels; print(kernels.MARK, kernels.__file__)", _fake_hub_package(tmp_path))
    assert result.returncode == 0, result.stderr
    mark, origin = result.stdout.split()
    assert mark == "hub"
    assert Path(origin).parent == tmp_path / "kernels"


def test_submodules_of_the_installed_package_import_at_root(tmp_path):
    result = _python("from kernels.layer import NAME; print(NAME)", _fake_hub_package(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hub layer"


def test_nothing_of_the_checkout_is_left_under_the_name(tmp_path):
    code = "import sys, kernels; print(sorted(m for m in sys.modules if m.split('.')[0] == 'kernels'))"
    result = _python(code, _fake_hub_package(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['kernels']"


def test_import_kernels_at_root_without_the_package_is_a_missing_module():
    result = _python("import kernels")
    assert result.returncode == 1
    assert "ModuleNotFoundError: No module named 'kernels'" in result.stderr

