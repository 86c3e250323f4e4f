#!/usr/bin/env bash
# Type-checks and tests the Python client against the real server.
#
#   PYTHON=/usr/bin/python3 bash clients/python/run_tests.sh [pytest args...]
#
# Makes a venv in clients/python/.venv (with the system's site-packages, so
# Debian's python3-pytest and mypy are used when present), installs the
# package and whatever of pytest and mypy is missing, runs `mypy --strict`
# on the package and the tests, then pytest. The server binary is
# $TRADEID_BIN, else target/debug/tradeid (built with cargo if missing).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# A relative $TRADEID_BIN means relative to where the caller stands.
if [ -n "${TRADEID_BIN:-}" ]; then TRADEID_BIN="$(realpath "$TRADEID_BIN")"; export TRADEID_BIN; fi
cd "$here"
PYTHON="${PYTHON:-python3}"
venv="${TRADEID_PY_VENV:-$here/.venv}"

# A venv made by another interpreter is replaced, not reused.
want_version="$("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
if [ -x "$venv/bin/python" ] && [ "$("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])')" != "$want_version" ]; then
    rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"

missing=()
"$py" -c 'import pytest' 2>/dev/null || missing+=(pytest)
"$py" -c 'import mypy' 2>/dev/null || missing+=(mypy)
if [ ${#missing[@]} -gt 0 ]; then
    "$py" -m pip install --quiet "${missing[@]}"
fi
# The package itself, as a user would install it (no editable install);
# then remove what setuptools leaves in the source tree.
"$py" -m pip install --quiet --force-reinstall --no-deps "$here"
rm -rf "$here/build" "$here"/src/*.egg-info

echo "==> mypy --strict"
"$py" -m mypy --strict --python-version 3.9 src/tradeid   # the oldest Python the package supports
"$py" -m mypy --strict tests bench.py

echo "==> pytest"
# Run from tests/ against the installed package, not the source tree.
"$py" -m pytest -p no:cacheprovider "$@" tests
