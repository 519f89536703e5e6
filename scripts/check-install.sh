#!/usr/bin/env bash
# Prove that installing kvtier next to an engine changes nothing the engine brought:
#   scripts/check-install.sh WHEEL VENV [EXTRAS]
# runs `pip install --dry-run --report` of WHEEL[EXTRAS] into VENV the way a user would (no lock, no
# constraints of ours) and fails if any package already present in VENV would be installed at another
# version. New packages (kvtier's own dependencies the engine lacks) are listed, not refused.
# scripts/test.sh runs it (through install-vllm.sh / install-sglang.sh) for kvtier[vllm,redis] in .venv-vllm
# and kvtier[sglang] in .venv-sglang before installing the wheel there.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 WHEEL VENV [EXTRAS]" >&2; exit 2; }
wheel="$(realpath "$1")" venv="$2" extras="${3:+[$3]}"
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install --dry-run --quiet --report "$report" \
    "$wheel$extras"
"$venv/bin/python" - "$report" "$venv" "$(basename "$wheel")$extras" <<'PY'
import json, sys
from importlib.metadata import distributions

def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")

report, venv, what = sys.argv[1:]
present = {norm(d.metadata["Name"]): d.version for d in distributions()}
changed, added = [], []
for item in json.load(open(report))["install"]:
    name, new = norm(item["metadata"]["name"]), item["metadata"]["version"]
    if name == "kvtier":
        continue
    if name in present:
        changed.append(f"{name} {present[name]} -> {new}")
    else:
        added.append(f"{name}=={new}")
print(f"check-install: {what} into {venv}: {len(added)} new package(s)"
      + (f" ({', '.join(sorted(added))})" if added else "") + f", {len(changed)} changed")
if changed:
    print("check-install: FAILED, installing kvtier would change what the engine's environment has:\n  "
          + "\n  ".join(changed), file=sys.stderr)
    sys.exit(1)
PY
