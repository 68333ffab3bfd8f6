"""Prototype (issue 17, memory): keep a LoRA dense output flat (tokens, features) through elementwise ops.

What the 7B-shaped step shows (``scale.py``, HLO live ranges at the peak): jlora's lazy dense rule emits
``y = dot_general(x, W0) + reshape(low·Bs)`` on (batch, seq, out) arrays. XLA canonicalises the dot to
``reshape(dot2d)``; ReshapeMover then sinks both reshapes below the add (``y = reshape(base2d + lowB2d)``),
the add is left with one user (the reshape) and the fusion pass fuses it into *every* consumer of ``y``,
including the backward-pass fusions of silu/GELU. The two dot outputs ``x·W0`` and ``low·Bs`` then stay
alive until the backward pass instead of their sum: 2 x tokens x out floats per adapted kernel whose
output feeds a nonlinearity (gate, up; GPT: fc1) instead of 1. A model whose whole chain is 2-D (the
hand-written fast forms) has no reshape to sink and keeps only the sum.

This module patches jlora's interpreter (a prototype, not the library) so that the output of a plain
LoRA dense use is a :class:`Flat` value: the 2-D ``(tokens, out)`` array plus the shape the model
expects. Elementwise equations (and ``jit`` calls of them, e.g. ``silu``/``gelu``) whose array inputs
are Flat values of the same tokens, scalars, or full arrays of that shape run on the 2-D arrays; a dense
use of a Flat input reads its 2-D array directly; any other use gets ``reshape(flat, shape)``. Without
dropout and DoRA only (the prototype falls back to jlora's rules there).

    with flat_lazy():
        fn = jlora.lora_apply(apply, cfg, mode="lazy")   # traced inside the context
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

import jlora.lazy as JL
import jlora.lazy_rules as JR
import jlora.lazy_value as JV

ELEMENTWISE = frozenset({
    "add", "add_any", "sub", "mul", "div", "max", "min", "neg", "exp", "exp2", "log", "log1p", "expm1",
    "logistic", "tanh", "erf", "erf_inv", "integer_pow", "pow", "sqrt", "rsqrt", "abs", "sign", "square",
    "sin", "cos", "convert_element_type", "select_n", "ge", "gt", "le", "lt", "eq", "ne", "and", "or", "not",
    "stop_gradient", "copy", "copy_p"})


@dataclasses.dataclass(frozen=True)
class Flat:
    """A (tokens, n) array standing for ``(v2 + low).reshape(shape)`` (``shape[:-1]`` flattened into tokens).

    ``low`` (or None) is a LoRA branch output not yet added: a following bias add is applied to ``v2``
    first, so the program reads ``(x·W0 + b) + low·Bs`` as the hand-written fast form does (XLA:CPU
    fuses a bias into the dot; the LoRA add then materialises once).
    """

    v2: Any
    shape: tuple[int, ...]
    low: Any = None

    def resolved(self) -> jax.Array:
        return self.v2 if self.low is None else JR._add(self.v2, self.low)

    def full(self) -> jax.Array:
        return self.resolved().reshape(self.shape)


def _full(x: Any) -> Any:
    return x.full() if isinstance(x, Flat) else x


def _elementwise(eqn: Any, invals: list[Any]) -> list[Any] | None:
    """Runs an elementwise equation on 2-D arrays when every array input fits; else None."""
    flats = [x for x in invals if isinstance(x, Flat)]
    shape = flats[0].shape
    if any(f.shape != shape for f in flats) or tuple(eqn.outvars[0].aval.shape) != shape:
        return None
    if eqn.primitive.name == "add" and len(flats) == 1 and flats[0].low is not None:
        other = invals[1] if invals[0] is flats[0] else invals[0]
        oshape = tuple(jnp.shape(other))
        if len(oshape) == len(shape) and all(d == 1 for d in oshape[:-1]):  # a bias: add it before the low
            f = flats[0]
            v2 = JV.bind(eqn, [f.v2, jnp.reshape(other, (1, oshape[-1]))])[0]
            return [Flat(v2, shape, f.low)]
    args = []
    for x in invals:
        if isinstance(x, Flat):
            args.append(x.resolved())
        elif jnp.ndim(x) == 0:
            args.append(x)
        elif tuple(jnp.shape(x)) == shape:
            args.append(jnp.reshape(x, flats[0].v2.shape))
        elif len(jnp.shape(x)) == len(shape) and all(d == 1 for d in jnp.shape(x)[:-1]):  # (1, .., 1, n|1)
            args.append(jnp.reshape(x, (1, jnp.shape(x)[-1])))
        elif len(jnp.shape(x)) == len(shape) and tuple(jnp.shape(x)) == shape[:-1] + (1,):  # (.., 1) per token
            args.append(jnp.reshape(x, (flats[0].v2.shape[0], 1)))
        else:
            return None
    outs = JV.bind(eqn, args)
    return [Flat(o, shape) for o in outs]


@jax.custom_vjp
def dense_primal_merge(x2: jax.Array, w0: jax.Array, a: jax.Array, bs: jax.Array) -> jax.Array:
    """``x2·W0 + (x2·A)·Bs``. Primal (not differentiated: inference): merge the kernel when that costs
    fewer FLOPs than the low-rank branch, ``T·(in + out) ≥ in·out``; under differentiation the lazy
    ``fwd`` rule runs (residuals x2 and low; W0 gets no cotangent)."""
    t, (n_in, n_out) = x2.shape[0], w0.shape
    if t * (n_in + n_out) >= n_in * n_out:
        return x2 @ (w0 + (a @ bs).astype(w0.dtype))
    return x2 @ w0 + ((x2 @ a) @ bs).astype(w0.dtype)


def _dpm_fwd(x2, w0, a, bs):
    low = x2 @ a
    return x2 @ w0 + (low @ bs).astype(w0.dtype), (x2, w0, a, bs, low)


def _dpm_bwd(res, dy):
    x2, w0, a, bs, low = res
    dlow = dy @ bs.T
    dlow_t, low_t = jax.lax.optimization_barrier((dlow.T, low.T))
    return dy @ w0.T + dlow @ a.T, None, (dlow_t @ x2).T, low_t @ dy


dense_primal_merge.defvjp(_dpm_fwd, _dpm_bwd)
PRIMAL_MERGE = [False]


def _dense_fast(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    """jlora's plain dense fast path, returning a Flat ``x2d·W0 + low`` (no DoRA, no dropout)."""
    x, v = invals
    if not (JV.is_lora(v) and JR.plain_dense(eqn, v)) or v.factor is not None or ctx.dropout_on:
        return None
    if v.view != ((0,), (1,)):  # an (out, in) stored kernel: the prototype handles (in, out) only
        return None
    shape_out = tuple(eqn.outvars[0].aval.shape)
    x2 = x.resolved() if isinstance(x, Flat) else x.reshape(-1, x.shape[-1])
    if PRIMAL_MERGE[0] and x2.dtype == v.w0.dtype == v.a.dtype:
        ctx.shared.pop(id(eqn), None)
        return [Flat(dense_primal_merge(x2, v.w0, v.a, v.scaled_b()), shape_out)]
    low = ctx.shared.pop(id(eqn), None)
    if low is None:
        low = JR.low_rank_2d(x2.astype(v.a.dtype), v.a, (v.scaled_b(),))[0]
    base = JV.bind(eqn, [x2, v.w0], dimension_numbers=(((1,), (0,)), ((), ())))[0]
    return [Flat(base, shape_out, low)]


