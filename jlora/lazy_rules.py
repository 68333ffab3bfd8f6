"""The rules of the lazy low-rank rewrite (:mod:`jlora.lazy`): the symbolic kernel and its uses.

:class:`LoraValue` is an adapted kernel kept as ``W0``, ``A``, ``B`` (and, for DoRA, the per-output
factor ``m / ||W0 + s·A⊗B||_in``). Each rule takes a jaxpr equation whose inputs include a
``LoraValue`` and returns its outputs, or ``None`` when it does not apply (the interpreter then
falls back to the merged kernel): views of the kernel (casts, reshapes, transposes, stack slices)
and its consumers (``dot_general`` with the custom-VJP dense fast path :func:`low_rank_2d`,
``conv_general_dilated``, ``gather``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["LoraValue", "low_rank_2d"]


# --- the symbolic kernel ------------------------------------------------------------------------

@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class LoraValue:
    """A kernel ``W0 + scale * A ⊗ B`` kept in factored form (DoRA: ``factor ⊙ (W0 + scale * A ⊗ B)``).

    ``w0`` has shape ``stack + in + out``; ``a`` is ``stack + in + (r,)`` and ``b`` is
    ``stack + (r,) + out`` (rank contracted, batched over the stack axes). For a DoRA kernel
    ``factor`` is ``m / stop_gradient(||W0 + s·A⊗B||_in)`` (float32, ``stack + out``, from
    :func:`jlora.dora.dora_lazy_terms`), applied to the output axes of every use; else ``None``.
    A pytree whose leaves are these arrays, so it passes through ``jax.checkpoint``/``lax.cond``.

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
    factor: Any = None

    def tree_flatten(self):  # noqa: D102
        return (self.w0, self.a, self.b, self.factor), (self.path, self.index, self.n_stack, self.n_in, self.scale)

    @classmethod
    def tree_unflatten(cls, aux, children):  # noqa: D102
        w0, a, b, factor = children
        return cls(w0, a, b, *aux, factor=factor)

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

    def out_factor(self, expand: tuple[int, ...]) -> jax.Array:
        """The DoRA factor (``stack + out``) with size-1 axes inserted at ``expand`` positions."""
        f = self.factor
        for ax in sorted(expand):
            f = jnp.expand_dims(f, ax)
        return f

    def materialise(self) -> jax.Array:
        """``W0 + scale * A ⊗ B`` (times the DoRA factor), summed in float32 (or wider), cast to ``w0``'s dtype."""
        ns = self.n_stack
        stack, shape = self.shape[:ns], self.shape
        n_in = math.prod(shape[ns : ns + self.n_in])
        acc = jnp.promote_types(jnp.float32, jnp.promote_types(self.w0.dtype, self.a.dtype))
        a = self.a.astype(acc).reshape(stack + (n_in, self.rank))
        b = self.b.astype(acc).reshape(stack + (self.rank, -1))
        d = jnp.matmul(a, b, precision=lax.Precision.HIGHEST) * jnp.asarray(self.scale, acc)
        w = self.w0.astype(acc) + d.reshape(shape)
        if self.factor is not None:
            w = w * self.out_factor(tuple(range(ns, ns + self.n_in))).astype(acc)
        return w.astype(self.w0.dtype)


def _is_lora(x: Any) -> bool:
    return isinstance(x, LoraValue)


def _bind(eqn: Any, invals: Sequence[Any], **overrides: Any) -> list[Any]:
    params = eqn.primitive.get_bind_params(dict(eqn.params, **overrides))
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


# --- views ---------------------------------------------------------------------------------------

def _view(v: LoraValue, eqn: Any, a: Any, b: Any, n_stack: int, n_in: int, factor: Any = None) -> list[Any]:
    w0 = _bind(eqn, [v.w0])[0]
    return [v.replace(w0=w0, a=a, b=b, n_stack=n_stack, n_in=n_in, factor=factor)]


def _map_factor(v: LoraValue, fn: Callable[[jax.Array], jax.Array]) -> Any:
    return None if v.factor is None else fn(v.factor)


