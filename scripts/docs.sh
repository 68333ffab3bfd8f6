#!/usr/bin/env bash
# The API reference site (mkdocs.yml, docs/): installs the `docs` extra into ./.venv (after scripts/setup.sh
# has made it; both steps are skipped when already done) and runs `mkdocs build --strict` into a temp dir,
# removed afterwards: any warning (a broken link, a docstring mkdocstrings cannot read, a `jlora.*` name or a
# repository file the pages mention that does not exist) fails it. Then the README gets the same name and file
# check, and the code blocks marked `<!-- run -->` in the README and the pages run (docs/hooks.py --run).
# To read the site: .venv/bin/mkdocs serve (or build -d site/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
stamp=".venv/.jlora-docs-installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  # Only the extra's own requirements: jlora itself is already installed (editable) by scripts/setup.sh.
  .venv/bin/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["docs"]))' \
    > .venv/.jlora-docs-requirements.txt
  .venv/bin/python -m pip install -q -r .venv/.jlora-docs-requirements.txt
  touch "$stamp"
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
export NO_MKDOCS_2_WARNING=1 JAX_PLATFORMS=cpu
start=$SECONDS
.venv/bin/python -m mkdocs build --strict --site-dir "$out"
echo "docs: mkdocs build --strict passed in $((SECONDS - start)) s ($(find "$out" -name index.html | wc -l) pages)"
start=$SECONDS
.venv/bin/python docs/hooks.py --run README.md docs/*.md docs/guides/*.md
echo "docs: README and pages checked, their marked code blocks ran, in $((SECONDS - start)) s"
