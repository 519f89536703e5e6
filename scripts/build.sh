#!/usr/bin/env bash
# Build kvtier's wheel and sdist into dist/ (replacing earlier kvtier builds there) and check what the wheel
# ships: the package and its data, no tests, no benchmarks, no results. Prints the wheel's path last.
# Usage: scripts/build.sh [PYTHON]   (default: .venv/bin/python, which has `build` from the dev extra)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-$ROOT/.venv/bin/python}"
cd "$ROOT"
rm -f dist/kvtier-*.whl dist/kvtier-*.tar.gz
"$PY" -m build --outdir dist . >/tmp/kvtier-build.$$.log 2>&1 || { cat /tmp/kvtier-build.$$.log >&2; exit 1; }
rm -f /tmp/kvtier-build.$$.log
wheel=$(ls dist/kvtier-*.whl)
"$PY" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
bad = [n for n in names if not (n.startswith("kvtier/") or ".dist-info/" in n)
       or n.startswith(("kvtier/tests/", "kvtier/benchmarks/")) or "/__pycache__/" in n]
assert not bad, f"the wheel ships files outside the package: {bad[:10]}"
meta = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
assert meta, "the wheel has no LICENSE"
size = sum(i.file_size for i in zipfile.ZipFile(sys.argv[1]).infolist())
print(f"build: {sys.argv[1]}: {len(names)} files, {size / 1e6:.1f} MB unpacked")
PY
echo "$wheel"
