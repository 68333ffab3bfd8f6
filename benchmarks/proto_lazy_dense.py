"""Prototype of the lazy dense op proposed for ``jlora.trace._rules`` (issue 17), on the abstract Llama.

``lora_dense(x, w0s, a_cat, bss)``: k kernels ``W0_i`` reading one input ``x`` (T, in), with their
factors ``A_cat = [A_1|...|A_k]`` (in, sum r) and ``Bs_i = s·B_i`` (r, out_i). One custom VJP covers
the base product *and* the low-rank branch, so:

- the residuals are exactly ``x`` and ``low = x·A_cat`` (T, sum r): nothing else is saved for the
  backward pass (the base product needs no residual, W0 gets no cotangent);
- ``dX = dY_1·W0_1ᵀ + ... + dlow·A_catᵀ`` is accumulated inside the rule, one (T, in) buffer;
- ``dA_catᵀ = dlowᵀ·x`` and ``dBs_i = lowᵀ·dY_i`` are (r, T)·(T, n) products (XLA:CPU's row-major
  fast form), the r-wide transposes made real behind one ``optimization_barrier`` on tiny arrays only.

``proto_variant`` builds a train step of the Llama of ``llama_shapes`` with this op on q/k/v (one
shared A), o, gate/up (one shared A) and down, in jlora's lora-tree layout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from benchmarks import llama_shapes as L


@jax.custom_vjp
def lora_dense(x: jax.Array, w0s: tuple, a_cat: jax.Array, bss: tuple) -> tuple:
    """k LoRA dense maps sharing one input x (T, in); returns k arrays (T, out_i)."""
    return _fwd(x, w0s, a_cat, bss)[0]


def _fwd(x, w0s, a_cat, bss):
    low = x @ a_cat
    ys, start = [], 0
    for w, bs in zip(w0s, bss):
        r = bs.shape[0]
        if MODE.startswith("catk"):  # one dot [x | low]·[W0 ; Bs]: no separate add for XLA to re-fuse
            ys.append(jnp.concatenate([x, low[:, start:start + r]], 1) @ jnp.concatenate([w, bs], 0))
        else:
            ys.append(x @ w + low[:, start:start + r] @ bs)
        start += r
    return tuple(ys), (x, w0s, a_cat, bss, low)


def _bwd(res, dys):
    x, w0s, a_cat, bss, low = res
    dlow = jnp.concatenate([dy @ bs.T for dy, bs in zip(dys, bss)], axis=1) if len(bss) > 1 else dys[0] @ bss[0].T
    dx = dlow @ a_cat.T
    for dy, w in zip(dys, w0s):
        dx = dx + dy @ w.T
    dlow_t, low_t = jax.lax.optimization_barrier((dlow.T, low.T))  # (sum r, T): made real, tiny
    da_t = dlow_t @ x
    dbss, start = [], 0
    for dy, bs in zip(dys, bss):
        r = bs.shape[0]
        dbss.append(low_t[start:start + r] @ dy)
        start += r
    da_t, dbss = jax.lax.optimization_barrier((da_t, tuple(dbss)))
    return dx, None, da_t.T, dbss


lora_dense.defvjp(_fwd, _bwd)


def _rms(x: jax.Array, w: jax.Array, eps: float = 1e-5) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


@jax.custom_vjp
def low_only(x: jax.Array, a_cat: jax.Array, bss: tuple) -> tuple:
    """The low-rank branch alone (jlora's ``low_rank_2d`` today): the base product stays outside."""
    return _low_fwd(x, a_cat, bss)[0]


def _low_fwd(x, a_cat, bss):
    low = x @ a_cat
    ys, start = [], 0
    for bs in bss:
        ys.append(low[:, start:start + bs.shape[0]] @ bs)
        start += bs.shape[0]
    return tuple(ys), (x, a_cat, bss, low)


def _low_bwd(res, dys):
    x, a_cat, bss, low = res
    dx, _, da, dbss = _bwd((x, (), a_cat, bss, low), dys)
    return dx, da, dbss


low_only.defvjp(_low_fwd, _low_bwd)

# how the base product x·W0 is formed (a switch for the experiment in scale.py --proto-mode):
#   "inside": in the custom VJP with the low-rank branch (the proposal); "inside3d": the same, the model's
#             elementwise ops after it on (batch, seq, ffn) arrays, as in a Linen model;
#   "outside2d": by autodiff on the flattened (T, in) input, added to the low-rank output in 2-D;
#   "outside3d": by autodiff on the (batch, seq, in) input, the low-rank output reshaped and added in 3-D
#                (what jlora.trace._rules._dot_general does today);
#   "catk3d": one dot [x | low]·[W0 ; Bs] (no separate add), 3-D elementwise ops after it (worse: the
#             concatenated kernels are kept)
MODE = "inside"


def _group(p: dict, lp: dict, names: tuple[str, ...], x: jax.Array, scale: float, shape3: tuple) -> tuple:
    w0s = tuple(p[n]["kernel"] for n in names)
    a_cat = jnp.concatenate([lp[n]["kernel"]["A"] for n in names], axis=1)
    bss = tuple(scale * lp[n]["kernel"]["B"] for n in names)
    if MODE.startswith(("inside", "catk")):
        return lora_dense(x, w0s, a_cat, bss)
    lows = low_only(x, a_cat, bss)
    if MODE == "outside2d":
        return tuple(x @ w + low for w, low in zip(w0s, lows))
    x3 = x.reshape(shape3 + (x.shape[-1],))
    return tuple((x3 @ w + low.reshape(shape3 + (-1,))).reshape(x.shape[0], -1) for w, low in zip(w0s, lows))


def proto_logits(frozen: dict, lora: dict, tokens: jax.Array, cfg: L.LlamaConfig, scale: float) -> jax.Array:
    """The Llama of ``llama_shapes`` with LoRA on all seven projections, tokens flattened to (T, d)."""
    p, lp = frozen["params"], lora["params"]
    b, s = tokens.shape
    d = cfg.d_model
    h = jnp.take(p["embed"]["embedding"], tokens, axis=0).reshape(b * s, d)
    for i in range(cfg.layers):
        pl, ll = p[f"layers_{i}"], lp[f"layers_{i}"]
        x = _rms(h, pl["ln1"]["scale"])
        q, k, v = _group(pl, ll, ("attn_q", "attn_k", "attn_v"), x, scale, (b, s))
        att = L.attention(q.reshape(b, s, -1), k.reshape(b, s, -1), v.reshape(b, s, -1), cfg).reshape(b * s, d)
        (o,) = _group(pl, ll, ("attn_o",), att, scale, (b, s))
        h = h + o
        x = _rms(h, pl["ln2"]["scale"])
        g, u = _group(pl, ll, ("mlp_gate", "mlp_up"), x, scale, (b, s))
        if MODE.endswith("3d"):  # the model's elementwise ops on (batch, seq, ffn), as the Linen model does
            hid = (jax.nn.silu(g.reshape(b, s, -1)) * u.reshape(b, s, -1)).reshape(b * s, -1)
        else:
            hid = jax.nn.silu(g) * u
        (dn,) = _group(pl, ll, ("mlp_down",), hid, scale, (b, s))
        h = h + dn
    h = _rms(h, p["norm"]["scale"])
    if cfg.tied:
        return h @ p["embed"]["embedding"].T
    return h @ p["lm_head"]["kernel"]


def proto_variant(cfg: L.LlamaConfig, params: Any, rank: int, scale: float, lr: float) -> tuple:
    """(loss_fn, trainable, frozen, tx) for ``scale.compile_step``; the lora tree as jlora lays it out."""
    lora = {"params": {}}
    for i in range(cfg.layers):
        lay = params["params"][f"layers_{i}"]
        lora["params"][f"layers_{i}"] = {
            n: {"kernel": {"A": jax.ShapeDtypeStruct((lay[n]["kernel"].shape[0], rank), jnp.float32),
                           "B": jax.ShapeDtypeStruct((rank, lay[n]["kernel"].shape[1]), jnp.float32)}}
            for n in L.TARGETS}

    def loss(t, f, bt):
        return L.lm_loss(proto_logits(f, t, bt[0], cfg, scale), bt[1])

    return loss, lora, params, optax.adamw(lr)
