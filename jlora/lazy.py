"""The lazy low-rank rewrite: run a model with ``W0 + s * A ⊗ B`` without ever forming the delta.

:func:`lazy_call` traces ``apply_fn`` to a jaxpr (``jax.make_jaxpr``) and evaluates it with an
interpreter in which every adapted kernel is a symbolic :class:`LoraValue` (the base ``W0`` and the
factors ``A``, ``B``). Views of the kernel (dtype casts, reshapes, transposes, slices of a stacked
layer axis) are applied to ``W0`` and mirrored on the tiny factors; the consumers are rewritten:

- ``dot_general`` (matmul, einsum, ``DenseGeneral``, a tied ``Embed.attend``):
  ``dot(x, W0) + (x·A)·(s·B)``; a contraction over the kernel's *output* axes uses the
  transposed roles ``(x·(s·B)ᵀ)·Aᵀ``; stacked kernels must be batched over their stack axes.
  A plain 2-D kernel contracted by the last axis of ``x`` takes a fast path: tokens flattened
  to 2-D and a ``jax.custom_vjp`` low-rank branch (scale folded into B, token-contracting
  products written row-major behind ``lax.optimization_barrier``, no cotangent for ``W0``);
  plain dense kernels reading the same input (q, k, v) share one ``x·[A_q|A_k|A_v]`` forward and
  one ``dAᵀ`` product backward (without dropout: each use needs its own mask).
- ``conv_general_dilated``: ``conv(x, W0) + conv1x1(conv(x, A), s·B)`` with the same strides,
  padding, dilations and layouts (``feature_group_count == 1``; grouped convs fall back).
- ``gather`` of table rows (``nn.Embed``, ``jnp.take``): ``W0[ids] + A[ids]·(s·B)``; a gather,
  slice or dynamic slice along a stacked kernel's layer axes (``W[i]`` in a loop) slices A and B.
- ``jit``/``pjit``/``closed_call``, ``custom_jvp_call``/``custom_vjp_call`` (the inner jaxpr is
  evaluated; the custom rule is lost only where a LoRA value enters), ``remat`` (re-wrapped with
  ``jax.checkpoint``, same policy and ``prevent_cse``), ``scan`` (a stacked kernel entering as
  ``xs`` is split into per-layer ``W0``, ``A``, ``B`` slices), ``cond``/``switch`` and
  ``while_loop`` are rebuilt with ``lax``.

Any other use of an adapted kernel gets the merged kernel ``W0 + s * A ⊗ B`` for that use
(correct, not lazy) with one ``UserWarning`` per (path, primitive); ``strict=True`` raises instead.

Mixed precision (PEFT's policy): the low-rank branch runs in the factors' dtype (the input is cast
to it), is added to the base output in the promoted dtype, and the sum is cast once to the base
output's dtype. A bfloat16 ``W0`` with float32 factors thus computes ``x·A·B`` in float32.

LoRA dropout (``config.dropout > 0`` and an ``rng``) drops the input of A only, with inverted
scaling and an independent mask per adapted use: the key is ``rng`` folded with the kernel's index
and the use's count (and, inside ``scan``, a per-iteration key). Embedding lookups get no dropout
(as in PEFT); inside ``while_loop`` bodies every iteration reuses one mask.

Fused partial kernels (``config.fused``) run as one rank ``E·r`` pair whose B is block-sparse
(zero blocks for disabled groups): lazy, at E times the low-rank FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jlora import paths as jpaths

__all__ = ["LoraValue", "lazy_call", "lazy_eval", "low_rank_2d"]

_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
_CUSTOM = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_REMAT = frozenset({"remat2", "remat", "checkpoint"})


# --- the symbolic kernel ------------------------------------------------------------------------

@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class LoraValue:
    """A kernel ``W0 + scale * A ⊗ B`` kept in factored form.

    ``w0`` has shape ``stack + in + out``; ``a`` is ``stack + in + (r,)`` and ``b`` is
    ``stack + (r,) + out`` (rank contracted, batched over the stack axes). A pytree whose leaves
    are the three arrays, so it passes through ``jax.checkpoint``/``lax.cond`` unchanged.

    >>> v = LoraValue(jnp.zeros((3, 2)), jnp.ones((3, 1)), jnp.ones((1, 2)), "w", 0, 0, 1, 2.0)
    >>> v.materialise().tolist()
    [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    """

    w0: Any
    a: Any
    b: Any
    path: str
    index: int
    n_stack: int
    n_in: int
    scale: float

    def tree_flatten(self):  # noqa: D102
        return (self.w0, self.a, self.b), (self.path, self.index, self.n_stack, self.n_in, self.scale)

    @classmethod
    def tree_unflatten(cls, aux, children):  # noqa: D102
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        """The kernel's (current view's) shape."""
        return tuple(self.w0.shape)

    @property
    def rank(self) -> int:
        """The (possibly block-fused) rank r."""
        return int(self.a.shape[-1])

    def replace(self, **kw: Any) -> LoraValue:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **kw)

    def scaled_b(self) -> jax.Array:
        """``scale * B`` in B's dtype (the scale is applied to the tiny factor, not the output)."""
        return self.b * jnp.asarray(self.scale, self.b.dtype)

    def materialise(self) -> jax.Array:
        """``W0 + scale * A ⊗ B``, summed in float32 (or wider) and cast to ``w0``'s dtype."""
        ns = self.n_stack
        stack, shape = self.shape[:ns], self.shape
        n_in = math.prod(shape[ns : ns + self.n_in])
        acc = jnp.promote_types(jnp.float32, jnp.promote_types(self.w0.dtype, self.a.dtype))
        a = self.a.astype(acc).reshape(stack + (n_in, self.rank))
        b = self.b.astype(acc).reshape(stack + (self.rank, -1))
        d = jnp.matmul(a, b, precision=lax.Precision.HIGHEST) * jnp.asarray(self.scale, acc)
        return (self.w0.astype(acc) + d.reshape(shape)).astype(self.w0.dtype)


