#!/usr/bin/env bash
# Create (or refresh) the project's environment in .venv: the trainer's requirements plus pytest.
# Re-running is cheap: nothing is installed again until requirements.txt changes.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.requirements.sha256"
wanted="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "Installing requirements into .venv (the first time takes a few minutes)..."
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt pytest
    echo "$wanted" > "$stamp"
fi
