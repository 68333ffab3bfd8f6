#!/usr/bin/env bash
# The README's test command: sets up ./.venv if needed, then runs the whole suite (tests + doctests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q -n 2 "$@"
