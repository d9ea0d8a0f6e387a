"""Backend choice of the dispatch functions, and that the CPU test run really goes through Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

from prophet_rag.kernels import backend_for, use_backend
from prophet_rag.kernels.rope_shift import _rope_shift_kernel
from prophet_rag.kernels.triton_util import lazy_jit


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv("PROPHET_RAG_KERNELS", raising=False)


def test_cpu_tensors_use_torch():
    assert backend_for(torch.zeros(3)) == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_use_triton():
    assert backend_for(torch.zeros(3, device="cuda")) == "triton"


def test_use_backend_nests_and_restores():
    cpu = torch.zeros(3)
    with use_backend("triton"):
        assert backend_for(cpu) == "triton"
        with use_backend("torch"):
            assert backend_for(cpu) == "torch"
        assert backend_for(cpu) == "triton"
        with use_backend(None):
            assert backend_for(cpu) == "torch"
        assert backend_for(cpu) == "triton"
    assert backend_for(cpu) == "torch"


def test_use_backend_restores_after_an_exception():
    with pytest.raises(RuntimeError), use_backend("triton"):
        raise RuntimeError
    assert backend_for(torch.zeros(3)) == "torch"


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError), use_backend("cuda"):
        pass


def test_env_forces_a_backend(monkeypatch):
    monkeypatch.setenv("PROPHET_RAG_KERNELS", "triton")
    assert backend_for(torch.zeros(3)) == "triton"
    with use_backend("torch"):
        assert backend_for(torch.zeros(3)) == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the kernels are compiled, not interpreted")
def test_interpreter_is_active():
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(lazy_jit(_rope_shift_kernel), InterpretedFunction)