def _unfuse(b: jax.Array, n_stack: int, groups: tuple[bool, ...]) -> jax.Array:
    """Turns a fused partial B (stack + (E, r) + out[:-1] + (out_g,)) into a block-sparse rank-E·r B."""
    n_enabled = b.shape[n_stack]
    rows = []
    for e in range(n_enabled):
        block = jnp.take(b, e, axis=n_stack)  # stack + (r,) + out[:-1] + (out_g,)
        zeros = jnp.zeros_like(block)
        cols, seen = [], 0
        for on in groups:
            cols.append(block if on and seen == e else zeros)
            seen += on
        rows.append(jnp.concatenate(cols, axis=-1))
    return jnp.concatenate(rows, axis=n_stack)


# --- interpreter state --------------------------------------------------------------------------

@dataclasses.dataclass
class _Ctx:
    strict: bool
    rate: float
    rng: Any
    warned: set = dataclasses.field(default_factory=set)
    uses: dict = dataclasses.field(default_factory=dict)
    loops: list = dataclasses.field(default_factory=lambda: [0])
    groups: dict = dataclasses.field(default_factory=dict)  # id(jaxpr) -> {input var: [dot eqns]}
    shared: dict = dataclasses.field(default_factory=dict)  # id(dot eqn) -> its precomputed low-rank output

    def child(self, rng: Any) -> _Ctx:
        return _Ctx(self.strict, self.rate, rng, self.warned, {}, self.loops, self.groups, {})

    @property
    def dropout_on(self) -> bool:
        return self.rng is not None and self.rate > 0.0


def _is_lora(x: Any) -> bool:
    return isinstance(x, LoraValue)


def _fallback(eqn: Any, invals: Sequence[Any], ctx: _Ctx, why: str = "") -> list[Any]:
    name = eqn.primitive.name
    for v in invals:
        if _is_lora(v):
            msg = (f"jlora lazy: kernel {v.path!r} is used by primitive {name!r}"
                   f"{' (' + why + ')' if why else ''}, which the low-rank rewrite does not handle")
            if ctx.strict:
                raise ValueError(msg + "; fix: use mode='merged', or strict=False to use the merged kernel "
                                 "for this use")
            if (v.path, name) not in ctx.warned:
                ctx.warned.add((v.path, name))
                warnings.warn(msg + "; using the merged kernel W0 + s*A@B for this use (correct, not lazy)",
                              stacklevel=3)
    return _bind(eqn, [v.materialise() if _is_lora(v) else v for v in invals])


