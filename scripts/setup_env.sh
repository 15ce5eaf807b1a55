#!/usr/bin/env bash
# Create (or refresh) the project's environment: the trainer's requirements, the trainer and its package
# installed in place (so scripts/ and tests/ import them; edits take effect at once), pytest and ruff.
#   VERSIONS=newest (default): .venv, the newest releases requirements.txt admits;
#   VERSIONS=min: .venv-min, every package at its lower bound (requirements-min.txt as pip constraints).
# Re-running is cheap: nothing is installed again until requirements.txt (or the constraints) change.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
case "${VERSIONS:-newest}" in
    newest) venv=.venv; constraints=() ;;
    min) venv=.venv-min; constraints=(-c requirements-min.txt) ;;
    *) echo "VERSIONS must be 'newest' or 'min', not '${VERSIONS}'." >&2; exit 2 ;;
esac
if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -m venv "$venv"
fi
stamp="$venv/.requirements.sha256"
wanted="$(cat requirements.txt pyproject.toml "${constraints[@]:1}" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "Installing requirements into $venv (the first time takes a few minutes)..."
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt "${constraints[@]}" \
        pytest ruff "setuptools>=70.1"  # 70.1: editable installs without the wheel package
    # In place, with the setuptools above (no build isolation: nothing more to fetch) and the dependencies above.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
    echo "$wanted" > "$stamp"
fi
