"""Loading a model for `ProphetEngine.from_pretrained`: where it is, on which device, and from where it may come.

Owns the checks that fail fast with the fix in the message (`ModelLoadError`) before transformers is even imported:
a path that is not a model folder, a device this process cannot use, a hub id on a machine that cannot reach the
hub (the hub client alone would retry for ~25 s), then the load itself.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
from pathlib import Path

import torch

from prophet_rag.config import MODEL_DTYPES
from prophet_rag.errors import ModelLoadError


def model_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype named `name` (one of `MODEL_DTYPES`), or None for "auto"/None: fp32 on a CPU, bf16 on CUDA.

    bf16 pays on CPUs with AMX (Sapphire Rapids and later), where its matmuls run at 2-3x fp32's; elsewhere fp32 is
    faster and is the precision the methods' quality was measured in."""
    if name is None or name == "auto":
        return None
    if name not in MODEL_DTYPES:
        raise ModelLoadError(f"dtype {name!r} is not one the model can be loaded in; pass one of "
                             f"{', '.join(('auto', *MODEL_DTYPES))}.")
    return getattr(torch, name)


def load_pretrained(name_or_path: str | os.PathLike | None, device: str | torch.device,
                    dtype: torch.dtype | None) -> tuple[object, object, str]:
    """`(model, tokenizer, name)`: a causal LM on `device` and its tokenizer; None or "embedded" loads the embedded
    SmolLM2-135M-Instruct. `dtype` defaults to fp32 on the CPU, bf16 elsewhere."""
    from prophet_rag.embedded import EMBEDDED_NAME, embedded_model_dir

    device = check_device(device)
    if name_or_path in (None, "embedded", EMBEDDED_NAME):
        path, name = embedded_model_dir(), EMBEDDED_NAME
    else:
        path, name = model_location(name_or_path), str(name_or_path)
    hub = hub_options(path) if not Path(path).is_dir() else {}  # before importing transformers: fails fast
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **hub).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, **hub)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"cannot load a causal LM and its tokenizer from {name!r}: {error}. Pass a model folder with "
            "config.json, the weights and the tokenizer files, or no model for the embedded SmolLM2-135M."
        ) from None
    return model, tokenizer, name


def model_location(name_or_path: str | os.PathLike) -> str:
    """A local folder, or a hub id. Something written as a path (absolute, relative, home) must exist: it is never
    looked up on a model hub, where it could only fail slowly."""
    text = os.fspath(name_or_path)
    local = Path(text).expanduser()
    if local.is_dir():
        return str(local)
    hub_id = not text.startswith(("/", ".", "~")) and text.count("/") <= 1  # "name" or "org/name"
    if not hub_id or local.exists():
        raise ModelLoadError(f"{text!r} is not a model folder; pass a folder with config.json and the weights.")
    return text


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch device this process can use; else a `ModelLoadError` naming the fix."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ModelLoadError(f"device {device!r} is not a device: {error}; pass 'cpu', 'cuda' or 'cuda:N'.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count <= (device.index or 0):
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else f"{count} CUDA device(s) are visible")
            raise ModelLoadError(
                f"device {str(device)!r} was asked for, but {why}; pass device='cpu' (the framework adapters' "
                "device='auto' picks CUDA only where it is there), or install a CUDA build of torch on a GPU machine."
            )
    return device


def reachable(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a TCP connection to `url`'s host opens within `timeout_s` (name lookup included). True behind a
    proxy, which only the hub client itself can go through."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    opened: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
            opened.append(True)
        except OSError:
            pass

    # A thread bounds the name lookup too, which no socket timeout covers.
    thread = threading.Thread(target=probe, daemon=True, name="prophet-rag-hub-probe")
    thread.start()
    thread.join(timeout_s)
    return bool(opened)


def hub_options(hub_id: str) -> dict:
    """`from_pretrained` options for a model named by hub id: the local Hugging Face cache only when it holds the
    model; else the hub, when it can be reached. The hub client retries an unreachable hub for ~25 s before failing,
    so an offline machine (HF_HUB_OFFLINE, or no connection within a second) is told at once instead."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        return {"local_files_only": True}
    where = f"{hub_id!r} is not a model folder and not in the Hugging Face cache"
    fix = f"download it where the hub can be reached (`hf download {hub_id}`) or pass a model folder"
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"{where}, and HF_HUB_OFFLINE is set; {fix}.")
    if not reachable(constants.ENDPOINT):
        raise ModelLoadError(f"{where}, and {constants.ENDPOINT} cannot be reached; {fix}.")
    return {}
