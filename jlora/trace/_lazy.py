"""The lazy low-rank rewrite: run a model with ``W0 + s * A ⊗ B`` without ever forming the delta.

:func:`lazy_call` traces ``apply_fn`` to a jaxpr (:func:`~jlora.trace._walker.trace_apply`) and evaluates
it with the walker's lazy mode, in which every adapted kernel is a symbolic :class:`LoraValue` (the
base ``W0`` and the factors ``A``, ``B``). Views of the kernel (dtype casts, reshapes, transposes, slices of a stacked
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
  padding, dilations and layouts; a grouped conv (``feature_group_count = G``, its group axis a
  stack axis: one factor pair per group) batches the second product over the groups.
- ``ragged_dot_general`` (MoE experts): ``ragged_dot(x, W0) + ragged_dot(ragged_dot(x, A), s·B)``.
- ``gather`` looking up entries of the kernel's input axes, in any layout and dimension numbers
  (``nn.Embed``, ``jnp.take``, penzai's lookup on the transposed table): ``W0[ids] + A[ids]·(s·B)``; a gather,
  slice or dynamic slice along a stacked kernel's layer axes (``W[i]`` in a loop) slices A and B.
- ``sharding_constraint`` is a view: ``W0`` is constrained and so are ``A`` and ``B`` on their matching
  axes (:func:`~jlora.trace._value.factor_specs`: A's input axes like the kernel's, B's output axes
  like its outputs, the rank axis unsharded); a ``shard_map`` is re-entered (``jax.shard_map``) with
  ``W0`` and the factors sharded that way.
- calls, ``remat``, ``scan``, ``cond``/``switch`` and ``while_loop`` are the walker's
  (:mod:`jlora.trace._walker`); here a stacked kernel entering a ``scan`` as ``xs`` is split into
  per-layer ``W0``, ``A``, ``B`` slices, and a kernel in a loop carry takes the merged fallback.

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

This module is the lazy mode of the walker (its rule table, the fallback, the entry point); the
consumers live in :mod:`jlora.trace._rules` and :mod:`jlora.trace._dense`, :class:`LoraValue` and
its views in :mod:`jlora.trace._value`, the row values in :mod:`jlora.trace._flat`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from jlora.core import dora
from jlora.core import paths as jpaths
from jlora.core._describe import adapted
from jlora.quant._quant import is_quantized
from jlora.trace import _compat as jaxpr_compat
from jlora.trace import _flat as lazy_flat
from jlora.trace import _quant as lazy_quant
from jlora.trace import _walker as walker
from jlora.trace._dense import dense_rows, low_rank_2d, plain_dense
from jlora.trace._flat import full, is_flat, rows
from jlora.trace._quant import Dequant, apply_dequantized, is_dequant, materialise
from jlora.trace._rules import conv, dot_general, gather_rows, ragged_dot
from jlora.trace._value import LoraValue
from jlora.trace._value import bind as _bind
from jlora.trace._value import (dtype_view, dynamic_slice, factor_specs, gather_stack, is_lora, reshape, rev,
                                sharding_constraint, slice_, transpose)
from jlora.trace._walker import Traced, trace_apply

__all__ = ["LoraValue", "Traced", "lazy_call", "lazy_eval", "low_rank_2d", "trace_apply"]


# --- the lazy mode -------------------------------------------------------------------------------

@dataclasses.dataclass
class Lazy(walker.Mode):
    """The lazy rewrite as a walker mode: tracks :class:`LoraValue` kernels and quantized bases
    (:class:`~jlora.trace._quant.Dequant`); the state the rules share (dropout, warnings, shared inputs)."""

    strict: bool
    rate: float
    rng: Any
    warned: set = dataclasses.field(default_factory=set)
    uses: dict = dataclasses.field(default_factory=dict)
    loops: list = dataclasses.field(default_factory=lambda: [0])
    groups: dict = dataclasses.field(default_factory=dict)  # id(jaxpr) -> {input var: [dot eqns]}
    shared: dict = dataclasses.field(default_factory=dict)  # id(dot eqn) -> its precomputed low-rank output
    merged: bool = False  # every consuming use gets W0 + s*A@B (lora_apply's merged mode on a quantized base)

    @property
    def rules(self) -> Mapping[str, walker.Rule]:  # type: ignore[override]
        return _MERGED_RULES if self.merged else _RULES

    @property
    def dropout_on(self) -> bool:
        return self.rng is not None and self.rate > 0.0

    def child(self, rng: Any) -> Lazy:
        return Lazy(self.strict, self.rate, rng, self.warned, {}, self.loops, self.groups, {}, self.merged)

    def tracked(self, x: Any) -> bool:
        return is_lora(x) or is_dequant(x)

    def prepare(self, jaxpr: Any, env: Mapping[Any, Any]) -> None:
        """Groups the dots of ``jaxpr`` by their input (for :func:`_share_inputs`; not with dropout)."""
        if self.dropout_on or id(jaxpr) in self.groups:
            return
        groups: dict[Any, list[Any]] = {}
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and not isinstance(eqn.invars[0], jcore.Literal):
                groups.setdefault(eqn.invars[0], []).append(eqn)
        self.groups[id(jaxpr)] = {k: g for k, g in groups.items() if len(g) > 1}

    def plain(self, eqn: Any, invals: list[Any]) -> list[Any]:
        """No kernel: :func:`jlora.trace._flat.on_rows` on Flat inputs where a rule fits, ``jit`` calls
        inlined; anything else reads the model-shaped values."""
        if not any(is_flat(x) for x in invals):
            return _bind(eqn, invals)
        outs = lazy_flat.on_rows(eqn, invals)
        if outs is None and walker.CALLS.get(eqn.primitive.name) is walker.call:
            outs = walker.call(eqn, invals, self)
        return outs if outs is not None else _bind(eqn, [full(x) for x in invals])

    def enter(self, eqn: Any, invals: list[Any], env: Mapping[Any, Any], jaxpr: Any) -> list[Any]:
        name = eqn.primitive.name
        if name == "dot_general" and len(invals) == 2 and is_lora(invals[1]) and not self.merged \
                and id(eqn) not in self.shared and eqn.invars[0] in self.groups.get(id(jaxpr), {}):
            _share_inputs(jaxpr, env, self, eqn)
        if name == "dot_general" or walker.CALLS.get(name) is walker.call:
            return invals  # these read Flat inputs themselves
        return [full(x) for x in invals]

    def fallback(self, eqn: Any, invals: list[Any]) -> list[Any]:
        return _fallback(eqn, invals, self)

    def output(self, x: Any, keep: bool) -> Any:
        return x if keep else full(x)

    def loop_out(self, eqn: Any, x: Any) -> Any:
        return x.materialise() if is_lora(x) else x

    def loop_keys(self, length: int) -> Any:
        if not self.dropout_on:
            return None
        self.loops[0] += 1
        return jax.random.split(jax.random.fold_in(self.rng, 1_000_003 + self.loops[0]), length)

    def shard_specs(self, x: Any, spec: Any) -> Any:
        """A kernel entering a ``shard_map``: ``W0`` with its spec, the factors with :func:`factor_specs`
        (exact only: no sharded view axis holding merged axes; a quantized base falls back)."""
        if not is_lora(x) or is_dequant(x.w0):
            return None
        a, b, f, exact = factor_specs(x, spec)
        return x.replace(w0=spec, a=a, b=b, factor=f) if exact else None

    def scan_xs(self, x: Any, length: int) -> Any:
        """A stacked kernel scanned over its leading view axis: ``W0``, ``A``, ``B`` (and a quantized
        ``W0``'s codes and scales) sliced per step; None (merged) when that axis is not a stack axis."""
        if is_dequant(x):  # a quantized stacked kernel: its per-layer arrays (else its float kernel)
            split = lazy_quant.layers(x, length)
            return (materialise(x), None) if split is None else split
        lead = x.view[0]
        if len(lead) != 1 or x.role(lead[0]) != "s":
            return None
        c = lead[0]
        moved = x.map_axis(c, lambda arr, ax: jnp.moveaxis(arr, ax, 0))
        split = lazy_quant.layers(x.w0, length) if is_dequant(x.w0) else None
        w0, step = (split[0], split[1]) if split is not None else (materialise(x.w0), None)
        view = tuple(tuple(q - (q > c) for q in axis) for axis in x.view[1:])
        meta = x.replace(w0=None, a=None, b=None, factor=None, ns=x.ns - 1, view=view)

        def rebuild(t: tuple[Any, ...]) -> LoraValue:
            return meta.replace(w0=t[0] if step is None else step(t[0]), a=t[1], b=t[2], factor=t[3])

        return (w0, moved.a, moved.b, moved.factor), rebuild


def _share_inputs(jaxpr: Any, env: Mapping[Any, Any], ctx: Lazy, eqn: Any) -> None:
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


def _fallback(eqn: Any, invals: Sequence[Any], ctx: Lazy, why: str = "") -> list[Any]:
    """The merged kernel ``W0 + s * A ⊗ B`` for this use (warned once per path and primitive; strict:
    raises); a quantized ``W0`` is dequantized inside the use."""
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
                              stacklevel=4)
    invals = [v if is_lora(v) or is_dequant(v) else full(v) for v in invals]
    # a quantized W0 is dequantized inside the use (forward and backward), never kept as a float
    return apply_dequantized(lambda vals: _bind(eqn, [v.materialise() if is_lora(v) else v for v in vals]), invals)


