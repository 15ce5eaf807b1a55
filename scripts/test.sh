#!/usr/bin/env bash
# Set up the environment if needed, then run the whole test suite (CPU, offline, tiny models built on
# the fly). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k resume`.
# VERSIONS=min runs it on every dependency's lower bound, in .venv-min (see scripts/setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
venv=.venv
[ "${VERSIONS:-newest}" = min ] && venv=.venv-min
exec "$venv/bin/python" -m pytest tests "$@"
