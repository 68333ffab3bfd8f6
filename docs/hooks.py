"""mkdocs hooks for the jlora site (mkdocs.yml `hooks:`); also a checker: `python docs/hooks.py [--run] FILE.md ...`.

- Every `jlora.<name>` a page mentions must exist (imported and looked up), and every repository file
  it names (`examples/quickstart.py`, `benchmarks/results/qlora_memory.md`, ...) must be there: a
  page that names a missing API or file is a warning, which fails `mkdocs build --strict`.
- `api/jlora.md` lists every name of `jlora.__all__` (its modules have pages of their own).
- Sphinx roles left in rendered docstrings (:class:`X`) are shown as code.
- `--run` (scripts/docs.sh): every ```python block right after a `<!-- run -->` line is executed, the
  blocks of one file in order in one namespace, in a temporary working directory, so the README's
  example and the pages' snippets stay real.
"""

from __future__ import annotations

import importlib
import logging
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
_NAME = re.compile(r"(?<![\w/.-])jlora(?:\.[A-Za-z_]\w*)+")
_FILE = re.compile(r"(?<![\w/.-])(?:examples|benchmarks|scripts|tests|jlora|docs)/[\w/.-]*\w\.(?:py|md|json|sh|png)")
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):(?=<code>)")
log = logging.getLogger("mkdocs.plugins.jlora")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def problems(text: str) -> list[str]:
    """The `jlora.*` names and repository files `text` mentions that do not exist."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    out = []
    for name in sorted(set(_NAME.findall(text))):
        if not _resolves(name):
            out.append(f"names {name}, which does not exist")
    for file in sorted(set(_FILE.findall(text))):
        if not (ROOT / file).exists():
            out.append(f"names the file {file}, which does not exist")
    return out


def surface_problems(markdown: str) -> list[str]:
    """api/jlora.md lists every non-module name of `jlora.__all__`, and each public module has a page."""
    import types

    import jlora

    public = {n for n in jlora.__all__ if not isinstance(getattr(jlora, n), types.ModuleType)}
    listed = set(re.findall(r"^ +- (\w+)$", markdown, re.M))
    out = [f"does not list jlora.{n} (in jlora.__all__)" for n in sorted(public - listed)]
    out += [f"lists {n}, which is not in jlora.__all__" for n in sorted(listed - public)]
    modules = {n for n in jlora.__all__ if isinstance(getattr(jlora, n), types.ModuleType)}
    out += [f"jlora.{n} (in jlora.__all__) has no page docs/api/{n}.md" for n in sorted(modules)
            if not (ROOT / "docs" / "api" / f"{n}.md").exists()]
    return out


def on_page_markdown(markdown, page, **kwargs):
    found = problems(markdown)
    if page.file.src_path == "api/jlora.md":
        found += surface_problems(markdown)
    for problem in found:
        log.warning("%s %s", page.file.src_path, problem)
    return markdown


def on_page_content(html, **kwargs):
    return _ROLE.sub("", html)


_RUN = re.compile(r"^<!-- run -->\n```python\n(.*?)^```$", re.S | re.M)


def run_blocks(path: str) -> int:
    """Executes the marked blocks of one file (see the module docstring); returns how many ran."""
    import contextlib
    import io
    import os
    import tempfile

    blocks = _RUN.findall(pathlib.Path(path).read_text())
    namespace: dict = {"__name__": "__docs__"}
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            for i, code in enumerate(blocks):
                with contextlib.redirect_stdout(io.StringIO()):  # what the blocks print is not the check's
                    exec(compile(code, f"{path} (run block {i + 1})", "exec"), namespace)
        finally:
            os.chdir(here)
    return len(blocks)


if __name__ == "__main__":
    run, files = "--run" in sys.argv, [a for a in sys.argv[1:] if a != "--run"]
    found = [f"{path} {p}" for path in files for p in problems(pathlib.Path(path).read_text())]
    print("\n".join(found) or f"{len(files)} files: every jlora.* name and repository file they name exists")
    if found:
        sys.exit(1)
    if run:
        sys.path.insert(0, str(ROOT))
        for path in files:
            if n := run_blocks(path):
                print(f"{path}: {n} code blocks ran")
