#!/usr/bin/env bash
# The README's first command: sets up ./.venv if needed, then instruction-tunes SmolLM2-135M-Instruct with LoRA
# (JSON extraction; zero-shot vs LoRA on held-out examples; PEFT export checked in transformers).
# Outputs: the next free runs/smollm_extraction/run-NNN/ (printed at the end). Extra arguments go to the script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu
exec .venv/bin/python examples/finetune_smollm.py "$@"