def _bind(eqn: Any, invals: Sequence[Any], **overrides: Any) -> list[Any]:
    params = eqn.primitive.get_bind_params(dict(eqn.params, **overrides))
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def lazy_eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], *, strict: bool = False,
              rate: float = 0.0, rng: Any = None) -> list[Any]:
    """Evaluates ``jaxpr`` on ``args`` where some args are :class:`LoraValue` kernels.

    The seam under :func:`lazy_call`, usable directly on any jaxpr.

    >>> jp = jax.make_jaxpr(lambda w, x: x @ w)(jnp.zeros((2, 2)), jnp.ones((1, 2)))
    >>> v = LoraValue(jnp.eye(2), jnp.ones((2, 1)), jnp.ones((1, 2)), "w", 0, 0, 1, 1.0)
    >>> lazy_eval(jp.jaxpr, jp.consts, [v, jnp.ones((1, 2))])[0].tolist()
    [[3.0, 3.0]]
    """
    return _eval(jaxpr, consts, args, _Ctx(strict, float(rate), rng))


def _eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ctx: _Ctx) -> list[Any]:
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
        if any(_is_lora(x) for x in invals):
            if (eqn.primitive.name == "dot_general" and eqn.invars[0] in groups and id(eqn) not in ctx.shared
                    and _is_lora(invals[1])):
                _share_inputs(jaxpr, env, ctx, eqn)
            outs = _rewrite(eqn, invals, ctx)
        else:
            outs = _bind(eqn, invals)
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _rewrite(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any]:
    name = eqn.primitive.name
    rule = _RULES.get(name)
    if rule is None:
        if name in _CALLS:
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            return _eval(inner.jaxpr, inner.consts, invals, ctx)
        if name in _CUSTOM:
            inner = eqn.params["call_jaxpr"]
            return _eval(inner.jaxpr, inner.consts, invals, ctx)
        if name in _REMAT:
            rule = _remat
    out = rule(eqn, invals, ctx) if rule is not None else None
    if out is None:
        return _fallback(eqn, invals, ctx)
    return out


# --- views ---------------------------------------------------------------------------------------

def _view(v: LoraValue, eqn: Any, a: Any, b: Any, n_stack: int, n_in: int) -> list[Any]:
    w0 = _bind(eqn, [v.w0])[0]
    return [v.replace(w0=w0, a=a, b=b, n_stack=n_stack, n_in=n_in)]


def _dtype_view(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any] | None:
    v = invals[0]
    return _view(v, eqn, v.a, v.b, v.n_stack, v.n_in)


def _reshape(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any] | None:
    v = invals[0]
    if len(invals) != 1 or (eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is not None):
        return None
    new = tuple(eqn.outvars[0].aval.shape)
    if math.prod(new) != math.prod(v.shape):
        return None  # a real broadcast
    if eqn.primitive.name == "broadcast_in_dim" and list(eqn.params["broadcast_dimensions"]) != sorted(
            eqn.params["broadcast_dimensions"]):
        return None
    ns, ni = v.n_stack, v.n_in
    n_s, n_si = math.prod(v.shape[:ns]), math.prod(v.shape[: ns + ni])
    if new[:ns] == v.shape[:ns]:  # the stack axes stay (a size-1 layer axis must not become an input)
        k1 = ns
    else:
        k1 = next((k for k in range(len(new) + 1) if math.prod(new[:k]) == n_s), None)
    if k1 is None:
        return None
    k2 = next((k for k in range(k1 + 1, len(new)) if math.prod(new[:k]) == n_si), None)
    if k2 is None:
        return None
    r = v.rank
    a = v.a.reshape(new[:k2] + (r,))
    b = v.b.reshape(new[:k1] + (r,) + new[k2:])
    return _view(v, eqn, a, b, k1, k2 - k1)


