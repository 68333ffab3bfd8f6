"""The lazy low-rank rewrite: run a model with ``W0 + s * A ⊗ B`` without ever forming the delta.

:func:`lazy_call` traces ``apply_fn`` to a jaxpr (``jax.make_jaxpr``) and evaluates it with an
interpreter in which every adapted kernel is a symbolic :class:`LoraValue` (the base ``W0`` and the
factors ``A``, ``B``). Views of the kernel (dtype casts, reshapes, transposes, slices of a stacked
layer axis) are applied to ``W0`` and mirrored on the tiny factors; the consumers are rewritten:

- ``dot_general`` (matmul, einsum, ``DenseGeneral``, a tied ``Embed.attend``):
  ``dot(x, W0) + (x·A)·(s·B)``; a contraction over the kernel's *output* axes uses the
  transposed roles ``(x·(s·B)ᵀ)·Aᵀ``; stacked kernels must be batched over their stack axes.
  A plain 2-D kernel contracted by the last axis of ``x`` takes a fast path
  (:func:`~jlora.trace._dense.dense_rows`): tokens flattened to 2-D and one ``jax.custom_vjp``
  op holding ``W0`` (the scales applied to ``x·A`` and its cotangent, token-contracting products
  written row-major behind ``lax.optimization_barrier``, no cotangent for a frozen ``W0``, the
  forward as one ``[x | x·A]·[W0; s·B]`` product where ``in + r < T``); plain dense kernels reading
  the same input (q, k, v) share one ``x·[A_q|A_k|A_v]`` forward and one ``dAᵀ`` product
  backward (without dropout: each use needs its own mask). Not differentiated (inference), the
  op multiplies by the merged kernel when that costs fewer FLOPs (``T·(in + out) ≥ in·out``:
  prefill, batch scoring) and stays low-rank otherwise (decoding). Its output stays a 2-D
  ``(tokens, out)`` :class:`~jlora.trace._flat.Flat` value through elementwise ops (bias, residual
  add, activation) and following dense uses, so XLA never sinks the reshapes below the add and
  keeps both products alive (:mod:`jlora.trace._flat`).
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

DoRA kernels (an ``'m'`` in the lora tree) run factored too: ``y = factor ⊙ (x·W0 + s·(x·A)·B)``
with ``factor = m / stop_gradient(||W0 + s·A⊗B||_in)`` from :func:`jlora.dora.dora_lazy_terms`
(low-rank identities, no ``(in, out)`` product), applied along each use's output axes before any
bias add (dense, einsum, conv, embedding lookup; a contraction over the output axes falls back).
With dropout, PEFT's form: ``x·W0 + (factor - 1) ⊙ (drop(x)·W0) + factor ⊙ s·(drop(x)·A)·B``.

This module is the interpreter (control flow, the entry point); the per-primitive rules live in
:mod:`jlora.trace._rules` and :mod:`jlora.trace._dense`, :class:`LoraValue` and its views in
:mod:`jlora.trace._value`, the row values in :mod:`jlora.trace._flat`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jlora.core import dora
from jlora.trace import _compat as jaxpr_compat
from jlora.trace import _flat as lazy_flat
from jlora.core._describe import adapted
from jlora.core import paths as jpaths
from jlora.trace._flat import full, is_flat, rows
from jlora.trace import _quant as lazy_quant
from jlora.trace._quant import Dequant, apply_dequantized, is_dequant, materialise
from jlora.quant._quant import is_quantized
from jlora.trace._dense import dense_rows, low_rank_2d, plain_dense
from jlora.trace._rules import conv, dot_general, gather_rows, ragged_dot
from jlora.trace._value import (LoraValue, dtype_view, dynamic_slice, gather_stack, is_lora, reshape, rev,
                              slice_, transpose)
from jlora.trace._value import bind as _bind

__all__ = ["LoraValue", "Traced", "lazy_call", "lazy_eval", "low_rank_2d", "trace_apply"]

_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
_CUSTOM = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_REMAT = frozenset({"remat2", "remat", "checkpoint"})


# --- helpers of the entry point and the interpreter --------------------------------------------

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


def _share_inputs(jaxpr: Any, env: Mapping[Any, Any], ctx: Any, eqn: Any) -> None:
    """Runs one :func:`~jlora.trace._dense.dense_rows` for all plain dense LoRA kernels reading ``eqn``'s
    input (one ``x·[A_1|...|A_k]`` forward, one ``dA_catᵀ`` backward).

    Runs when the first such dot of a jaxpr is reached; the ``(base, low)`` outputs of the others are
    left in ``ctx.shared`` for their own equations (only without dropout: each use needs its mask).
    """
    x_var = eqn.invars[0]
    x = rows(env[x_var])
    members = []
    for e in ctx.groups.get(id(jaxpr), {}).get(x_var, ()):
        w = e.invars[1]
        v = None if isinstance(w, jcore.Literal) else env.get(w)
        if id(e) not in ctx.shared and is_lora(v) and plain_dense(e, v) and (
                not members or v.a.dtype == members[0][1].a.dtype):  # one A_cat: one dtype
            members.append((e, v))
    if len(members) < 2 or members[0][0] is not eqn:
        return
    pairs = dense_rows(tuple(e for e, _ in members), tuple(v.scale for _, v in members))(
        x, tuple(v.w0 for _, v in members), tuple(v.a for _, v in members), tuple(v.b for _, v in members))
    for (e, _), pair in zip(members, pairs):
        ctx.shared[id(e)] = pair


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
    merged: bool = False  # every consuming use gets W0 + s*A@B (lora_apply's merged mode on a quantized base)

    def child(self, rng: Any) -> _Ctx:
        return _Ctx(self.strict, self.rate, rng, self.warned, {}, self.loops, self.groups, {}, self.merged)

    @property
    def dropout_on(self) -> bool:
        return self.rng is not None and self.rate > 0.0


def _fallback(eqn: Any, invals: Sequence[Any], ctx: _Ctx, why: str = "") -> list[Any]:
    name = eqn.primitive.name
    for v in invals:
        if is_lora(v):
            msg = (f"jlora lazy: kernel {v.path!r} is used by primitive {name!r}"
                   f"{' (' + why + ')' if why else ''}, which the low-rank rewrite does not handle")
            if ctx.strict:
                raise ValueError(msg + "; fix: use mode='merged', or strict=False to use the merged kernel "
                                 "for this use")
            if (v.path, name) not in ctx.warned and not ctx.merged:
                ctx.warned.add((v.path, name))
                warnings.warn(msg + "; using the merged kernel W0 + s*A@B for this use (correct, not lazy)",
                              stacklevel=3)
    invals = [v if is_lora(v) or is_dequant(v) else full(v) for v in invals]
    # a quantized W0 is dequantized inside the use (forward and backward), never kept as a float
    return apply_dequantized(lambda vals: _bind(eqn, [v.materialise() if is_lora(v) else v for v in vals]), invals)


def lazy_eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], *, strict: bool = False,
              rate: float = 0.0, rng: Any = None, merged: bool = False) -> list[Any]:
    """Evaluates ``jaxpr`` on ``args`` where some args are :class:`LoraValue` kernels.

    The seam under :func:`lazy_call`, usable directly on any jaxpr.

    >>> jp = jax.make_jaxpr(lambda w, x: x @ w)(jnp.zeros((2, 2)), jnp.ones((1, 2)))
    >>> v = LoraValue(jnp.eye(2), jnp.ones((2, 1)), jnp.ones((1, 2)), "w", 0, 0, 1, ((0,), (1,)), 1.0)
    >>> lazy_eval(jp.jaxpr, jp.consts, [v, jnp.ones((1, 2))])[0].tolist()
    [[3.0, 3.0]]
    """
    return _eval(jaxpr, consts, args, _Ctx(strict, float(rate), rng, merged=merged))


def _eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ctx: _Ctx, keep_flat: bool = False) -> list[Any]:
    """The interpreter loop. Values are arrays, :class:`LoraValue` kernels and (between equations)
    :class:`~jlora.trace._flat.Flat` rows; outputs are arrays unless ``keep_flat`` (an inlined ``jit``)."""
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
        if any(is_lora(x) for x in invals):
            if name == "dot_general" and eqn.invars[0] in groups and id(eqn) not in ctx.shared \
                    and is_lora(invals[1]) and not ctx.merged:
                _share_inputs(jaxpr, env, ctx, eqn)
            if name != "dot_general" and name not in _CALLS:  # these read Flat inputs themselves
                invals = [full(x) for x in invals]
            outs = _rewrite(eqn, invals, ctx)
        elif any(is_dequant(x) for x in invals):
            outs = _quantized(eqn, invals, ctx)
        elif any(is_flat(x) for x in invals):
            outs = _flat(eqn, invals, ctx)
        else:
            outs = _bind(eqn, invals)
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [read(v) if keep_flat else full(read(v)) for v in jaxpr.outvars]


def _flat(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any]:
    """An equation with Flat inputs and no kernel: :func:`jlora.trace._flat.on_rows` where a rule fits,
    ``jit`` calls inlined; anything else reads the model-shaped values."""
    outs = lazy_flat.on_rows(eqn, invals)
    if outs is None and eqn.primitive.name in _CALLS:
        inner = jaxpr_compat.call_body(eqn.params)
        outs = _eval(inner.jaxpr, inner.consts, invals, ctx, keep_flat=True)
    return outs if outs is not None else _bind(eqn, [full(x) for x in invals])


def _quantized(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any]:
    """An equation reading a quantized base kernel (no LoRA value): a view is recorded, calls and
    control flow are entered, anything else dequantizes inside the operation (:func:`_fallback`)."""
    v = lazy_quant.view(eqn, invals)
    if v is not None:
        return [v]
    name = eqn.primitive.name
    if name in _CALLS or name in _CUSTOM or name in _REMAT or name in ("scan", "cond", "while"):
        return _rewrite(eqn, invals if name in _CALLS else [x if is_dequant(x) else full(x) for x in invals], ctx)
    return _fallback(eqn, invals, ctx)


def _rewrite(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any]:
    name = eqn.primitive.name
    rule = _RULES.get(name)
    if ctx.merged and name in _MERGED_USES:
        rule = gather_stack if name == "gather" else None  # a pick of stacked layers stays a view
        if rule is None:
            return _fallback(eqn, invals, ctx)
    if rule is None:
        if name in _CALLS:
            inner = jaxpr_compat.call_body(eqn.params)
            return _eval(inner.jaxpr, inner.consts, invals, ctx, keep_flat=True)
        if name in _CUSTOM:
            inner = jaxpr_compat.call_body(eqn.params)
            return _eval(inner.jaxpr, inner.consts, invals, ctx)
        if name in _REMAT:
            rule = _remat
    out = rule(eqn, invals, ctx) if rule is not None else None
    if out is None:
        return _fallback(eqn, invals, ctx)
    return out


# --- higher-order primitives ---------------------------------------------------------------------

def _remat(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any]:
    inner, consts = jaxpr_compat.call_body(eqn.params)

    def body(*vals: Any) -> list[Any]:
        return _eval(inner, consts, vals, ctx)

    return list(jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True),
                               policy=eqn.params.get("policy"))(*invals))


def _scan(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any] | None:
    p = eqn.params
    nc, ncar = jaxpr_compat.scan_split(p)
    consts, carry, xs = invals[:nc], invals[nc : nc + ncar], invals[nc + ncar :]
    if any(is_lora(c) or is_dequant(c) for c in carry):  # a kernel carried through a loop: merged
        return None
    metas, packed, w0_steps = [], [], []
    for x in xs:  # a stacked kernel scanned over its leading view axis: slice W0, A, B per step
        if is_dequant(x):  # a quantized stacked kernel: its codes and scales are sliced per layer
            x = _scan_quantized(x, p["length"], metas, packed, w0_steps)
            if x is None:
                continue
        if not is_lora(x):
            metas.append(None)
            packed.append(x)
            w0_steps.append(None)
            continue
        lead = x.view[0]
        if len(lead) != 1 or x.role(lead[0]) != "s":
            return None
        c = lead[0]
        moved = x.map_axis(c, lambda arr, ax: jnp.moveaxis(arr, ax, 0))
        split = lazy_quant.layers(x.w0, p["length"]) if is_dequant(x.w0) else None
        w0 = split[0] if split is not None else materialise(x.w0)
        w0_steps.append(split[1] if split is not None else None)
        packed.append((w0, moved.a, moved.b, moved.factor))
        view = tuple(tuple(q - (q > c) for q in axis) for axis in x.view[1:])
        metas.append(x.replace(w0=None, a=None, b=None, factor=None, ns=x.ns - 1, view=view))
    closed = jaxpr_compat.body(p["jaxpr"])
    keys = None
    if ctx.rng is not None and ctx.rate > 0.0:
        ctx.loops[0] += 1
        keys = jax.random.split(jax.random.fold_in(ctx.rng, 1_000_003 + ctx.loops[0]), p["length"])

    def body(c: list[Any], xk: tuple[list[Any], Any]) -> tuple[list[Any], list[Any]]:
        xs_in, key = xk
        xs_in = [x if m is None else m(x) if callable(m) else
                 m.replace(w0=x[0] if step is None else step(x[0]), a=x[1], b=x[2], factor=x[3])
                 for m, x, step in zip(metas, xs_in, w0_steps)]
        sub = ctx.child(key) if key is not None else ctx
        outs = _eval(closed.jaxpr, closed.consts, list(consts) + list(c) + xs_in, sub)
        outs = [o.materialise() if is_lora(o) else o for o in outs]
        return outs[:ncar], outs[ncar:]

    c, ys = lax.scan(body, list(carry), (packed, keys), length=p["length"], reverse=p["reverse"],
                     unroll=p["unroll"])
    return list(c) + list(ys)


def _scan_quantized(x: Dequant, length: int, metas: list[Any], packed: list[Any], w0_steps: list[Any]) -> Any:
    """A quantized kernel scanned over its leading axis: its per-layer arrays become ``xs`` (and the
    step rebuilds one layer's :class:`Dequant`); returns None then, else its float kernel (a layout
    whose arrays do not split by layer)."""
    split = lazy_quant.layers(x, length)
    if split is None:
        return materialise(x)
    metas.append(split[1])
    packed.append(split[0])
    w0_steps.append(None)
    return None


def _cond(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any]:
    index, ops = invals[0], invals[1:]
    fns = [lambda *o, br=br: [x.materialise() if is_lora(x) else x for x in _eval(br.jaxpr, br.consts, o, ctx)]
           for br in jaxpr_compat.cond_branches(eqn.params)]
    return list(lax.switch(index, fns, *ops))


def _while(eqn: Any, invals: list[Any], ctx: _Ctx) -> list[Any] | None:
    p = eqn.params
    cn, bn = jaxpr_compat.while_split(p)
    cconsts, bconsts, carry = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    if any(is_lora(c) or is_dequant(c) for c in carry):  # a kernel carried through a loop: merged
        return None
    cj, bj = jaxpr_compat.body(p["cond_jaxpr"]), jaxpr_compat.body(p["body_jaxpr"])

    def cond_fun(c: tuple[Any, ...]) -> Any:
        return _eval(cj.jaxpr, cj.consts, list(cconsts) + list(c), ctx)[0]

    def body_fun(c: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(_eval(bj.jaxpr, bj.consts, list(bconsts) + list(c), ctx))

    return list(lax.while_loop(cond_fun, body_fun, tuple(carry)))


_MERGED_USES = frozenset({"dot_general", "conv_general_dilated", "ragged_dot_general", "gather"})

_RULES: dict[str, Callable[..., list[Any] | None]] = {
    "convert_element_type": dtype_view,
    "copy": dtype_view,
    "copy_p": dtype_view,
    "reduce_precision": dtype_view,
    "reshape": reshape,
    "squeeze": reshape,
    "expand_dims": reshape,
    "broadcast_in_dim": reshape,
    "transpose": transpose,
    "rev": rev,
    "slice": slice_,
    "dynamic_slice": dynamic_slice,
    "dot_general": dot_general,
    "conv_general_dilated": conv,
    "ragged_dot_general": ragged_dot,
    "gather": lambda eqn, invals, ctx: gather_rows(eqn, invals, ctx) or gather_stack(eqn, invals, ctx),
    "scan": _scan,
    "cond": _cond,
    "while": _while,
}


# --- entry point ---------------------------------------------------------------------------------

def _leaf_paths(params: Any) -> list[str]:
    """The canonical path of every jax leaf of ``params``, in ``tree_flatten`` order."""
    out: list[str] = []
    for keypath, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=jpaths.is_variable)[0]:
        n = len(jax.tree_util.tree_leaves(node)) if jpaths.is_variable(node) else 1
        out += [jpaths.path_str(keypath)] * n
    return out


@dataclasses.dataclass(frozen=True)
class Traced:
    """``apply_fn(params, *args, **kwargs)`` as a jaxpr over ``leaves + dyn`` (the params' leaves, then the
    array leaves of the arguments; every other argument is static), with each param leaf's path.

    >>> t = trace_apply(lambda p: {"y": 2 * p["w"]}, {"w": jnp.ones(1)}, (), {}, "doc")
    >>> t.unflatten([jnp.zeros(1)])
    {'y': Array([0.], dtype=float32)}
    """

    closed: Any
    out_tree: Any
    leaves: list[Any]
    leaf_paths: list[str]
    dyn: list[Any]

    def unflatten(self, outs: Sequence[Any]) -> Any:
        """The jaxpr's outputs in the structure ``apply_fn`` returns."""
        return jax.tree_util.tree_unflatten(self.out_tree, list(outs))


