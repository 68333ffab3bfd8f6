"""Mixed batches in one pass over the whole batch: ``mixed_apply(..., mode="rows")``.

The model runs once on the batch as it is (no ``jax.vmap``, no per-example batch axis of size 1).
Its jaxpr is evaluated with every adapted kernel kept as ``(W0, stacked A, stacked B)``; each
matmul that reads one, ``x · W0`` with ``x`` = ``(batch, ..., in)``, becomes
``x · W0 + (x · A[ids]) · B[ids]`` with the factors gathered per example (the BGMV form). Any other
use of an adapted kernel raises a ValueError naming the path and primitive (use ``mode="lazy"``).

Scope (checked): plain 2-D kernels (``(in, out)`` or ``(out, in)`` stored) consumed by matmuls
whose input has the examples on axis 0, through dtype casts, sharding constraints, ``jit``/``pjit``,
``custom_jvp``/``custom_vjp`` and ``remat`` calls (the walker's, :mod:`jlora.trace._walker`), and layer-stacked kernels scanned over their layer axis (``nn.scan``,
``lax.scan``): each step gathers that layer's factors per example, so the scratch is one layer's
factors per example. Not here: convs, embeddings, kernels indexed by layer outside a scan,
trained-whole leaves, DoRA, dropout; ``mode="lazy"`` runs those.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core import paths
from jlora.core._describe import A, B, kernel_layouts, leaf_roles
from jlora.trace import _compat as jaxpr_compat
from jlora.trace import _walker as walker
from jlora.trace._walker import bind, trace_apply

__all__ = ["rows_call"]


@jax.tree_util.register_pytree_node_class
class _Rows:
    """An adapted kernel: ``w0`` (as used), stacked ``a`` (N+1, [L,] in, r), ``b`` (N+1, [L,] r, out),
    ``roles`` of ``w0``'s axes (``'io'``/``'oi'``, or ``'sio'``/``'soi'`` for a layer-stacked kernel).
    A pytree (its arrays), so it passes through ``jax.checkpoint``."""

    def __init__(self, w0: Any, a: Any, b: Any, roles: str, path: str):
        self.w0, self.a, self.b, self.roles, self.path = w0, a, b, roles, path

    def tree_flatten(self):  # noqa: D102
        return (self.w0, self.a, self.b), (self.roles, self.path)

    @classmethod
    def tree_unflatten(cls, aux, children):  # noqa: D102
        return cls(*children, *aux)

    @property
    def in_axis(self) -> int:
        return self.roles.index("i")


def _refuse(path: str, what: str) -> ValueError:
    return ValueError(f"mixed_apply(mode='rows'): kernel {path!r} {what}, which the one-pass mixed batch does not "
                      "handle; fix: use mode='lazy' (vmap over the examples)")


def _dot(eqn: Any, invals: list[Any], mode: Any) -> list[Any] | None:
    x, v = invals
    if not isinstance(v, _Rows) or isinstance(x, _Rows) or "s" in v.roles:
        return None
    ids = mode.ids
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb or tuple(lc) != (x.ndim - 1,) or tuple(rc) != (v.in_axis,):
        raise _refuse(v.path, f"is contracted with dimension numbers {eqn.params['dimension_numbers']}")
    if x.ndim < 2 or x.shape[0] != ids.shape[0]:
        raise _refuse(v.path, f"is applied to an input of shape {x.shape} without the {ids.shape[0]} examples on axis 0")
    base = bind(eqn, [x, v.w0])[0]
    xe = x.reshape(x.shape[0], -1, x.shape[-1]).astype(v.a.dtype)
    low = jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", xe, v.a[ids]), v.b[ids]).reshape(base.shape)
    acc = jnp.promote_types(base.dtype, low.dtype)
    return [(base.astype(acc) + low.astype(acc)).astype(base.dtype)]


def _view(eqn: Any, invals: list[Any], mode: Any) -> list[Any] | None:
    """A dtype cast or sharding constraint of ``W0`` (the factors are gathered per example at the use)."""
    v = invals[0]
    return [_Rows(bind(eqn, [v.w0])[0], v.a, v.b, v.roles, v.path)] if len(invals) == 1 else None


def _scan(eqn: Any, invals: list[Any], mode: Any) -> list[Any] | None:
    """A scan over layer-stacked kernels: each step slices W0 and gathers that layer's factors per
    example (scratch: one layer's factors per example, never the whole stack per example)."""
    nc, ncar = jaxpr_compat.scan_split(eqn.params)
    for v in list(invals[nc : nc + ncar]) + [c for c in invals[:nc] if isinstance(c, _Rows) and "s" in c.roles]:
        if isinstance(v, _Rows):
            raise _refuse(v.path, "is a scan carry or a stacked scan constant")
    for v in invals[nc + ncar :]:
        if isinstance(v, _Rows) and (not v.roles.startswith("s") or "s" in v.roles[1:]):
            raise _refuse(v.path, f"is scanned over an axis that is not its layer axis (roles {v.roles!r})")
    return walker.scan(eqn, invals, mode)


class _RowsMode(walker.Mode):
    """Per-row adapters as a walker mode: ``_Rows`` kernels, ``ids`` the adapter of each example."""

    rules = {**walker.CALLS, "scan": _scan, "dot_general": _dot,
             **{name: _view for name in walker.SAME_AXES}}

    def __init__(self, ids: Any):
        self.ids = ids

    def tracked(self, x: Any) -> bool:
        return isinstance(x, _Rows)

    def fallback(self, eqn: Any, invals: list[Any]) -> list[Any]:
        path = next(x for x in invals if isinstance(x, _Rows)).path
        raise _refuse(path, f"is used by primitive {eqn.primitive.name!r}")

    def after(self, eqn: Any, outs: list[Any]) -> None:
        if self.rules.get(eqn.primitive.name) is _view:
            return
        for x in outs:
            if isinstance(x, _Rows):
                raise _refuse(x.path, f"leaves primitive {eqn.primitive.name!r} as a kernel (not a matmul output)")

    def loop_out(self, eqn: Any, x: Any) -> Any:
        if isinstance(x, _Rows):
            raise _refuse(x.path, f"leaves primitive {eqn.primitive.name!r} as a kernel (not a matmul output)")
        return x

    def scan_xs(self, x: Any, length: int) -> Any:
        """One layer per step: ``W0`` sliced by the scan, the factors indexed by the step number."""
        return (x.w0, jnp.arange(length)), lambda t: _Rows(t[0], x.a[:, t[1]], x.b[:, t[1]], x.roles[1:], x.path)


def rows_call(apply_fn: Callable[..., Any], frozen: Any, stacked: Any, ids: Any, args: Sequence[Any],
              kwargs: Mapping[str, Any]) -> Any:
    """``apply_fn(frozen, *args, **kwargs)`` where example e of the batch runs adapter ``ids[e]`` of ``stacked``.

    ``stacked`` is a serving stack's lora tree (scales folded into B). Array leaves of ``args`` and
    ``kwargs`` are traced, the rest is static.

    >>> import jlora
    >>> from jlora.multi._stack import stack
    >>> cfg = jlora.LoraConfig(rank=1, alpha=1, targets="w")
    >>> frozen = {"w": jnp.eye(2)}
    >>> s = stack(frozen, {"a": ({"w": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2))}}, cfg)})
    >>> rows_call(lambda p, x: x @ p["w"], frozen, s.lora, jnp.array([0, 1]), (jnp.ones((2, 2)),), {}).tolist()
    [[3.0, 3.0], [1.0, 1.0]]
    """
    layouts = kernel_layouts(stacked)
    flat = paths.flatten(stacked)
    for p, leaf in leaf_roles(stacked).items():
        if leaf.owner not in layouts:
            raise _refuse(p, "is a trained-whole leaf (not A/B factors)")
        if leaf.role not in (A, B):
            raise _refuse(leaf.owner, f"carries {leaf.role!r} (DoRA or rows)")
    for p, lay in layouts.items():
        if lay.splits is not None or lay.roles not in ("io", "oi", "sio", "soi"):
            raise _refuse(p, f"has axis roles {lay.describe()} (not a plain 2-D kernel or a layer stack of them)")
    t = trace_apply(apply_fn, frozen, args, kwargs, "mixed_apply(mode='rows')")
    vals = list(t.leaves)
    for i, p in enumerate(t.leaf_paths):
        if p in layouts:
            vals[i] = _Rows(vals[i], flat[p + "/A"], flat[p + "/B"], layouts[p].roles, p)  # factors: canonical
    return t.unflatten(walker.run(_RowsMode(jnp.asarray(ids)), *jaxpr_compat.body(t.closed), vals + t.dyn))