def _transpose(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any] | None:
    v = invals[0]
    perm = tuple(eqn.params["permutation"])
    ns, ni = v.n_stack, v.n_in
    no = len(perm) - ns - ni
    stack, rest = list(perm[:ns]), perm[ns:]
    if sorted(stack) != list(range(ns)):
        return None
    ins = lambda p: ns <= p < ns + ni  # noqa: E731
    b_out = lambda ps: [p - ni + 1 for p in ps]  # noqa: E731  (kernel out axis -> position in B)
    if all(ins(p) for p in rest[:ni]):  # stack + in + out, each permuted within
        a = jnp.transpose(v.a, stack + list(rest[:ni]) + [v.a.ndim - 1])
        b = jnp.transpose(v.b, stack + [ns] + b_out(rest[ni:]))
        return _view(v, eqn, a, b, ns, ni)
    if all(not ins(p) for p in rest[:no]):  # stack + out + in: the roles of A and B swap
        a = jnp.transpose(v.b, stack + b_out(rest[:no]) + [ns])
        b = jnp.transpose(v.a, stack + [v.a.ndim - 1] + list(rest[no:]))
        return _view(v, eqn, a, b, ns, no)
    return None


def _slice(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any] | None:
    v = invals[0]
    ns, shape = v.n_stack, v.shape
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(shape)
    if ns == 0 or any((start[i], limit[i], strides[i]) != (0, shape[i], 1) for i in range(ns, len(shape))):
        return None
    cut = lambda x: lax.slice(x, tuple(start[:ns]) + (0,) * (x.ndim - ns),  # noqa: E731
                              tuple(limit[:ns]) + x.shape[ns:], tuple(strides[:ns]) + (1,) * (x.ndim - ns))
    return _view(v, eqn, cut(v.a), cut(v.b), ns, v.n_in)


def _dynamic_slice(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any] | None:
    v, starts = invals[0], invals[1:]
    ns, shape = v.n_stack, v.shape
    sizes = eqn.params["slice_sizes"]
    if ns == 0 or any(_is_lora(s) for s in starts) or any(sizes[i] != shape[i] for i in range(ns, len(shape))):
        return None
    zero = jnp.zeros((), jnp.asarray(starts[0]).dtype)
    cut = lambda x: lax.dynamic_slice(x, list(starts[:ns]) + [zero] * (x.ndim - ns),  # noqa: E731
                                      tuple(sizes[:ns]) + x.shape[ns:])
    w0 = _bind(eqn, [v.w0, *starts])[0]
    return [v.replace(w0=w0, a=cut(v.a), b=cut(v.b))]


# --- consumers -----------------------------------------------------------------------------------

def _dropout(x: jax.Array, v: LoraValue, ctx: _Ctx) -> jax.Array:
    if ctx.rng is None or ctx.rate <= 0.0:
        return x
    n = ctx.uses.get(v.index, 0)
    ctx.uses[v.index] = n + 1
    key = jax.random.fold_in(jax.random.fold_in(ctx.rng, v.index), n)
    keep = jax.random.bernoulli(key, 1.0 - ctx.rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - ctx.rate, x.dtype), jnp.zeros((), x.dtype))


def _add(base: jax.Array, low: jax.Array) -> jax.Array:
    """base + low in the promoted dtype, cast once to the base output's dtype."""
    if base.dtype == low.dtype:
        return base + low
    acc = jnp.promote_types(base.dtype, low.dtype)
    return (base.astype(acc) + low.astype(acc)).astype(base.dtype)