def trace_apply(apply_fn: Callable[..., Any], params: Any, args: Sequence[Any], kwargs: Mapping[str, Any],
                caller: str) -> Traced:
    """Traces ``apply_fn(params, *args, **kwargs)`` once (``jax.make_jaxpr``) for an interpreter to evaluate;
    ``caller`` names the public function in the error for a params tree whose leaves have no paths.

    >>> t = trace_apply(lambda p, x, scale=2: x @ p["w"] * scale, {"w": jnp.eye(2)}, (jnp.ones(2),), {}, "doc")
    >>> t.leaf_paths, len(t.dyn), [e.primitive.name for e in t.closed.jaxpr.eqns]
    (['w'], 1, ['dot_general', 'mul'])
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaf_paths = _leaf_paths(params)
    if len(leaf_paths) != len(leaves):
        raise ValueError(f"{caller}: the params tree has {len(leaves)} leaves but {len(leaf_paths)} paths; "
                         "fix: pass a plain params pytree (Linen dict, nnx.State or nested dicts)")
    arg_leaves, arg_def = jax.tree_util.tree_flatten((tuple(args), dict(kwargs)))
    dyn_pos = [i for i, x in enumerate(arg_leaves) if isinstance(x, (jax.Array, np.ndarray, np.generic))]

    def traced(param_leaves: list[Any], dyn: list[Any]) -> Any:
        full_args = list(arg_leaves)
        for i, x in zip(dyn_pos, dyn):
            full_args[i] = x
        a, k = jax.tree_util.tree_unflatten(arg_def, full_args)
        return apply_fn(jax.tree_util.tree_unflatten(treedef, param_leaves), *a, **k)

    dyn = [arg_leaves[i] for i in dyn_pos]
    closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(leaves, dyn)
    return Traced(closed, jax.tree_util.tree_structure(out_shape), leaves, leaf_paths, dyn)


def _sq_norm(w0: jax.Array, f: Any) -> jax.Array:
    """``||W0||_in²`` per output unit as one contraction (no kernel-sized ``W0 * W0`` array), no gradient."""
    ns = f.n_stack
    stack, n_in = f.layout.stack_shape, f.layout.fan_in
    w = f.layout.to_canonical(lax.stop_gradient(w0).astype(jnp.float32)).reshape(stack + (n_in, -1))
    batch = tuple(range(ns)) + (ns + 1,)
    return lax.dot_general(w, w, (((ns,), (ns,)), (batch, batch)), precision=lax.Precision.HIGHEST)


def lazy_call(apply_fn: Callable[..., Any], frozen: Any, lora: Any, config: Any, args: Sequence[Any],
              kwargs: Mapping[str, Any], *, strict: bool = False, rng: Any = None,
              factored: Mapping[str, Any] | None = None, merged: bool = False) -> Any:
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
      factored: ``{path: Factored}`` (default: ``jlora.adapt._tree.adapted(frozen, lora, config)``).
      merged: every use that consumes an adapted kernel gets ``W0 + s * A ⊗ B`` (formed inside the use,
        forward and backward: ``lora_apply``'s merged mode on a quantized base).

    >>> import jlora
    >>> cfg = jlora.LoraConfig(rank=1, alpha=1.0, targets=".*")
    >>> frozen, lora = {"w": jnp.eye(2)}, {"w": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2))}}
    >>> lazy_call(lambda p, x: x @ p["w"], frozen, lora, cfg, (jnp.ones(2),), {}).tolist()
    [3.0, 3.0]
    """
    if factored is None:
        factored = adapted(frozen, lora, config)
    lflat = jpaths.flatten(lora)
    qflat = {p: w for p, w in jpaths.flatten(frozen).items() if is_quantized(w)}

    def traced_leaf(p: str, w: Any) -> Any:  # a quantized kernel is traced as its float shape
        return lflat[p] if p in lflat else jax.ShapeDtypeStruct(w.shape, w.dtype) if p in qflat else w

    params = jpaths.map_with_path(traced_leaf, frozen)
    t = trace_apply(apply_fn, params, args, kwargs, "lazy_call")
    index = {p: i for i, p in enumerate(sorted(factored))}
    vals = list(t.leaves)
    for i, p in enumerate(t.leaf_paths):
        if p in qflat:  # dequantized at each use, inside the op (jlora.trace._quant)
            vals[i] = Dequant(qflat[p])
        f = factored.get(p)
        if f is None:
            continue
        a, b = lflat[p + "/A"], lflat[p + "/B"]
        if f.groups is not None:
            b = _unfuse(b, f.n_stack, tuple(f.groups))
        factor = None
        if f.dora:
            factor = apply_dequantized(lambda t, f=f: dora.dora_lazy_terms(*t, f, w0_sq=_sq_norm(t[0], f)),
                                       (vals[i], a, b, lflat[p + "/m"]))
        view = tuple(f.layout.canonical_axes(k) for k in range(len(f.kernel_shape)))
        vals[i] = LoraValue(vals[i], a, b, p, index[p], f.n_stack, f.n_in, view, float(f.scale), factor)
    rate = float(getattr(config, "dropout", 0.0) or 0.0)
    outs = lazy_eval(*jaxpr_compat.body(t.closed), vals + t.dyn, strict=strict, rate=rate, rng=rng, merged=merged)
    return t.unflatten([o.materialise() if is_lora(o) else o for o in outs])
