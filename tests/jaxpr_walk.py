"""Test helper: every equation of a jaxpr, nested jaxprs (jit, custom_vjp, scan, cond) included."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def eqns(jaxpr: Any) -> Iterator[Any]:
    """Yields the equations of ``jaxpr`` and, depth first, of every jaxpr in their params."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from eqns(inner)


def out_shapes(jaxpr: Any) -> Iterator[tuple[int, ...]]:
    """The output shapes of every equation of ``jaxpr``, nested ones included."""
    for eqn in eqns(jaxpr):
        yield from (tuple(v.aval.shape) for v in eqn.outvars)