@jax.custom_vjp
def low_rank_2d(x: jax.Array, a_cat: jax.Array, bss: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """``(x·A_i)·Bs_i`` for k kernels reading one input: ``x`` (T, in), ``A_cat = [A_1|...|A_k]``
    (in, sum r_i), ``bss[i]`` (r_i, out_i). Returns k arrays (T, out_i).

    One ``x·A_cat`` product forward and one ``dA_catᵀ = dlowᵀ·x`` product backward serve all k
    kernels. The backward pass writes every token-contracting product as (r, T)·(T, n) (XLA:CPU's
    fast row-major matmul form), the r-wide transposes made real behind
    ``lax.optimization_barrier`` so that XLA does not fold them back into slow dots.

    >>> [y.tolist() for y in low_rank_2d(jnp.ones((2, 3)), jnp.ones((3, 1)), (jnp.ones((1, 2)),))]
    [[[3.0, 3.0], [3.0, 3.0]]]
    """
    return _low_fwd(x, a_cat, bss)[0]


def _low_fwd(x: jax.Array, a_cat: jax.Array, bss: tuple[jax.Array, ...]) -> tuple[Any, tuple[Any, ...]]:
    low = jnp.dot(x, a_cat)
    ys, start = [], 0
    for bs in bss:
        ys.append(jnp.dot(low[:, start : start + bs.shape[0]], bs))
        start += bs.shape[0]
    return tuple(ys), (x, a_cat, bss, low)


def _low_bwd(res: tuple[Any, ...], dys: tuple[jax.Array, ...]) -> tuple[Any, ...]:
    x, a_cat, bss, low = res
    bss_t, a_t = lax.optimization_barrier((tuple(bs.T for bs in bss), a_cat.T))
    parts = [jnp.dot(dy.astype(bs.dtype), bs_t) for dy, bs, bs_t in zip(dys, bss, bss_t)]
    dlow = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)  # (T, sum r)
    # make low and dlow real first, so XLA cannot fold their transposes into the producing dots
    low, dlow = lax.optimization_barrier((low, dlow))
    dx = jnp.dot(dlow, a_t)  # (T, in)
    low_t, dlow_t = lax.optimization_barrier((low.T, dlow.T))  # (sum r, T): a few tens of KB
    dbss, start = [], 0
    for dy, bs in zip(dys, bss):
        dbss.append(jnp.dot(low_t[start : start + bs.shape[0]], dy.astype(bs.dtype)).astype(bs.dtype))
        start += bs.shape[0]
    # the barrier keeps XLA from folding the final transpose into the dot ((in, T)·(T, r): slow)
    da_t = lax.optimization_barrier(jnp.dot(dlow_t, x))
    return dx.astype(x.dtype), da_t.T.astype(a_cat.dtype), tuple(dbss)


low_rank_2d.defvjp(_low_fwd, _low_bwd)


