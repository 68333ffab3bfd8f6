#!/usr/bin/env bash
# The README's first command: sets up ./.venv if needed, then fine-tunes all-MiniLM-L6-v2 with LoRA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu
exec .venv/bin/python examples/finetune_minilm.py "$@"
