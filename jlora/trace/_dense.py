"""The plain dense fast path of the lazy rewrite: tokens as rows, one custom-VJP op per input.

:func:`plain_dense` recognises a 2-D kernel (stored ``(in, out)`` or ``(out, in)``) contracted by
the input's last axis. :func:`dense_rows` runs k such kernels reading one input as one
``jax.custom_vjp`` op holding ``W0``: in training the low-rank branch of :func:`low_rank_2d`
(one ``x·[A_1|...|A_k]`` forward, one ``dA_catᵀ`` backward, row-major token contractions; the
forward as one ``[x | low]·[W0; Bs]`` product where :func:`fuse_is_cheaper`) and
``dX = dY·W0ᵀ + dlow·Aᵀ``; in inference the merged kernel where :func:`merge_is_cheaper`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jlora.trace._quant import dequantize_after, is_dequant
from jlora.trace._value import bind, is_lora

__all__ = ["base_rows", "dense_rows", "fuse_is_cheaper", "low_rank_2d", "merge_is_cheaper", "plain_dense"]


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


def _low_fwd(x: jax.Array, a_cat: jax.Array, bss: tuple[jax.Array, ...], svec: Any = None) -> tuple[Any, tuple[Any, ...]]:
    """``low = x·A_cat`` (times the per-column scales ``svec``, when given) and ``low_i·B_i``."""
    low = jnp.dot(x, a_cat)
    if svec is not None:
        low = low * svec.astype(low.dtype)
    ys, start = [], 0
    for bs in bss:
        ys.append(jnp.dot(low[:, start : start + bs.shape[0]], bs))
        start += bs.shape[0]
    return tuple(ys), (x, a_cat, bss, low)


def _low_bwd(res: tuple[Any, ...], dys: tuple[jax.Array, ...], svec: Any = None) -> tuple[Any, ...]:
    """The cotangents of ``(x, A_cat, bss)``; with ``svec`` (``low`` already scaled) ``dlow`` is scaled too."""
    x, a_cat, bss, low = res
    bss_t, a_t = lax.optimization_barrier((tuple(bs.T for bs in bss), a_cat.T))
    parts = [jnp.dot(dy.astype(bs.dtype), bs_t) for dy, bs, bs_t in zip(dys, bss, bss_t)]
    dlow = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)  # (T, sum r)
    if svec is not None:
        dlow = dlow * svec.astype(dlow.dtype)
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


def _values(w: Any) -> Any:
    """The primal values of one custom-VJP input (an array or a quantized kernel's pytree)."""
    if not is_dequant(w):
        return w.value
    return jax.tree_util.tree_map(lambda p: p.value, w, is_leaf=lambda p: hasattr(p, "perturbed"))


def plain_dense(eqn: Any, v: Any) -> bool:
    """A 2-D kernel (``(in, out)`` or ``(out, in)`` stored) on the rhs of a dot contracting its input
    axis with the lhs's last axis: the fast path.

    >>> from jlora.trace._value import LoraValue
    >>> eqn = jax.make_jaxpr(lambda x, w: x @ w)(jnp.ones((2, 4, 3)), jnp.ones((3, 5))).eqns[0]
    >>> v = LoraValue(jnp.ones((3, 5)), jnp.ones((3, 1)), jnp.ones((1, 5)), "w", 0, 0, 1, ((0,), (1,)), 1.0)
    >>> plain_dense(eqn, v), plain_dense(eqn, v.replace(view=((1,), (0,))))
    (True, False)
    """
    if not is_lora(v) or v.ns or (v.ni, v.no) != (1, 1) or len(v.shape) != 2:
        return False
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0]
    if lb or rb or len(rc) != 1 or tuple(lc) != (len(lhs.aval.shape) - 1,):
        return False
    return v.view[rc[0]] == (0,) and v.view[1 - rc[0]] == (1,)


def base_rows(eqn: Any, x2: jax.Array, w: jax.Array) -> jax.Array:
    """``eqn``'s dot on rows: ``x2 (T, in)`` with the 2-D kernel ``w`` (stored ``(in, out)`` or ``(out, in)``).

    >>> eqn = jax.make_jaxpr(lambda x, w: jnp.einsum("bsi,oi->bso", x, w))(jnp.ones((1, 2, 3)), jnp.ones((4, 3))).eqns[0]
    >>> base_rows(eqn, jnp.ones((2, 3)), jnp.ones((4, 3))).shape
    (2, 4)
    """
    (_, rc), _ = eqn.params["dimension_numbers"]
    return bind(eqn, [x2, w], dimension_numbers=(((1,), tuple(rc)), ((), ())))[0]


def merge_is_cheaper(tokens: int, n_in: int, n_out: int) -> bool:
    """Whether ``x·(W0 + A·Bs)`` costs no more FLOPs than ``x·W0 + (x·A)·Bs``: ``T·(in + out) ≥ in·out``
    (both sides times r). Prefill and batch inference merge; decoding a few tokens stays low-rank.

    >>> merge_is_cheaper(512, 64, 64), merge_is_cheaper(1, 4096, 4096)
    (True, False)
    """
    return tokens * (n_in + n_out) >= n_in * n_out