def _plain_dense(eqn: Any, v: Any) -> bool:
    """A 2-D kernel on the rhs of a dot contracting its first axis with the lhs's last axis."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0]
    return (_is_lora(v) and (v.n_stack, v.n_in, len(v.shape)) == (0, 1, 2) and tuple(rc) == (0,)
            and not lb and not rb and tuple(lc) == (len(lhs.aval.shape) - 1,))


def _share_inputs(jaxpr: Any, env: Mapping[Any, Any], ctx: _Ctx, eqn: Any) -> None:
    """Computes one ``x·[A_1|...|A_k]`` for all plain dense LoRA kernels reading ``eqn``'s input.

    Runs when the first such dot of a jaxpr is reached; the low-rank outputs of the others are
    left in ``ctx.shared`` for their own equations (only without dropout: each use needs its mask).
    """
    x_var = eqn.invars[0]
    x = env[x_var]
    members = []
    for e in ctx.groups.get(id(jaxpr), {}).get(x_var, ()):
        w = e.invars[1]
        v = None if isinstance(w, jcore.Literal) else env.get(w)
        if id(e) not in ctx.shared and _is_lora(v) and _plain_dense(e, v) and v.a.dtype == x.dtype:
            members.append((e, v))
    if len(members) < 2 or members[0][0] is not eqn:
        return
    a_cat = jnp.concatenate([v.a for _, v in members], axis=1)
    lows = low_rank_2d(x.reshape(-1, x.shape[-1]), a_cat, tuple(v.scaled_b() for _, v in members))
    for (e, _), low in zip(members, lows):
        ctx.shared[id(e)] = low


def _dot_general(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any] | None:
    lhs, rhs = invals
    if _is_lora(lhs) and _is_lora(rhs):
        return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    kernel_lhs = _is_lora(lhs)
    v, x = (lhs, rhs) if kernel_lhs else (rhs, lhs)
    xc, wc, xb, wb = (rc, lc, rb, lb) if kernel_lhs else (lc, rc, lb, rb)
    ns, ni = v.n_stack, v.n_in
    nd = len(v.shape)
    if sorted(wb) != list(range(ns)):
        return None
    if sorted(wc) == list(range(ns, ns + ni)):
        transposed = False
    elif sorted(wc) == list(range(ns + ni, nd)):
        transposed = True
    else:
        return None
    base = _bind(eqn, [v.w0, x] if kernel_lhs else [x, v.w0])[0]
    if not transposed and not kernel_lhs and _plain_dense(eqn, v):
        low = ctx.shared.pop(id(eqn), None)
        if low is None:
            xd = _dropout(x, v, ctx).astype(v.a.dtype)
            low = low_rank_2d(xd.reshape(-1, x.shape[-1]), v.a, (v.scaled_b(),))[0]
        return [_add(base, low.reshape(x.shape[:-1] + (v.shape[-1],)))]
    xd = _dropout(x, v, ctx).astype(v.a.dtype)
    bs = v.scaled_b()
    nb = len(wb)
    if not transposed:  # (x·A)·Bs
        first, second = v.a, bs
        first_c, second_c = tuple(wc), ns
    else:  # (x·Bsᵀ)·Aᵀ
        first, second = bs, v.a
        first_c, second_c = tuple(p - ni + 1 for p in wc), v.a.ndim - 1
    low = lax.dot_general(xd, first, ((tuple(xc), first_c), (tuple(xb), tuple(wb))))
    low = lax.dot_general(low, second, (((low.ndim - 1,), (second_c,)), (tuple(range(nb)), tuple(wb))))
    if kernel_lhs:  # dot_general puts lhs free axes first: batch + kernel free + x free
        n_free_x = low.ndim - nb - (nd - ns - len(wc))
        perm = (list(range(nb)) + list(range(nb + n_free_x, low.ndim)) + list(range(nb, nb + n_free_x)))
        low = jnp.transpose(low, perm)
    return [_add(base, low)]


def _conv(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any] | None:
    x, v = invals
    if _is_lora(x) or not _is_lora(v):
        return None
    p = eqn.params
    dn = p["dimension_numbers"]
    nd = len(v.shape)
    if (v.n_stack, v.n_in) != (0, nd - 1) or dn.rhs_spec[0] != nd - 1:
        return None
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return None
    base = _bind(eqn, [x, v.w0])[0]
    xd = _dropout(x, v, ctx).astype(v.a.dtype)
    low = _bind(eqn, [xd, v.a], preferred_element_type=None)[0]  # a conv to r channels
    feat = dn.out_spec[1]
    low = jnp.moveaxis(jnp.tensordot(low, v.scaled_b(), axes=[[feat], [0]]), -1, feat)  # 1x1 conv
    return [_add(base, low)]


def _gather_stack(eqn: Any, v: LoraValue, idx: Any) -> list[Any] | None:
    """A gather that picks along a stacked kernel's layer axes only (``jnp.take(W, i, axis=0)``)."""
    dn = eqn.params["dimension_numbers"]
    ns, sizes = v.n_stack, tuple(eqn.params["slice_sizes"])
    out_nd = len(eqn.outvars[0].aval.shape)
    n_off = len(v.shape) - len(dn.collapsed_slice_dims)
    if (dn.operand_batching_dims or not set(dn.start_index_map) | set(dn.collapsed_slice_dims) <= set(range(ns))
            or sizes[ns:] != v.shape[ns:] or tuple(dn.offset_dims) != tuple(range(out_nd - n_off, out_nd))):
        return None
    n_batch = out_nd - n_off

    def pick(x: jax.Array) -> jax.Array:
        n = x.ndim - len(dn.collapsed_slice_dims)
        d = dn._replace(offset_dims=tuple(range(n_batch, n_batch + n)))
        return _bind(eqn, [x, idx], dimension_numbers=d, slice_sizes=sizes[:ns] + x.shape[ns:])[0]

    new_ns = n_batch + ns - len(dn.collapsed_slice_dims)
    return [v.replace(w0=_bind(eqn, [v.w0, idx])[0], a=pick(v.a), b=pick(v.b), n_stack=new_ns)]


