#!/usr/bin/env bash
# Refresh the test rigs' locks requirements/{main,vllm,sglang}.txt (pip constraints; kvtier's own dependency
# ranges in pyproject.toml stay loose, only the test rigs are locked).
#
#   scripts/lock.sh [RIG ...]           build each rig (default: main vllm sglang) unlocked in a scratch folder
#                                       with its install script and freeze it; then run ./scripts/test.sh and
#                                       commit requirements/ when it is green
#   scripts/lock.sh --reuse [RIG ...]   freeze the repository's own .venv / .venv-vllm / .venv-sglang instead
#                                       (e.g. after a green `KVTIER_UNLOCKED=1 ./scripts/test.sh`)
#
# kvtier itself and editable installs (the SGLang CPU test plugin) are left out of a lock; every other package
# is pinned by version (also one installed from a file URL); the local CPU torch appears as torch==2.13.0+cpu.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
reuse=0
if [ "${1:-}" = --reuse ]; then reuse=1; shift; fi
rigs=("$@")
[ ${#rigs[@]} -gt 0 ] || rigs=(main vllm sglang)
scratch=""
if [ "$reuse" = 0 ]; then
    scratch="$(mktemp -d "${TMPDIR:-/tmp}/kvtier-lock.XXXXXX")"
    trap 'rm -rf "$scratch"' EXIT
fi

for rig in "${rigs[@]}"; do
    case "$rig" in
        main) own=.venv ;;
        vllm) own=.venv-vllm ;;
        sglang) own=.venv-sglang ;;
        *) echo "lock: unknown rig '$rig' (main, vllm, sglang)" >&2; exit 2 ;;
    esac
    if [ "$reuse" = 1 ]; then
        venv="$ROOT/$own"
    else
        venv="$scratch/$rig"
        echo "[lock] building $rig unlocked in $venv"
        KVTIER_UNLOCKED=1 KVTIER_WHEEL="" "$ROOT/scripts/install-$rig.sh" "$venv"
    fi
    {
        echo "# Lock of the $rig test rig (pip constraints), written by scripts/lock.sh on $(date -u +%F); do not edit."
        echo "# $("$venv/bin/python" --version)"
        "$venv/bin/python" - <<'PY'
import json
from importlib.metadata import distributions

# name==version of every distribution but kvtier and editable installs (a direct-URL install is pinned by
# version too: its URL is not reproducible, the version is resolved from the index on the next install)
rows = {}
for dist in distributions():
    name, url = dist.metadata["Name"], dist.read_text("direct_url.json")
    if name.lower() == "kvtier" or (url and json.loads(url).get("dir_info", {}).get("editable")):
        continue
    rows[name.lower()] = f"{name}=={dist.version}"
print("\n".join(rows[key] for key in sorted(rows)))
PY
    } > "$ROOT/requirements/$rig.txt"
    echo "[lock] requirements/$rig.txt: $(grep -vc '^#' "$ROOT/requirements/$rig.txt") packages"
done