def _eval_flat(jaxpr: Any, consts: Any, args: Any, ctx: Any, keep_flat: bool = False) -> list[Any]:
    """jlora.lazy._eval with Flat values; outputs materialised unless ``keep_flat`` (inner ``jit`` calls)."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    if not ctx.dropout_on and id(jaxpr) not in ctx.groups:
        groups: dict[Any, list[Any]] = {}
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and not isinstance(eqn.invars[0], jcore.Literal):
                groups.setdefault(eqn.invars[0], []).append(eqn)
        ctx.groups[id(jaxpr)] = {k: g for k, g in groups.items() if len(g) > 1}
    groups = ctx.groups.get(id(jaxpr), {})
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        outs = None
        if name == "dot_general" and len(invals) == 2 and JV.is_lora(invals[1]):
            if eqn.invars[0] in groups and id(eqn) not in ctx.shared and not ctx.dropout_on \
                    and not PRIMAL_MERGE[0]:
                x = invals[0]
                if isinstance(x, Flat):  # _share_inputs reads env: give it the model's view
                    env[eqn.invars[0]] = x.full()
                JL._share_inputs(jaxpr, env, ctx, eqn)
                env[eqn.invars[0]] = x
            outs = _dense_fast(eqn, invals, ctx)
        elif any(isinstance(x, Flat) for x in invals):
            if name in ELEMENTWISE and not any(JV.is_lora(x) for x in invals):
                outs = _elementwise(eqn, invals)
            elif name in JL._CALLS and not any(JV.is_lora(x) for x in invals):
                inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
                outs = _eval_flat(inner.jaxpr, inner.consts, invals, ctx, keep_flat=True)
        if outs is None:
            invals = [_full(x) for x in invals]
            if any(JV.is_lora(x) for x in invals):
                outs = JL._rewrite(eqn, invals, ctx)
            else:
                outs = JV.bind(eqn, invals)
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [read(v) if keep_flat else _full(read(v)) for v in jaxpr.outvars]


@contextlib.contextmanager
def flat_lazy(primal_merge: bool = False):
    """Patches ``jlora.lazy._eval`` with the flat-propagating interpreter while the context is open.

    ``primal_merge``: plain dense uses go through :func:`dense_primal_merge` (no shared A).
    """
    orig, pm = JL._eval, PRIMAL_MERGE[0]
    JL._eval, PRIMAL_MERGE[0] = _eval_flat, primal_merge
    try:
        yield
    finally:
        JL._eval, PRIMAL_MERGE[0] = orig, pm
