"""mkdocs hook: render the Sphinx roles the docstrings use (:class:`X`, :func:`X`, ...) as code."""

import re

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):(?=<code>)")


def on_page_content(html, **kwargs):
    return _ROLE.sub("", html)
