"""Shared set-up for the kernel tests: the device, the Triton interpreter on CPU, NaN-poisoned allocations, comparisons.

Without CUDA the Triton kernels run through Triton's interpreter on CPU tensors. Triton reads TRITON_INTERPRET twice:
when `triton.language` is imported (its own jit'd library functions such as tl.sum and tl.max) and when a kernel is
decorated. `prophet_rag.kernels` imports Triton only at a kernel's first launch (`lazy_jit`), so setting the variable
here, before any kernel test runs, is early enough, unless something imported `triton` earlier in the session
(`from transformers import LlamaForCausalLM` does, for one): then the kernel tests fail with a message saying so, and
TRITON_INTERPRET=1 must come from the environment or from a conftest that runs first (tests/conftest.py).
`test_interpreter_is_active` checks that the interpreter is in use.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
TRITON_IMPORTED_TOO_EARLY = False
if not CUDA:
    TRITON_IMPORTED_TOO_EARLY = "triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda" if CUDA else "cpu")

# Relative RMS error, and max abs error relative to the largest reference magnitude, allowed per compute dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1.6e-2, 8e-2),
}


@pytest.fixture(autouse=True)
def interpreter_usable():
    if TRITON_IMPORTED_TOO_EARLY:
        pytest.fail(
            "triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1, so Triton's library "
            "functions cannot be interpreted on CPU; set TRITON_INTERPRET=1 in the environment or in tests/conftest.py."
        )


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def nan_empty(monkeypatch):
    """`torch.empty` / `torch.empty_like` called from `prophet_rag.kernels` return NaN-filled floats.

    A tile that a kernel forgets to write then shows up as NaN instead of whatever memory held.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(alloc):
        def wrapper(*args, **kwargs):
            out = alloc(*args, **kwargs)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("prophet_rag.kernels") and out.is_floating_point():
                out.fill_(float("nan"))
            return out

        return wrapper

    monkeypatch.setattr(torch, "empty", poisoned(real_empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(real_empty_like))


@pytest.fixture
def assert_close():
    """Compare to a reference: no NaN on either side, relative RMS error and max abs error within the dtype's bounds."""

    def check(
        actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, what: str = ""
    ) -> None:
        what = f"{what}: " if what else ""
        assert actual.shape == expected.shape, (actual.shape, expected.shape)
        assert not expected.isnan().any(), f"{what}reference has NaN"
        assert not actual.isnan().any(), f"{what}{int(actual.isnan().sum())} NaN in the result (an unwritten tile?)"
        rms_tol, abs_tol = TOLERANCES[dtype]
        a, e = actual.double().cpu(), expected.double().cpu()
        err = a - e
        rel_rms = float(err.norm() / e.norm().clamp_min(1e-30))
        max_abs = float(err.abs().max()) if err.numel() else 0.0
        bound = abs_tol * scale * max(1.0, float(e.abs().max()) if e.numel() else 0.0)
        assert rel_rms <= rms_tol * scale, f"{what}relative RMS error {rel_rms:.3g} > {rms_tol * scale:.3g}"
        assert max_abs <= bound, f"{what}max abs error {max_abs:.3g} > {bound:.3g}"

    return check
