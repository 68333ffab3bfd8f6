"""The consumers of the lazy rewrite (:mod:`jlora.trace._lazy`): ``dot_general``, ``conv_general_dilated``,
``ragged_dot_general`` and the lookup ``gather``, each computing ``base + low-rank`` for a
:class:`~jlora.trace._value.LoraValue`.

Every consumer reads the kernel's roles from the value's ``view`` (which canonical axes each axis
of the used kernel holds), so one rule serves any dimension numbers: contracted axes holding the
input axes give ``(x·A)·(s·B)``, contracted output axes the transposed roles ``(x·(s·B)ᵀ)·Aᵀ``,
kernel batch axes and free stack axes batch both products. A plain 2-D use takes the fast
path of :mod:`jlora.trace._dense`. Each rule returns ``None`` when it does not apply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora.trace._dense import base_rows, dense_rows, low_rank_2d, plain_dense
from jlora.trace._flat import Flat, add, full, rows
from jlora.trace._quant import is_dequant
from jlora.trace._value import LoraValue, bind, is_lora

__all__ = ["dot_general", "conv", "gather_rows", "ragged_dot"]


# --- consumers -----------------------------------------------------------------------------------

def _dropout(x: jax.Array, v: LoraValue, ctx: Any) -> jax.Array:
    if ctx.rng is None or ctx.rate <= 0.0:
        return x
    n = ctx.uses.get(v.index, 0)
    ctx.uses[v.index] = n + 1
    key = jax.random.fold_in(jax.random.fold_in(ctx.rng, v.index), n)
    keep = jax.random.bernoulli(key, 1.0 - ctx.rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - ctx.rate, x.dtype), jnp.zeros((), x.dtype))


def _finish(base: jax.Array, low: jax.Array, factor: Any, base_dropped: Any = None) -> jax.Array:
    """The output of one use: ``base + low``; DoRA: ``factor ⊙ (base + low)`` (``factor`` broadcast).

    With LoRA dropout (``base_dropped``: the base product of the dropped input) DoRA follows PEFT:
    ``base + (factor - 1) ⊙ base_dropped + factor ⊙ low``.
    """
    if factor is None:
        return add(base, low)
    acc = jnp.promote_types(jnp.float32, jnp.promote_types(base.dtype, low.dtype))
    f, y, low = factor.astype(acc), base.astype(acc), low.astype(acc)
    if base_dropped is None:
        return (f * (y + low)).astype(base.dtype)
    return (y + (f - 1) * base_dropped.astype(acc) + f * low).astype(base.dtype)


def _dropped(x: jax.Array, v: LoraValue, ctx: Any, base_of: Callable[[jax.Array], jax.Array]) -> tuple[Any, Any]:
    """(the input of A in A's dtype, the base product of the dropped input for DoRA with dropout, or None)."""
    xd = _dropout(x, v, ctx)
    base_dropped = base_of(xd) if v.factor is not None and xd is not x else None
    return xd.astype(v.a.dtype), base_dropped


Label = tuple[str, int]


def _factor_like(v: LoraValue, labels: Sequence[Label], target: Sequence[Sequence[Label]]) -> Any:
    """The DoRA factor (``stack + out``) laid out like an output whose axes carry ``labels``
    (then transposed to ``target`` groups and reshaped to ``shape``; x axes become size 1)."""
    if v.factor is None:
        return None
    mine = [("c", c) for c in range(v.ns)] + [("c", c) for c in range(v.ns + v.ni, v.ns + v.ni + v.no)]
    present = [lab for lab in labels if lab in mine]
    f = v.factor.transpose([mine.index(lab) for lab in present])
    f = f.reshape([f.shape[present.index(lab)] if lab in present else 1 for lab in labels])
    order = [labels.index(lab) for group in target for lab in group]
    f = f.transpose(order)
    bounds = [0]
    for group in target:
        bounds.append(bounds[-1] + len(group))
    return f.reshape([math.prod(f.shape[bounds[i] : bounds[i + 1]]) for i in range(len(target))])


def _split_x(x: jax.Array, w: LoraValue, pair: dict[int, tuple[int, ...]]) -> tuple[jax.Array, list[Label]]:
    """``x`` with each axis paired with kernel axes split into the canonical axes it meets, and the
    label of every resulting axis (``("c", canonical axis)`` or ``("x", x's axis)``)."""
    shape, labels = [], []
    for i, n in enumerate(x.shape):
        if i in pair:
            shape += [w.sizes[c] for c in pair[i]]
            labels += [("c", c) for c in pair[i]]
        else:
            shape.append(n)
            labels.append(("x", i))
    return x.reshape(shape), labels


def _general_dot(eqn: Any, v: LoraValue, x: jax.Array, kernel_lhs: bool, ctx: Any) -> list[Any] | None:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    kc, kb = (lc, lb) if kernel_lhs else (rc, rb)
    xc, xb = (rc, rb) if kernel_lhs else (lc, lb)
    w = v.squeeze_units()
    view, nd = w.view, len(w.shape)
    contracted = [c for j in kc for c in view[j]]
    summed = [c for c in contracted if w.role(c) == "s"]  # stack axes summed over (experts with combine weights)
    roles = {w.role(c) for c in contracted if c not in summed}
    if summed and (roles != {"i"} or w.factor is not None):
        return None
    if roles <= {"i"}:
        group, other, transposed = "i", "o", False
    elif roles == {"o"}:
        group, other, transposed = "o", "i", True
    else:
        return None
    if transposed and w.factor is not None:
        return None  # DoRA contracted over its output axes (a tied attend): the merged kernel
    n_canon = len(w.sizes)
    if set(contracted) - set(summed) != {c for c in range(n_canon) if w.role(c) == group}:
        return None
    batched = [c for j in kb for c in view[j]]
    free_k = [j for j in range(nd) if j not in kc and j not in kb]
    if any(w.role(c) != "s" for c in batched) or any(w.role(c) == group for j in free_k for c in view[j]):
        return None
    free_stack = [c for c in range(w.ns) if c not in batched and c not in summed]

    base_of = lambda xx: bind(eqn, [w.w0, xx] if kernel_lhs else [xx, w.w0])[0]  # noqa: E731
    base = base_of(x)
    xd, base_dropped = _dropped(x, w, ctx, base_of)
    pair = {i: view[kc[k]] for k, i in enumerate(xc)} | {i: view[kb[k]] for k, i in enumerate(xb)}
    xe, labels = _split_x(xd, w, pair)
    bs = w.scaled_b()
    f1, f2 = (bs, w.a) if transposed else (w.a, bs)
    ax1 = w.b_axis if transposed else w.a_axis
    ax2 = w.a_axis if transposed else w.b_axis
    r2 = w.a.ndim - 1 if transposed else w.ns  # the rank axis of the second factor
    x_con = [k for k, lab in enumerate(labels) if lab[0] == "c" and w.role(lab[1]) == group]
    x_bat = [k for k, lab in enumerate(labels) if lab[0] == "c" and w.role(lab[1]) == "s"]
    low = lax.dot_general(xe, f1, ((tuple(x_con), tuple(ax1(labels[k][1]) for k in x_con)),
                                   (tuple(x_bat), tuple(ax1(labels[k][1]) for k in x_bat))))
    x_free = [lab for lab in labels if lab[0] == "x"]
    # a summed stack axis batches the first product and is contracted with r in the second
    low_sum = [k for k, i in enumerate(x_bat) if labels[i][1] in summed]
    stack_order = [labels[i] for i in x_bat if labels[i][1] not in summed] + [("c", c) for c in free_stack]
    low_bat = ([k for k, i in enumerate(x_bat) if labels[i][1] not in summed]
               + [low.ndim - 1 - len(free_stack) + k for k in range(len(free_stack))])
    out = lax.dot_general(low, f2, (((low.ndim - 1, *low_sum), (r2, *(ax2(labels[x_bat[k]][1]) for k in low_sum))),
                                    (tuple(low_bat), tuple(ax2(lab[1]) for lab in stack_order))))
    rest = [("c", c) for c in range(n_canon) if w.role(c) == other]
    out_labels = stack_order + x_free + rest
    k_batch = [[("c", c) for c in view[j]] for j in kb]
    k_free = [[("c", c) for c in view[j]] for j in free_k]
    x_groups = [[lab] for lab in x_free]
    target = k_batch + (k_free + x_groups if kernel_lhs else x_groups + k_free)
    out = out.transpose([out_labels.index(lab) for g in target for lab in g]).reshape(base.shape)
    factor = _factor_like(w, out_labels, target)
    return [_finish(base, out, factor, base_dropped)]


def dot_general(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    """``dot_general`` with the kernel on either side, any dimension numbers; the input may be a
    :class:`~jlora.trace._flat.Flat` value (a plain dense use reads its rows and returns a Flat value)."""
    lhs, rhs = invals
    if is_lora(lhs) and is_lora(rhs):
        return None
    kernel_lhs = is_lora(lhs)
    v, x = (lhs, rhs) if kernel_lhs else (rhs, lhs)
    if not kernel_lhs and plain_dense(eqn, v):
        return [_plain_dense(eqn, v, x, ctx)]
    return _general_dot(eqn, v, full(x), kernel_lhs, ctx)


def _plain_dense(eqn: Any, v: LoraValue, x: Any, ctx: Any) -> Flat:
    """The fast path on rows (:func:`dense_rows`), returned as a Flat value whose LoRA add is left
    pending (without DoRA and dropout) for a following bias add. With dropout: ``x2·W0`` and
    ``low_rank_2d`` of the dropped rows."""
    x2 = rows(x)
    shape = tuple(eqn.outvars[0].aval.shape)
    pair, base_dropped = ctx.shared.pop(id(eqn), None), None
    if pair is None and not ctx.dropout_on:
        pair = dense_rows((eqn,), (v.scale,))(x2, (v.w0,), (v.a,), (v.b,))[0]
    if pair is None:
        base_of = lambda xx: base_rows(eqn, xx, v.w0)  # noqa: E731
        xd, base_dropped = _dropped(x2, v, ctx, base_of)
        pair = base_of(x2), low_rank_2d(xd, v.a, (v.scaled_b(),))[0]
    base, low = pair
    if v.factor is None and base_dropped is None:
        return Flat(base, shape, low)
    return Flat(_finish(base, low, None if v.factor is None else v.factor.reshape(1, -1), base_dropped), shape)


def conv(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    """``conv_general_dilated``: ``conv(x, W0) + B·conv(x, A)`` with the conv's own strides, padding,
    dilations (incl. transposed convs' ``lhs_dilation``), layout and feature groups."""
    x, v = invals
    if is_lora(x) or not is_lora(v):
        return None
    p = eqn.params
    if p["batch_group_count"] != 1:
        return None
    spec, g = p["dimension_numbers"].rhs_spec, p["feature_group_count"]
    w = v.squeeze_units()
    view = w.view
    outs = [c for c in view[spec[0]]]
    if g > 1:
        if w.ns != 1 or not outs or outs[0] != 0 or w.sizes[0] != g:
            return None
        outs = outs[1:]
    elif w.ns:
        return None
    ins = [c for j in spec[1:] for c in view[j]]
    if sorted(outs) != list(range(w.ns + w.ni, w.ns + w.ni + w.no)) or sorted(ins) != list(range(w.ns, w.ns + w.ni)):
        return None
    r = w.rank
    order, a_shape = [], []
    for j in range(len(w.shape)):
        if j == spec[0]:
            order += ([0] if g > 1 else []) + [w.a.ndim - 1]
            a_shape.append(g * r)
        else:
            order += list(view[j])
            a_shape.append(math.prod(w.sizes[c] for c in view[j]))
    a_conv = w.a.transpose(order).reshape(a_shape)
    feat = p["dimension_numbers"].out_spec[1]
    bs = w.scaled_b()  # (g?) + (r,) + out
    lead = [0] if g > 1 else []
    bs = bs.transpose(lead + [w.ns] + [w.b_axis(c) for c in outs]).reshape((g, r, -1) if g > 1 else (r, -1))
    small = math.prod(w.shape) <= math.prod(eqn.outvars[0].aval.shape)  # the kernel is smaller than its output
    if (small and g == 1 and w.factor is None and not ctx.dropout_on and not is_dequant(w.w0)
            and x.dtype == w.w0.dtype == w.a.dtype == bs.dtype):
        return [_conv_merged(eqn, spec[0], feat)(x, w.w0, a_conv, bs)]
    base_of = lambda xx: bind(eqn, [xx, w.w0])[0]  # noqa: E731
    base = base_of(x)
    xd, base_dropped = _dropped(x, w, ctx, base_of)
    low = bind(eqn, [xd, a_conv], preferred_element_type=None)[0]  # a conv to g·r channels
    low = jnp.moveaxis(low, feat, -1)
    if g > 1:
        y = jnp.einsum("...gr,gro->...go", low.reshape(low.shape[:-1] + (g, r)), bs).reshape(low.shape[:-1] + (-1,))
    else:
        y = jnp.tensordot(low, bs, axes=[[low.ndim - 1], [0]])
    y = jnp.moveaxis(y, -1, feat)
    factor = None
    if w.factor is not None:
        f = w.factor.transpose(lead + [w.factor_axis(c) for c in outs]).reshape(-1)
        factor = f.reshape([-1 if k == feat else 1 for k in range(base.ndim)])
    return [_finish(base, y, factor, base_dropped)]


def _conv_merged(eqn: Any, o_axis: int, feat: int) -> Callable[..., jax.Array]:
    """The conv LoRA op when the kernel is no larger than the conv's output (the usual CNN case;
    benchmarks/conv_forms.py, form e: 0.75x full fine-tuning against 1.40x for the two-conv form on
    XLA:CPU): the forward is ONE conv over ``[W0 + A⊗Bs | A]`` (the output and ``low = conv(x, A)``
    at once) and ``dX`` one input-gradient conv with that merged kernel; the factors get ``dA`` (a
    filter gradient on r channels, ``dlow = dY·Bsᵀ``) and ``dBs = lowᵀ·dY``. A kernel-sized merged
    kernel is formed (no larger than one activation); ``W0`` gets no gradient and no full-size filter
    gradient is ever formed. Larger kernels, grouped convs, DoRA and dropout use the two-conv form."""

    def conv_with(xx: jax.Array, kernel: jax.Array) -> jax.Array:
        return bind(eqn, [xx, kernel], preferred_element_type=None)[0]

    def merged(w0: jax.Array, a: jax.Array, bs: jax.Array) -> jax.Array:
        d = jnp.moveaxis(jnp.tensordot(a, bs, axes=[[o_axis], [0]]), -1, o_axis)
        return (w0.astype(jnp.float32) + d.astype(jnp.float32)).astype(w0.dtype)

    def fwd(x, w0, a, bs):
        wm = merged(w0, a, bs)
        both = conv_with(x, jnp.concatenate([wm, a], axis=o_axis))
        cout = w0.shape[o_axis]
        y = lax.slice_in_dim(both, 0, cout, axis=feat)
        low = lax.slice_in_dim(both, cout, cout + a.shape[o_axis], axis=feat)
        return y, (x, wm, a, bs, low)

    def bwd(res, dy):
        x, wm, a, bs, low = res
        dlow = jnp.moveaxis(jnp.tensordot(dy, bs, axes=[[feat], [1]]), -1, feat)  # dY·Bsᵀ
        dx = jax.vjp(lambda xx: conv_with(xx, wm), x)[1](dy)[0]
        da = jax.vjp(lambda aa: conv_with(x, aa), a)[1](dlow)[0]
        others = [k for k in range(dy.ndim) if k != feat]
        dbs = jnp.tensordot(low, dy, axes=[others, others])  # (r, cout)
        return dx, jnp.zeros_like(wm), da, dbs.astype(bs.dtype)

    @jax.custom_vjp
    def op(x, w0, a, bs):
        return fwd(x, w0, a, bs)[0]

    op.defvjp(fwd, bwd)
    return op


def ragged_dot(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    """``ragged_dot_general`` with the kernel ``(groups, in, out)`` (any stored order) on the rhs:
    ``ragged_dot(x, W0) + ragged_dot(ragged_dot(x, A), s·B)``, both with the same group sizes (and
    ``group_offset``): one factor pair per expert, never an ``(E, in, out)`` delta or gradient.

    A factor shared by all experts (the expert axis stated as an output axis: one ``A (in, r)``,
    ``B (r, E, out)``; or as an input axis: ``A (E, in, r)``, one ``B (r, out)``) runs as a plain
    dot on the shared factor and a ``ragged_dot`` on the per-expert one."""
    x, v, sizes = invals[0], invals[1], invals[2:]
    if is_lora(x) or not is_lora(v) or any(is_lora(g) for g in sizes):
        return None
    dn = eqn.params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = dn.dot_dimension_numbers
    if len(dn.rhs_group_dimensions) != 1:
        return None
    w = v.squeeze_units(keep=v.view[dn.rhs_group_dimensions[0]])  # one group (a local expert) stays an axis
    if lb or rb or len(lc) != 1 or len(w.shape) != 3 or w.factor is not None:
        return None  # (DoRA on experts would need a per-token factor gather: the merged kernel)
    g_axis, c_axis = dn.rhs_group_dimensions[0], rc[0]
    (f_axis,) = [j for j in range(3) if j not in (g_axis, c_axis)]
    if any(len(w.view[j]) != 1 for j in range(3)):
        return None
    cg, cc, cf = w.view[g_axis][0], w.view[c_axis][0], w.view[f_axis][0]
    shared = w.role(cg)  # 's': per-expert factors; 'o': one A; 'i': one B
    if len(w.sizes) != 3 or w.role(cc) != "i" or w.role(cf) != "o":
        return None
    (ragged,) = dn.lhs_ragged_dimensions
    base = bind(eqn, [x, w.w0, *sizes])[0]
    xd, base_dropped = _dropped(x, w, ctx, lambda xx: bind(eqn, [xx, w.w0, *sizes])[0])
    first = lax.RaggedDotDimensionNumbers(((tuple(lc), (1,)), ((), ())), tuple(dn.lhs_ragged_dimensions), (0,))
    n_free_x = x.ndim - 1
    ragged_low = ragged - (ragged > lc[0])  # x's ragged axis in low (x free axes, then r)
    second = lax.RaggedDotDimensionNumbers((((n_free_x,), (1,)), ((), ())), (ragged_low,), (0,))
    r_axis = w.a.ndim - 1
    if shared == "o":  # x·A (one A), then per expert: ragged_dot(low, B_e)
        low = lax.dot_general(xd, w.a, ((tuple(lc), (w.a_axis(cc),)), ((), ())))
        b_e = w.scaled_b().transpose(w.b_axis(cg), w.ns, w.b_axis(cf))
        y = bind(eqn, [low, b_e, *sizes], ragged_dot_dimension_numbers=second, preferred_element_type=None)[0]
    else:
        a_e = w.a.transpose(w.a_axis(cg), w.a_axis(cc), r_axis)
        low = bind(eqn, [xd, a_e, *sizes], ragged_dot_dimension_numbers=first, preferred_element_type=None)[0]
        if shared == "i":  # per expert ragged_dot(x, A_e), then low·B (one B)
            b = w.scaled_b().transpose(w.ns, w.b_axis(cf))
            y = lax.dot_general(low, b, (((low.ndim - 1,), (0,)), ((), ())))
        else:
            b_e = w.scaled_b().transpose(w.b_axis(cg), w.ns, w.b_axis(cf))
            y = bind(eqn, [low, b_e, *sizes], ragged_dot_dimension_numbers=second, preferred_element_type=None)[0]
    return [_finish(base, y, None, base_dropped)]


def _lookup_axes(eqn: Any, w: LoraValue) -> tuple[tuple[int, ...], list[int]] | None:
    """``(picked, kept)`` view axes of a gather that looks up one entry of the kernel's input axes per
    index (the picked axes hold exactly the input axes, slice size 1; the kept ones, whole, hold
    output axes): an embedding lookup in any layout; None otherwise."""
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    picked = tuple(dn.start_index_map)
    if w.ns or dn.operand_batching_dims or len(set(picked)) != len(picked) or not set(dn.collapsed_slice_dims) <= set(picked):
        return None
    if any(sizes[j] != (1 if j in picked else w.shape[j]) for j in range(len(w.shape))):
        return None
    kept = [j for j in range(len(w.shape)) if j not in picked]
    if sorted(c for j in picked for c in w.view[j]) != list(range(w.ni)) or any(
            w.role(c) != "o" for j in kept for c in w.view[j]):
        return None
    return picked, kept


def gather_rows(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    """An embedding lookup ``W0[ids] + A[ids]·(s·B)`` in any layout and dimension numbers (``nn.Embed``,
    ``jnp.take``, penzai's lookup on the transposed table): the gather of ``A``'s rows, one product
    with ``s·B``, laid out like the gather's output."""
    v, idx = invals
    if not is_lora(v) or is_lora(idx):
        return None
    w = v.squeeze_units()
    axes = _lookup_axes(eqn, w)
    out_nd = len(eqn.outvars[0].aval.shape)
    dn = eqn.params["dimension_numbers"]
    n_batch = out_nd - len(dn.offset_dims)
    if axes is None or n_batch == 0:
        return None
    picked, kept = axes
    base = bind(eqn, [v.w0, idx])[0]
    ins = [c for j in picked for c in w.view[j]]
    a_view = w.a.transpose(ins + [w.a.ndim - 1]).reshape([w.shape[j] for j in picked] + [w.rank])
    k = tuple(range(len(picked)))
    d = dn._replace(offset_dims=(n_batch,), collapsed_slice_dims=k, start_index_map=k)
    low = bind(eqn, [a_view, idx], dimension_numbers=d, slice_sizes=(1,) * len(picked) + (w.rank,))[0]  # A[ids]

    def like_out(t: jax.Array) -> jax.Array:  # (n_batch lead axes) + out canonical -> the gather's output layout
        order = [c - w.ni for j in kept for c in w.view[j]]
        t = t.transpose(list(range(n_batch)) + [n_batch + o for o in order])
        offs = [1 if j in picked else w.shape[j] for j in range(len(w.shape)) if j not in dn.collapsed_slice_dims]
        t = t.reshape(t.shape[:n_batch] + tuple(offs))
        lead, rest = iter(range(n_batch)), iter(range(n_batch, n_batch + len(offs)))
        return t.transpose([next(rest) if q in dn.offset_dims else next(lead) for q in range(out_nd)])

    y = like_out(jnp.tensordot(low, w.scaled_b(), axes=[[n_batch], [0]]))
    factor = None if w.factor is None else like_out(w.factor.reshape((1,) * n_batch + w.factor.shape))
    return [_finish(base, y, factor)]  # no dropout on lookups (PEFT)
