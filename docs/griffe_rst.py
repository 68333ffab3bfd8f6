"""Griffe extension for the docs build: jlora's docstrings are Google style with reST touches.

It rewrites each docstring before mkdocstrings renders it (the source is untouched):
- a doctest block (``>>>`` lines and their output, up to a blank line) becomes a fenced
  ``pycon`` block, so Markdown does not read ``x["A"]`` as a link reference; an ``Example:``
  section becomes a bold line followed by its body;
- an argument line naming several parameters (``apply_fn, args: ...``) becomes one item each;
- a paragraph ending in ``::`` (reST's "literal block follows") ends in ``:``;
- Sphinx roles (:class:`X`, :func:`X`, ...) become plain code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):(?=`)")
_SECTION = re.compile(r"Examples?:")
_MULTI = re.compile(r"( +)(\w+(?:, \w+)+):(.*)")


def _unsection(lines: list[str]) -> list[str]:
    """An ``Example:`` section becomes a bold line and its body plain text (doctests fenced below)."""
    out: list[str] = []
    header: int | None = None
    body = 0
    for line in lines:
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if header is not None and stripped and indent <= header:
            header = None
        if header is None and _SECTION.fullmatch(stripped):
            header, body = indent, 0
            out += [" " * indent + "**" + stripped[:-1] + "**", ""]
            continue
        if header is not None and stripped:
            body = body or indent - header
            line = line[body:] if not line[:body].strip() else stripped
        out.append(line)
    return out


def _split_params(lines: list[str]) -> list[str]:
    """An argument line naming several parameters (``apply_fn, args: ...``) becomes one item each."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _MULTI.fullmatch(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent, names, first = m.group(1), m.group(2).split(", "), m.group(3)
        rest = []
        i += 1
        while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > len(indent):
            rest.append(lines[i])
            i += 1
        for name in names:
            out += [f"{indent}{name}:{first}", *rest]
    return out


def convert(text: str) -> str:
    lines = _split_params(_unsection(text.split("\n")))
    out: list[str] = []
    fenced = False
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if stripped.startswith("```"):
            fenced = not fenced
        if fenced:
            out.append(line)
            i += 1
            continue
        if stripped.startswith(">>>"):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][indent:] if not lines[i][:indent].strip() else lines[i].lstrip())
                i += 1
            pad = " " * indent
            if out and out[-1].strip():
                out.append("")
            out += [pad + "```pycon", *(pad + b for b in block), pad + "```"]
            continue
        if stripped.endswith("::") and not stripped.startswith(".."):
            line = line[:-1]
        out.append(_ROLE.sub("", line))
        i += 1
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
