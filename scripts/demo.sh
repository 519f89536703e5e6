#!/usr/bin/env bash
# Set up what the demo needs (idempotent) and run the main job: long-document QA on the embedded model,
# CPU + disk tiers.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --demo
export HF_HUB_OFFLINE=1
exec .venv/bin/kvtier demo "$@"