# --- the rule table ------------------------------------------------------------------------------

def _view(rule: walker.Rule) -> walker.Rule:
    """A view of the kernel: the LoRA rule on a :class:`LoraValue`, recorded on a quantized base."""
    def apply(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
        if is_lora(invals[0]):
            return rule(eqn, invals, ctx)
        v = lazy_quant.view(eqn, invals)
        return None if v is None else [v]
    return apply


def _consumer(rule: walker.Rule) -> walker.Rule:
    """A consumer: its rule where a :class:`LoraValue` enters (a quantized base alone: the fallback)."""
    return lambda eqn, invals, ctx: rule(eqn, invals, ctx) if any(is_lora(x) for x in invals) else None


_VIEWS = {name: _view(rule) for names, rule in [
    (tuple(sorted(walker.SAME_AXES - {"sharding_constraint"})), dtype_view),
    (("reshape", "squeeze", "expand_dims", "broadcast_in_dim"), reshape),
    (("transpose",), transpose), (("rev",), rev), (("slice",), slice_), (("dynamic_slice",), dynamic_slice),
    (("sharding_constraint",), sharding_constraint)] for name in names}

_RULES: dict[str, walker.Rule] = {
    **_VIEWS, **walker.CALLS, **walker.CONTROL,
    "shard_map": walker.shard_map,
    "dot_general": _consumer(dot_general),
    "conv_general_dilated": _consumer(conv),
    "ragged_dot_general": _consumer(ragged_dot),
    "gather": _consumer(lambda eqn, invals, ctx: gather_rows(eqn, invals, ctx) or gather_stack(eqn, invals, ctx)),
}

# merged mode: every consumer takes the fallback; a pick of stacked layers stays a view
_MERGED_RULES = {k: r for k, r in _RULES.items() if k not in ("dot_general", "conv_general_dilated",
                                                                 "ragged_dot_general")}
_MERGED_RULES["gather"] = _consumer(gather_stack)


def lazy_eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], *, strict: bool = False,
              rate: float = 0.0, rng: Any = None, merged: bool = False) -> list[Any]:
    """Evaluates ``jaxpr`` on ``args`` where some args are :class:`LoraValue` kernels.

    The seam under :func:`lazy_call`, usable directly on any jaxpr.

    >>> jp = jax.make_jaxpr(lambda w, x: x @ w)(jnp.zeros((2, 2)), jnp.ones((1, 2)))
    >>> v = LoraValue(jnp.eye(2), jnp.ones((2, 1)), jnp.ones((1, 2)), "w", 0, 0, 1, ((0,), (1,)), 1.0)
    >>> lazy_eval(jp.jaxpr, jp.consts, [v, jnp.ones((1, 2))])[0].tolist()
    [[3.0, 3.0]]
    """
    return walker.run(Lazy(strict, float(rate), rng, merged=merged), jaxpr, consts, args)


# --- entry point ---------------------------------------------------------------------------------

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
      factored: ``{path: Factored}`` (default: ``jlora.adapted(frozen, lora, config)``).
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
        b = f.layout.expand_fused(b)  # a fused kernel's B as the block-sparse B of the whole kernel
        factor = None
        if f.dora:
            factor = apply_dequantized(lambda t, f=f: dora.dora_lazy_terms(*t, f, w0_sq=_sq_norm(t[0], f)),
                                       (vals[i], a, b, lflat[p + "/m"]))
        view = tuple(f.layout.canonical_axes(k) for k in range(len(f.kernel_shape)))
        vals[i] = LoraValue(vals[i], a, b, p, index[p], f.n_stack, f.n_in, view, float(f.scale), factor)
    rate = float(getattr(config, "dropout", 0.0) or 0.0)
    outs = lazy_eval(*jaxpr_compat.body(t.closed), vals + t.dyn, strict=strict, rate=rate, rng=rng, merged=merged)
    return t.unflatten([o.materialise() if is_lora(o) else o for o in outs])
