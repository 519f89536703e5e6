# Sourced by the install scripts (not run): one way to make a test venv and to install into it.
#   make_venv VENV RIG   creates VENV if needed and sets PIP=(VENV's pip) and PIN=(constraint flags):
#                        the local CPU torch and triton always (requirements/local-wheels.txt), plus the rig's lock
#                        requirements/RIG.txt unless KVTIER_UNLOCKED=1 (scripts/lock.sh refreshes locks).
# The machine-wide pip constraint (/etc/xdg/pip/constraints.txt on the CI machines) still applies on top.
# shellcheck shell=bash
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PIP_DISABLE_PIP_VERSION_CHECK=1

make_venv() {
    local venv=$1 rig=$2 py="${PYTHON:-python3.11}"
    command -v "$py" >/dev/null 2>&1 || py=python3
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
    PIP=("$venv/bin/python" -m pip)
    PIN=(-c "$ROOT/requirements/local-wheels.txt")
    if [ "${KVTIER_UNLOCKED:-0}" = 1 ]; then
        echo "[$rig] KVTIER_UNLOCKED=1: resolving without requirements/$rig.txt"
    elif [ -f "$ROOT/requirements/$rig.txt" ]; then
        PIN+=(-c "$ROOT/requirements/$rig.txt")
    fi
}

# pip_install ARGS...: `pip install ARGS` with $PIP, tried up to 3 times. A download from the package
# registry that breaks off (CI once lost a 285 MB wheel at 87 MB) costs a retry, not the rig; pip keeps
# what it already fetched in its cache, and a finished install makes the retry a no-op.
pip_install() {
    local try
    for try in 1 2 3; do
        "${PIP[@]}" install --retries 8 "$@" && return 0
        if [ "$try" != 3 ]; then
            echo "[pip] install failed (try $try of 3); retrying in $((try * 20)) s" >&2
            sleep $((try * 20))
        fi
    done
    echo "[pip] install failed 3 times: pip install $*" >&2
    return 1
}

# install_kvtier EXTRAS: kvtier with the extras EXTRAS (comma-separated) into $PIP, pinned by $PIN. With
# $KVTIER_WHEEL set (the install-from-wheel CI stage): any earlier kvtier (editable or not) is removed,
# scripts/check-install.sh proves the wheel changes no package already in the venv, then the wheel is
# installed. Else the repository in editable mode.
install_kvtier() {
    local extras=${1:+[$1]} venv
    venv="$(dirname "$(dirname "${PIP[0]}")")"
    if [ -n "${KVTIER_WHEEL:-}" ]; then
        "${PIP[@]}" uninstall -y -q kvtier >/dev/null 2>&1 || true
        "$ROOT/scripts/check-install.sh" "$KVTIER_WHEEL" "$venv" "$1"
        pip_install "${PIN[@]}" "$(realpath "$KVTIER_WHEEL")$extras"
    else
        pip_install "${PIN[@]}" -e "$ROOT$extras"
    fi
}