def _contract(e: Any) -> int:
    """The stored kernel axis ``e``'s dot contracts with the input's features: 0 for (in, out), 1 for (out, in)."""
    (_, rc), _ = e.params["dimension_numbers"]
    return int(rc[0])


def fuse_is_cheaper(tokens: int, n_in: int, rank: int) -> bool:
    """Whether the training forward should run ``[x | low]·[W0; Bs]`` (:func:`_fused_fwd`): copying the
    ``(in + r, out)`` kernel costs less memory traffic than writing and re-reading ``low·Bs``
    (``T x out``), i.e. ``in + r < T``.

    >>> fuse_is_cheaper(2048, 384, 8), fuse_is_cheaper(512, 4096, 16)
    (True, False)
    """
    return n_in + rank < tokens


def _fused_fwd(eqns: Sequence[Any], x2: jax.Array, ws: Sequence[jax.Array], a_cat: jax.Array,
               bss: Sequence[jax.Array], svec: Any) -> tuple[list[tuple[jax.Array, jax.Array]], tuple[Any, ...]]:
    """The training forward as one product per kernel: ``y_i = [x | low]·[W0_i; Bs_i]`` (``low = x·A_cat``,
    ``Bs_i`` placed at its rows of ``low``, zeros elsewhere), so ``x·W0 + low·Bs`` is one dot output.

    XLA duplicates a cheap add into every consumer; when ``y`` feeds a nonlinearity that the
    backward pass recomputes (BERT's exact GELU), ``x·W0`` and ``low·Bs`` then both stay alive
    until the backward pass. One dot output is materialised once (MiniLM step: 711 -> 641 MiB).
    ``low`` carries the scales ``svec`` (``bss`` are the raw ``B``). Returns the ``(y_i, 0)`` pairs and
    :func:`_low_bwd`'s residuals ``(x, A_cat, bss, low)``."""
    low = jnp.dot(x2, a_cat) * svec.astype(x2.dtype)
    xl = jnp.concatenate([x2, low], axis=1)
    r_all, starts = a_cat.shape[1], np.cumsum([0] + [b.shape[0] for b in bss])
    pairs = []
    for i, (e, w, b) in enumerate(zip(eqns, ws, bss)):
        rows_b = jnp.pad(b, ((int(starts[i]), int(r_all - starts[i + 1])), (0, 0))).astype(w.dtype)
        w_l = jnp.concatenate([w, rows_b], axis=0) if _contract(e) == 0 else jnp.concatenate([w, rows_b.T], axis=1)
        y = base_rows(e, xl, w_l)
        pairs.append((y, jnp.zeros(y.shape, b.dtype)))
    return pairs, (x2, a_cat, tuple(bss), low)