def _gather(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any] | None:
    v, idx = invals
    if not _is_lora(v) or _is_lora(idx):
        return None
    dn = eqn.params["dimension_numbers"]
    if v.n_stack:
        return _gather_stack(eqn, v, idx)
    if (v.n_stack, v.n_in, len(v.shape)) != (0, 1, 2) or tuple(dn.collapsed_slice_dims) != (0,):
        return None
    if tuple(dn.start_index_map) != (0,) or tuple(dn.operand_batching_dims) != ():
        return None
    if tuple(eqn.params["slice_sizes"]) != (1, v.shape[1]) or len(dn.offset_dims) != 1:
        return None
    base = _bind(eqn, [v.w0, idx])[0]
    low = _bind(eqn, [v.a, idx], slice_sizes=(1, v.rank))[0]  # A[ids]
    feat = dn.offset_dims[0]
    low = jnp.moveaxis(jnp.tensordot(low, v.scaled_b(), axes=[[feat], [0]]), -1, feat)
    return [_add(base, low)]


# --- higher-order primitives ---------------------------------------------------------------------

def _remat(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any]:
    inner = eqn.params["jaxpr"]
    consts = getattr(inner, "consts", [])
    inner = getattr(inner, "jaxpr", inner)

    def body(*vals: Any) -> list[Any]:
        return _eval(inner, consts, vals, ctx)

    return list(jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True),
                               policy=eqn.params.get("policy"))(*invals))


def _scan(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any] | None:
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, carry, xs = invals[:nc], invals[nc : nc + ncar], invals[nc + ncar :]
    if any(_is_lora(c) for c in carry) or any(_is_lora(x) and x.n_stack == 0 for x in xs):
        return None
    closed = p["jaxpr"]
    packed = [(x.w0, x.a, x.b) if _is_lora(x) else x for x in xs]
    metas = [x.replace(w0=None, a=None, b=None, n_stack=x.n_stack - 1) if _is_lora(x) else None for x in xs]
    keys = None
    if ctx.rng is not None and ctx.rate > 0.0:
        ctx.loops[0] += 1
        keys = jax.random.split(jax.random.fold_in(ctx.rng, 1_000_003 + ctx.loops[0]), p["length"])

    def body(c: list[Any], xk: tuple[list[Any], Any]) -> tuple[list[Any], list[Any]]:
        xs_in, key = xk
        xs_in = [m.replace(w0=x[0], a=x[1], b=x[2]) if m is not None else x for m, x in zip(metas, xs_in)]
        sub = ctx.child(key) if key is not None else ctx
        outs = _eval(closed.jaxpr, closed.consts, list(consts) + list(c) + xs_in, sub)
        outs = [o.materialise() if _is_lora(o) else o for o in outs]
        return outs[:ncar], outs[ncar:]

    c, ys = lax.scan(body, list(carry), (packed, keys), length=p["length"], reverse=p["reverse"],
                     unroll=p["unroll"])
    return list(c) + list(ys)


def _cond(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any]:
    index, ops = invals[0], invals[1:]
    fns = [lambda *o, br=br: [x.materialise() if _is_lora(x) else x for x in _eval(br.jaxpr, br.consts, o, ctx)]
           for br in eqn.params["branches"]]
    return list(lax.switch(index, fns, *ops))


