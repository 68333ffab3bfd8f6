"""Mixed batches in one pass over the whole batch: ``mixed_apply(..., mode="rows")``.

The model runs once on the batch as it is (no ``jax.vmap``, no per-example batch axis of size 1).
Its jaxpr is evaluated with every adapted kernel kept as ``(W0, stacked A, stacked B)``; each
matmul that reads one, ``x · W0`` with ``x`` = ``(batch, ..., in)``, becomes
``x · W0 + (x · A[ids]) · B[ids]`` with the factors gathered per example (the BGMV form). Any other
use of an adapted kernel raises a ValueError naming the path and primitive (use ``mode="lazy"``).

Scope (checked): plain 2-D kernels (``(in, out)`` or ``(out, in)`` stored) consumed by matmuls
whose input has the examples on axis 0, through ``jit``/``pjit``, ``custom_jvp``/``custom_vjp``
and ``remat`` calls, and layer-stacked kernels scanned over their layer axis (``nn.scan``,
``lax.scan``): each step gathers that layer's factors per example, so the scratch is one layer's
factors per example. Not here: convs, embeddings, kernels indexed by layer outside a scan,
trained-whole leaves, DoRA, dropout; ``mode="lazy"`` runs those.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jlora.trace import _compat as jaxpr_compat
from jlora.core import paths
from jlora.core._describe import kernel_layouts
from jlora.trace._lazy import trace_apply
from jlora.trace._value import bind

__all__ = ["rows_call"]

_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
_INNER = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "remat2", "remat", "checkpoint"})


class _Rows:
    """An adapted kernel: ``w0`` (as used), stacked ``a`` (N+1, [L,] in, r), ``b`` (N+1, [L,] r, out),
    ``roles`` of ``w0``'s axes (``'io'``/``'oi'``, or ``'sio'``/``'soi'`` for a layer-stacked kernel)."""

    def __init__(self, w0: Any, a: Any, b: Any, roles: str, path: str):
        self.w0, self.a, self.b, self.roles, self.path = w0, a, b, roles, path

    @property
    def in_axis(self) -> int:
        return self.roles.index("i")


def _refuse(path: str, what: str) -> ValueError:
    return ValueError(f"mixed_apply(mode='rows'): kernel {path!r} {what}, which the one-pass mixed batch does not "
                      "handle; fix: use mode='lazy' (vmap over the examples)")


def _dot(eqn: Any, x: Any, v: _Rows, ids: Any) -> Any:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb or tuple(lc) != (x.ndim - 1,) or tuple(rc) != (v.in_axis,):
        raise _refuse(v.path, f"is contracted with dimension numbers {eqn.params['dimension_numbers']}")
    if x.ndim < 2 or x.shape[0] != ids.shape[0]:
        raise _refuse(v.path, f"is applied to an input of shape {x.shape} without the {ids.shape[0]} examples on axis 0")
    base = bind(eqn, [x, v.w0])[0]
    xe = x.reshape(x.shape[0], -1, x.shape[-1]).astype(v.a.dtype)
    low = jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", xe, v.a[ids]), v.b[ids]).reshape(base.shape)
    acc = jnp.promote_types(base.dtype, low.dtype)
    return (base.astype(acc) + low.astype(acc)).astype(base.dtype)


def _scan(eqn: Any, invals: list[Any], ids: Any) -> list[Any]:
    """A scan over layer-stacked kernels: each step slices W0 and gathers that layer's factors per
    example (scratch: one layer's factors per example, never the whole stack per example)."""
    p = eqn.params
    nc, ncar = jaxpr_compat.scan_split(p)
    consts, carry, xs = invals[:nc], invals[nc : nc + ncar], invals[nc + ncar :]
    for v in list(carry) + [c for c in consts if isinstance(c, _Rows) and "s" in c.roles]:
        if isinstance(v, _Rows):
            raise _refuse(v.path, "is a scan carry or a stacked scan constant")
    stacked = [x for x in xs if isinstance(x, _Rows)]
    for v in stacked:
        if not v.roles.startswith("s") or "s" in v.roles[1:]:
            raise _refuse(v.path, f"is scanned over an axis that is not its layer axis (roles {v.roles!r})")
    packed = [x.w0 if isinstance(x, _Rows) else x for x in xs]
    closed = jaxpr_compat.body(p["jaxpr"])

    def body(c: list[Any], step: tuple[list[Any], Any]) -> tuple[list[Any], list[Any]]:
        sliced, i = step
        inner = [_Rows(w, x.a[:, i], x.b[:, i], x.roles[1:], x.path) if isinstance(x, _Rows) else w
                 for x, w in zip(xs, sliced)]
        outs = _eval(closed.jaxpr, closed.consts, list(consts) + list(c) + inner, ids)
        return outs[:ncar], outs[ncar:]

    c, ys = jax.lax.scan(body, list(carry), (packed, jnp.arange(p["length"])), length=p["length"],
                         reverse=p["reverse"], unroll=p["unroll"])
    return list(c) + list(ys)


def _eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ids: Any) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        rows = [x for x in invals if isinstance(x, _Rows)]
        name = eqn.primitive.name
        if not rows:
            outs = bind(eqn, invals)
        elif name in ("convert_element_type", "copy", "copy_p") and len(invals) == 1:
            v = invals[0]
            outs = [_Rows(bind(eqn, [v.w0])[0], v.a, v.b, v.roles, v.path)]
        elif name == "scan":
            outs = _scan(eqn, invals, ids)
        elif name == "dot_general" and isinstance(invals[1], _Rows) and not isinstance(invals[0], _Rows) \
                and "s" not in invals[1].roles:
            outs = [_dot(eqn, invals[0], invals[1], ids)]
        elif name in _CALLS or name in _INNER:
            inner = jaxpr_compat.call_body(eqn.params)
            outs = _eval(inner.jaxpr, inner.consts, invals, ids)
        else:
            raise _refuse(rows[0].path, f"is used by primitive {name!r}")
        for v, x in zip(eqn.outvars, outs):
            if isinstance(x, _Rows):
                raise _refuse(x.path, f"leaves primitive {name!r} as a kernel (not a matmul output)")
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


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
    for p in flat:
        kernel, _, part = p.rpartition("/")
        if kernel not in layouts:
            raise _refuse(p, "is a trained-whole leaf (not A/B factors)")
        if part not in ("A", "B"):
            raise _refuse(kernel, f"carries {part!r} (DoRA or rows)")
    for p, lay in layouts.items():
        if lay.splits is not None or lay.roles not in ("io", "oi", "sio", "soi"):
            raise _refuse(p, f"has axis roles {lay.describe()} (not a plain 2-D kernel or a layer stack of them)")
    t = trace_apply(apply_fn, frozen, args, kwargs, "mixed_apply(mode='rows')")
    vals = list(t.leaves)
    for i, p in enumerate(t.leaf_paths):
        if p in layouts:
            vals[i] = _Rows(vals[i], flat[p + "/A"], flat[p + "/B"], layouts[p].roles, p)  # factors: canonical
    return t.unflatten(_eval(*jaxpr_compat.body(t.closed), vals + t.dyn, jnp.asarray(ids)))
