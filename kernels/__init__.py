"""The query-path ops (`dispatch`): Triton kernels beside their pure-torch references, installed as
`prophet_rag.kernels`.

Run from the repository root (`python -c`, `python -m`, a REPL), this folder is also found under the top-level name
`kernels`, which is the name of the Hugging Face package transformers imports. It then hands that name over to the
installed package it shadows, or fails as a missing module when there is none, so a checkout never changes what
`import kernels` means.
"""

from __future__ import annotations

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns whatever this name holds once we finish
    _spec.loader.exec_module(_module)
else:
    from .dispatch import (
        BACKENDS,
        attention_plan,
        backend_for,
        query_scores,
        rope_shift,
        sparse_attention,
        stage1_attention,
        triton_available,
        use_backend,
    )

    __all__ = [
        "BACKENDS",
        "attention_plan",
        "backend_for",
        "query_scores",
        "rope_shift",
        "sparse_attention",
        "stage1_attention",
        "triton_available",
        "use_backend",
    ]
