#!/usr/bin/env bash
# virtwatch developer entry point: installs what is missing, then runs.
#
#   ./dev.sh run    build a venv and run the daemon on the embedded demo host
#                   (libvirt's in-process test driver: no hypervisor needed); /metrics on :9177
#   ./dev.sh test   install everything the tests need, run the guard rails (ruff, mypy), then
#                   the whole suite (e2e included); extra arguments go to pytest
#   ./dev.sh lint   only the guard rails: ruff, mypy and the import-layer test (seconds)
#   ./dev.sh venv   only (re)build the venv
#
# Debian packages come from .ci/apt-run.txt (run) and .ci/apt-packages.txt (test); only the
# missing ones are installed (with sudo when not root). The venv lives in .venv (override: VENV=...).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

packages() { grep -v '^[[:space:]]*#' "$1" | sed '/^[[:space:]]*$/d'; }

apt_install() {
    local missing=() pkg
    for pkg in $(packages "$1"); do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "dev.sh: installing Debian packages: ${missing[*]}" >&2
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
}

venv() {
    local stamp="$VENV/.virtwatch-stamp"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e '.[test]'
        touch "$stamp"
    fi
}

# The guard rails (DEVELOPERS.md, "Guard rails"): a finding stops the run before the tests.
checks() {
    echo "dev.sh: ruff check" >&2
    "$VENV/bin/ruff" check --quiet .
    echo "dev.sh: mypy" >&2
    "$VENV/bin/mypy"
}

case "${1:-}" in
    run)
        shift
        apt_install .ci/apt-run.txt
        venv
        exec "$VENV/bin/virtwatch" run --config config/virtwatch.demo.toml --uri "test://$PWD/config/demo-host.xml" "$@"
        ;;
    test)
        shift
        apt_install .ci/apt-packages.txt
        venv
        checks
        exec "$VENV/bin/python" -m pytest -ra "$@"
        ;;
    lint)
        apt_install .ci/apt-run.txt
        venv
        checks
        exec "$VENV/bin/python" -m pytest -q tests/unit/test_layers.py tests/unit/test_module_size.py
        ;;
    venv)
        apt_install .ci/apt-run.txt
        venv
        ;;
    *)
        sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
