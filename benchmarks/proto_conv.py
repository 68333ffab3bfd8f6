"""Prototype of the conv rule proposed for ``jlora.lazy_rules._conv`` (issue 17, conv): form (e).

For a plain conv use of an adapted kernel (no dropout, no DoRA factor, ungrouped), one custom-VJP op:
forward ``y, low = split(conv(x, [W0 + A⊗Bs | A]))`` (one conv on cout + r output features), backward
``dX = conv_inputgrad(dY, W0 + A⊗Bs)``, ``dA = conv_filtergrad(x, dY·Bsᵀ)`` (r features),
``dBs = lowᵀ·dY``; W0 gets no cotangent. Every conv is the model's own equation re-bound, so strides,
padding, dilations and layouts carry over. ``conv_rule_e`` has the signature of jlora's rules;
``patched_conv()`` installs it in ``jlora.lazy._RULES`` while open (tracing must happen inside).
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

import jlora.lazy as JL
import jlora.lazy_rules as JR


def conv_rule_e(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    x, v = invals
    if JR._is_lora(x) or not JR._is_lora(v) or v.factor is not None or ctx.dropout_on:
        return JR._conv(eqn, invals, ctx)
    p = eqn.params
    dn = p["dimension_numbers"]
    nd = len(v.shape)
    if (v.n_stack, v.n_in) != (0, nd - 1) or dn.rhs_spec[0] != nd - 1 or p["feature_group_count"] != 1 \
            or p["batch_group_count"] != 1:
        return JR._conv(eqn, invals, ctx)
    o_ax, feat = dn.rhs_spec[0], dn.out_spec[1]  # kernel output-feature axis; activation feature axis
    r, cout = v.rank, v.shape[o_ax]

    def conv(xx, ww):
        return JR._bind(eqn, [xx, ww], preferred_element_type=None)[0]

    def merged(w0, a, bs):  # W0 + A⊗Bs with A: in-axes + (r,), Bs: (r, cout), kernel out axis last
        d = jnp.tensordot(a.astype(jnp.float32), bs.astype(jnp.float32), axes=[[a.ndim - 1], [0]])
        return (w0.astype(jnp.float32) + d).astype(w0.dtype)

    def fwd(xx, w0, a, bs):
        wm = merged(w0, a, bs)
        yl = conv(xx, jnp.concatenate([wm, a.astype(wm.dtype)], axis=o_ax))
        y = lax.slice_in_dim(yl, 0, cout, axis=feat)
        low = lax.slice_in_dim(yl, cout, cout + r, axis=feat)
        return y, (xx, w0, a, bs, low)

    def bwd(res, dy):
        xx, w0, a, bs, low = res
        dlow = jnp.moveaxis(jnp.tensordot(dy, bs.T.astype(dy.dtype), axes=[[feat], [0]]), -1, feat)
        _, vx = jax.vjp(lambda z: conv(z, merged(w0, a, bs)), xx)
        _, va = jax.vjp(lambda z: conv(xx, z), a.astype(xx.dtype))
        axes = [i for i in range(dy.ndim) if i != feat]
        dbs = jnp.tensordot(low, dy, axes=[axes, axes])
        return vx(dy)[0], None, va(dlow)[0].astype(a.dtype), dbs.astype(bs.dtype)

    @jax.custom_vjp
    def op(xx, w0, a, bs):
        return fwd(xx, w0, a, bs)[0]

    op.defvjp(fwd, bwd)
    return [op(x, v.w0, v.a, v.scaled_b())]


@contextlib.contextmanager
def patched_conv():
    orig = JL._RULES["conv_general_dilated"]
    JL._RULES["conv_general_dilated"] = conv_rule_e
    try:
        yield
    finally:
        JL._RULES["conv_general_dilated"] = orig