def _while(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any] | None:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, carry = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    if any(_is_lora(c) for c in carry):
        return None
    cj, bj = p["cond_jaxpr"], p["body_jaxpr"]

    def cond_fun(c: tuple[Any, ...]) -> Any:
        return _eval(cj.jaxpr, cj.consts, list(cconsts) + list(c), ctx)[0]

    def body_fun(c: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(_eval(bj.jaxpr, bj.consts, list(bconsts) + list(c), ctx))

    return list(lax.while_loop(cond_fun, body_fun, tuple(carry)))


_RULES: dict[str, Callable[..., list[Any] | None]] = {
    "convert_element_type": _dtype_view,
    "copy": _dtype_view,
    "copy_p": _dtype_view,
    "reshape": _reshape,
    "squeeze": _reshape,
    "broadcast_in_dim": _reshape,
    "transpose": _transpose,
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "gather": _gather,
    "scan": _scan,
    "cond": _cond,
    "while": _while,
}


# --- entry point ---------------------------------------------------------------------------------

def _is_dynamic(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _leaf_paths(params: Any) -> list[str]:
    """The canonical path of every jax leaf of ``params``, in ``tree_flatten`` order."""
    out: list[str] = []
    for keypath, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=jpaths.is_variable)[0]:
        n = len(jax.tree_util.tree_leaves(node)) if jpaths.is_variable(node) else 1
        out += [jpaths.path_str(keypath)] * n
    return out


def lazy_call(apply_fn: Callable[..., Any], frozen: Any, lora: Any, config: Any, args: Sequence[Any],
              kwargs: Mapping[str, Any], *, strict: bool = False, rng: Any = None,
              factored: Mapping[str, Any] | None = None) -> Any:
    """Returns ``apply_fn(merge(frozen, lora, config), *args, **kwargs)`` computed lazily.

    Never forms ``s * A ⊗ B`` (nor its full-size gradient) for kernels consumed by matmul/einsum,
    conv or embedding lookup; see the module docstring for the rules and the fallback.

    Args:
      apply_fn: any function ``apply_fn(params, *args, **kwargs)``.
      frozen: the base parameter tree (Linen dict, ``nnx.State``, nested dicts).
      lora: the lora tree (``{"A", "B"}`` per adapted kernel, whole arrays for trained leaves).
      config: the :class:`jlora.LoraConfig` (its ``dropout`` rate is used when ``rng`` is given).
      args, kwargs: the call's arguments; array leaves are traced, everything else (``train=True``,
        ``mutable=[...]``) is static.
      strict: raise a ValueError naming path and primitive instead of falling back to the merged
        kernel for a use the rewrite does not know.
      rng: a PRNG key; turns LoRA dropout on (when ``config.dropout > 0``).
      factored: ``{path: Factored}`` (default: ``jlora.tree.adapted(frozen, lora, config)``).

    >>> import jlora
    >>> cfg = jlora.LoraConfig(rank=1, alpha=1.0, targets=".*")
    >>> frozen, lora = {"w": jnp.eye(2)}, {"w": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2))}}
    >>> lazy_call(lambda p, x: x @ p["w"], frozen, lora, cfg, (jnp.ones(2),), {}).tolist()
    [3.0, 3.0]
    """
    if factored is None:
        from jlora import tree

        factored = tree.adapted(frozen, lora, config)
    lflat = jpaths.flatten(lora)
    params = jpaths.map_with_path(lambda p, w: lflat[p] if p in lflat else w, frozen)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaf_paths = _leaf_paths(params)
    if len(leaf_paths) != len(leaves):
        raise ValueError(f"lazy_call: frozen has {len(leaves)} leaves but {len(leaf_paths)} paths; "
                         "fix: pass a plain params pytree (Linen dict, nnx.State or nested dicts)")
    arg_leaves, arg_def = jax.tree_util.tree_flatten((tuple(args), dict(kwargs)))
    dyn_pos = [i for i, x in enumerate(arg_leaves) if _is_dynamic(x)]

    def traced(param_leaves: list[Any], dyn: list[Any]) -> Any:
        full = list(arg_leaves)
        for i, x in zip(dyn_pos, dyn):
            full[i] = x
        a, k = jax.tree_util.tree_unflatten(arg_def, full)
        return apply_fn(jax.tree_util.tree_unflatten(treedef, param_leaves), *a, **k)

    dyn = [arg_leaves[i] for i in dyn_pos]
    closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(leaves, dyn)

    index = {p: i for i, p in enumerate(sorted(factored))}
    vals = list(leaves)
    for i, p in enumerate(leaf_paths):
        f = factored.get(p)
        if f is None:
            continue
        a, b = lflat[p + "/A"], lflat[p + "/B"]
        if f.groups is not None:
            b = _unfuse(b, f.n_stack, tuple(f.groups))
        vals[i] = LoraValue(vals[i], a, b, p, index[p], f.n_stack, f.n_in, float(f.scale))
    rate = float(getattr(config, "dropout", 0.0) or 0.0)
    outs = lazy_eval(closed.jaxpr, closed.consts, vals + dyn, strict=strict, rate=rate, rng=rng)
    outs = [o.materialise() if _is_lora(o) else o for o in outs]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)
