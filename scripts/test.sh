#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite (CPU, offline, tiny models built on the fly).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k resume`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest tests "$@"