def _dtype_view(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    v = invals[0]
    return _view(v, eqn, v.a, v.b, v.n_stack, v.n_in, v.factor)


def _reshape(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
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
    return _view(v, eqn, a, b, k1, k2 - k1, _map_factor(v, lambda f: f.reshape(new[:k1] + new[k2:])))


def _transpose(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
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
        factor = _map_factor(v, lambda f: jnp.transpose(f, stack + [p - ni for p in rest[ni:]]))
        return _view(v, eqn, a, b, ns, ni, factor)
    if all(not ins(p) for p in rest[:no]) and v.factor is None:  # stack + out + in: the roles of A and B swap
        a = jnp.transpose(v.b, stack + b_out(rest[:no]) + [ns])
        b = jnp.transpose(v.a, stack + [v.a.ndim - 1] + list(rest[no:]))
        return _view(v, eqn, a, b, ns, no)
    return None


def _slice(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    v = invals[0]
    ns, shape = v.n_stack, v.shape
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(shape)
    if ns == 0 or any((start[i], limit[i], strides[i]) != (0, shape[i], 1) for i in range(ns, len(shape))):
        return None
    cut = lambda x: lax.slice(x, tuple(start[:ns]) + (0,) * (x.ndim - ns),  # noqa: E731
                              tuple(limit[:ns]) + x.shape[ns:], tuple(strides[:ns]) + (1,) * (x.ndim - ns))
    return _view(v, eqn, cut(v.a), cut(v.b), ns, v.n_in, _map_factor(v, cut))


def _dynamic_slice(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    v, starts = invals[0], invals[1:]
    ns, shape = v.n_stack, v.shape
    sizes = eqn.params["slice_sizes"]
    if ns == 0 or any(_is_lora(s) for s in starts) or any(sizes[i] != shape[i] for i in range(ns, len(shape))):
        return None
    zero = jnp.zeros((), jnp.asarray(starts[0]).dtype)
    cut = lambda x: lax.dynamic_slice(x, list(starts[:ns]) + [zero] * (x.ndim - ns),  # noqa: E731
                                      tuple(sizes[:ns]) + x.shape[ns:])
    w0 = _bind(eqn, [v.w0, *starts])[0]
    return [v.replace(w0=w0, a=cut(v.a), b=cut(v.b), factor=_map_factor(v, cut))]


# --- consumers -----------------------------------------------------------------------------------

def _dropout(x: jax.Array, v: LoraValue, ctx: Any) -> jax.Array:
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


def _finish(base: jax.Array, low: jax.Array, factor: Any, base_dropped: Any = None) -> jax.Array:
    """The output of one use: ``base + low``; DoRA: ``factor ⊙ (base + low)`` (``factor`` broadcast).

    With LoRA dropout (``base_dropped``: the base product of the dropped input) DoRA follows PEFT:
    ``base + (factor - 1) ⊙ base_dropped + factor ⊙ low``.
    """
    if factor is None:
        return _add(base, low)
    acc = jnp.promote_types(jnp.float32, jnp.promote_types(base.dtype, low.dtype))
    f, y, low = factor.astype(acc), base.astype(acc), low.astype(acc)
    if base_dropped is None:
        return (f * (y + low)).astype(base.dtype)
    return (y + (f - 1) * base_dropped.astype(acc) + f * low).astype(base.dtype)


def _shaped_factor(v: LoraValue, ndim: int, axes: Sequence[int]) -> Any:
    """``v.factor`` (``stack + out``) broadcast to ``ndim`` axes, its axes landing at ``axes``."""
    if v.factor is None:
        return None
    order = sorted(range(len(axes)), key=lambda i: axes[i])
    f = jnp.transpose(v.factor, order)
    shape = [1] * ndim
    for i, ax in enumerate(sorted(axes)):
        shape[ax] = f.shape[i]
    return f.reshape(shape)


def _dropped(x: jax.Array, v: LoraValue, ctx: Any, base_of: Callable[[jax.Array], jax.Array]) -> tuple[Any, Any]:
    """(the input of A in A's dtype, the base product of the dropped input for DoRA with dropout, or None)."""
    xd = _dropout(x, v, ctx)
    base_dropped = base_of(xd) if v.factor is not None and xd is not x else None
    return xd.astype(v.a.dtype), base_dropped


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


def _dot_general(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
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
    if transposed and v.factor is not None:
        return None  # DoRA contracted over its output axes (a tied attend): the merged kernel
    base_of = lambda xx: _bind(eqn, [v.w0, xx] if kernel_lhs else [xx, v.w0])[0]  # noqa: E731
    base = base_of(x)
    nb, n_out = len(wb), nd - ns - ni
    n_free_x = x.ndim - len(xc) - len(xb)
    # output = batch (in wb's order) + x free + out (kernel lhs: batch + out + x free)
    first_out = nb + (0 if kernel_lhs else n_free_x)
    factor = _shaped_factor(v, base.ndim, [list(wb).index(i) for i in range(ns)]
                            + list(range(first_out, first_out + n_out)))
    if not transposed and not kernel_lhs and _plain_dense(eqn, v):
        low, base_dropped = ctx.shared.pop(id(eqn), None), None
        if low is None:
            xd, base_dropped = _dropped(x, v, ctx, base_of)
            low = low_rank_2d(xd.reshape(-1, x.shape[-1]), v.a, (v.scaled_b(),))[0]
        return [_finish(base, low.reshape(x.shape[:-1] + (v.shape[-1],)), factor, base_dropped)]
    xd, base_dropped = _dropped(x, v, ctx, base_of)
    bs = v.scaled_b()
    if not transposed:  # (x·A)·Bs
        first, second = v.a, bs
        first_c, second_c = tuple(wc), ns
    else:  # (x·Bsᵀ)·Aᵀ
        first, second = bs, v.a
        first_c, second_c = tuple(p - ni + 1 for p in wc), v.a.ndim - 1
    low = lax.dot_general(xd, first, ((tuple(xc), first_c), (tuple(xb), tuple(wb))))
    low = lax.dot_general(low, second, (((low.ndim - 1,), (second_c,)), (tuple(range(nb)), tuple(wb))))
    if kernel_lhs:  # dot_general puts lhs free axes first: batch + kernel free + x free
        perm = (list(range(nb)) + list(range(nb + n_free_x, low.ndim)) + list(range(nb, nb + n_free_x)))
        low = jnp.transpose(low, perm)
    return [_finish(base, low, factor, base_dropped)]


def _conv(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
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
    base_of = lambda xx: _bind(eqn, [xx, v.w0])[0]  # noqa: E731
    base = base_of(x)
    xd, base_dropped = _dropped(x, v, ctx, base_of)
    low = _bind(eqn, [xd, v.a], preferred_element_type=None)[0]  # a conv to r channels
    feat = dn.out_spec[1]
    low = jnp.moveaxis(jnp.tensordot(low, v.scaled_b(), axes=[[feat], [0]]), -1, feat)  # 1x1 conv
    return [_finish(base, low, _shaped_factor(v, base.ndim, [feat]), base_dropped)]


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
    return [v.replace(w0=_bind(eqn, [v.w0, idx])[0], a=pick(v.a), b=pick(v.b), n_stack=new_ns,
                      factor=_map_factor(v, pick))]


def _gather(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
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
    return [_finish(base, low, _shaped_factor(v, base.ndim, [feat]))]  # no dropout on lookups (PEFT)