def _inference(eqns: Sequence[Any], x2: jax.Array, w0s: Sequence[jax.Array], as_: Sequence[jax.Array],
               bss: Sequence[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
    """:func:`dense_rows` not differentiated: the merged kernel where it costs fewer FLOPs and W0's
    dtype holds the factors' precision (a bf16 base with f32 factors keeps the f32 low-rank branch,
    as in training), one low-rank ``x·A_cat`` for the others (``bss``: the scaled B)."""
    t, n_in = x2.shape
    lazy = [i for i, (w, b) in enumerate(zip(w0s, bss)) if not merge_is_cheaper(t, n_in, b.shape[1])
            or jnp.promote_types(w.dtype, b.dtype) != w.dtype]
    lows = {}
    if lazy:
        a_cat = jnp.concatenate([as_[i] for i in lazy], axis=1) if len(lazy) > 1 else as_[lazy[0]]
        lows = dict(zip(lazy, _low_fwd(x2.astype(a_cat.dtype), a_cat, tuple(bss[i] for i in lazy))[0]))
    out = []
    for i, (e, w, a, b) in enumerate(zip(eqns, w0s, as_, bss)):
        if i in lows:
            out.append((base_rows(e, x2, w), lows[i]))
            continue
        d = jnp.dot(a, b)
        acc = jnp.promote_types(w.dtype, d.dtype)
        merged = (w.astype(acc) + (d if _contract(e) == 0 else d.T).astype(acc)).astype(w.dtype)
        base = base_rows(e, x2, merged)
        out.append((base, jnp.zeros(base.shape, b.dtype)))
    return out


def dense_rows(eqns: Sequence[Any], scales: Sequence[float]) -> Callable[..., list[tuple[jax.Array, jax.Array]]]:
    """The plain dense LoRA op for k kernels reading one input, ``eqns`` their dots, ``scales`` their s:
    ``(x2, w0s, as_, bs) -> [(x2·W0_i, s_i·(x2·A_i)·B_i)]`` (``x2`` (T, in), ``A_i`` (in, r_i), ``B_i`` (r_i, out_i)).

    Differentiated (training): :func:`low_rank_2d`'s forward and backward on ``A_cat = [A_1|...|A_k]``
    and ``Bs_i = s_i·B_i`` (one ``x·A_cat`` and one ``dA_catᵀ`` product for all k), the forward as
    one ``[x | low]·[W0; Bs]`` product per kernel where :func:`fuse_is_cheaper` (one dtype);
    ``dX`` adds ``dY_i·W0_iᵀ``; a ``W0`` gets its gradient only when it is differentiated (then ``x2`` is kept).
    The scales (on ``low`` and ``dlow``: one op per input, not two per kernel), the concatenation and
    the transposes run inside the op, traced once (not linearized).
    Not differentiated (inference): a kernel for which :func:`merge_is_cheaper` and whose ``W0`` dtype
    is at least as wide as the factors' gets one product with ``W0 + A·Bs`` (its pair's low-rank part
    is zero); the others stay low-rank (a bf16 base with f32 factors keeps its f32 branch). The sum
    ``base + low`` is the same either way.

    >>> jp = jax.make_jaxpr(lambda x, w: x @ w)(jnp.ones((4, 2)), jnp.ones((2, 2)))
    >>> (b, l), = dense_rows(jp.eqns, (1.0,))(jnp.ones((4, 2)), (jnp.eye(2),), (jnp.ones((2, 1)),), (jnp.ones((1, 2)),))
    >>> (b + l).tolist()
    [[3.0, 3.0], [3.0, 3.0], [3.0, 3.0], [3.0, 3.0]]
    """

    def scale_vec(bs: Sequence[jax.Array]) -> jax.Array:  # s_i for each column of low = x·A_cat
        return jnp.asarray(np.concatenate([np.full(b.shape[0], s, np.float32) for b, s in zip(bs, scales)]))

    def fwd(x2, w0s, as_, bs):  # symbolic zeros: each leaf a CustomVJPPrimal (value, perturbed)
        x2v, kept = x2.value, tuple(_values(w) for w in w0s)
        ws = tuple(dequantize_after(w, x2v) for w in kept)  # a quantized W0: float here, codes in the residuals
        a_cat = jnp.concatenate([a.value for a in as_], axis=1) if len(as_) > 1 else as_[0].value
        bs = tuple(b.value for b in bs)
        svec = scale_vec(bs)  # s scales low and dlow (one op per group), not each B and dB
        if fuse_is_cheaper(*x2v.shape, a_cat.shape[1]) and all(w.dtype == x2v.dtype == a_cat.dtype for w in ws):
            pairs, res = _fused_fwd(eqns, x2v, ws, a_cat, bs, svec)
        else:
            lows, res = _low_fwd(x2v.astype(a_cat.dtype), a_cat, bs, svec)
            pairs = list(zip([base_rows(e, x2v, w) for e, w in zip(eqns, ws)], lows))
        # x2 itself is kept only for a W0 that is differentiated (a frozen one never is in training);
        # else its dtype rides along as an empty array
        perturbed = tuple(not is_dequant(w) and w.perturbed for w in w0s)
        keep = x2v if any(perturbed) else x2v[:0, :0]
        return pairs, (res, kept, keep, perturbed)

    def bwd(res, cts):
        lres, kept, keep, perturbed = res
        cts = [tuple(jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c for c in pair)
               for pair in cts]
        ws = tuple(dequantize_after(w, cts) for w in kept)  # a quantized W0 is dequantized again, here
        dx, da_cat, dbss = _low_bwd(lres, tuple(dlow for _, dlow in cts), scale_vec(lres[2]))
        dx = dx.astype(keep.dtype)
        dws = []
        for e, w, p, (dbase, _) in zip(eqns, ws, perturbed, cts):
            rc, prec = _contract(e), e.params.get("precision")
            dx = dx + lax.dot_general(dbase, w, (((1,), (1 - rc,)), ((), ())), precision=prec,
                                      preferred_element_type=keep.dtype)
            pair = (keep, dbase) if rc == 0 else (dbase, keep)
            dws.append(lax.dot_general(*pair, (((0,), (0,)), ((), ())), precision=prec,
                                       preferred_element_type=w.dtype) if p else None)
        starts = np.cumsum([0] + [d.shape[0] for d in dbss])
        das = tuple(da_cat[:, starts[i] : starts[i + 1]] for i in range(len(dbss)))
        return dx, tuple(dws), das, dbss

    @jax.custom_vjp
    def op(x2, w0s, as_, bs):
        return _inference(eqns, x2, tuple(dequantize_after(w, x2) for w in w0s), as_,
                          tuple(b * jnp.asarray(sc, b.dtype) for b, sc in zip(bs, scales)))

    op.defvjp(fwd, bwd, symbolic_zeros=True)
    return op
