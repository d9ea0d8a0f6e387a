"""Helpers shared by the Triton kernel modules: deferred `triton.jit`, tile sizes, the SM count, log2(e).

Nothing here imports Triton at import time (see `lazy_jit`). Each kernel module declares `tl = None` at the top,
which `lazy_jit` binds to `triton.language` at the first launch.
"""

from __future__ import annotations

import functools

import torch

LOG2E = 1.4426950408889634
"""log2(e): the kernels take softmax in base 2 (exp2 is one instruction), with logits pre-multiplied by this."""


@functools.cache
def lazy_jit(fn):
    """`triton.jit(fn)`, decorated at its first launch.

    Deferred because Triton decides at import whether its own library functions (tl.max, tl.sum, ...) are
    interpretable, and reads TRITON_INTERPRET again at decoration: importing this package must not import Triton
    before a test harness has set TRITON_INTERPRET (the kernel tests' conftest on a machine without CUDA). Triton is
    also optional. Binds the kernel module's `tl`.
    """
    import triton
    import triton.language

    fn.__globals__["tl"] = triton.language
    return triton.jit(fn)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (tile extents must be powers of two)."""
    return 1 << max(0, n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`, for sizing split-K grids."""
    if device.type != "cuda":
        return 4  # the interpreter (CPU tensors): a handful of splits still exercises the merges
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
