"""Hand-written *fast* lazy LoRA for the GPT decoder: the reference of what is reachable on XLA CPU.

The formulation that reaches the no-weight-gradient floor in /work/shared/ANCHORS.md:

1. tokens flattened to 2-D (T = batch * seq rows), so every token contraction is a plain matmul;
2. a custom VJP with the scale folded into B (``Bs = s * B``; W0 and its bias get no cotangent);
3. every token-contracting product written row-major as (r, T) x (T, n): ``dA^T = dlow^T x`` and
   ``dBs = low^T dY``, the thin r-wide transposes made real behind an optimisation barrier;
4. one ``x [A_q | A_k | A_v]`` for kernels that read the same input (forward and backward).

Per kernel, x: (T, in): forward ``low = x A``, ``y = x W0 + b + low Bs``; backward ``dlow = dY Bs^T``,
``dX = dY W0^T + dlow A^T``, ``dA^T = dlow^T x``, ``dBs = low^T dY``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.workloads import GPTConfig, causal_attention


@jax.custom_vjp
def lora_multi(x: jax.Array, w0s: tuple, biases: tuple, a_cat: jax.Array, bss: tuple) -> tuple:
    """k LoRA dense maps sharing one input. x: (T, in); w0s[i]: (in, out_i); a_cat: (in, k*r); bss[i]: (r, out_i)."""
    return _forward(x, w0s, biases, a_cat, bss)[0]


def _forward(x, w0s, biases, a_cat, bss):
    low = x @ a_cat
    r = bss[0].shape[0]
    ys = tuple(x @ w + b + low[:, i * r:(i + 1) * r] @ bs for i, (w, b, bs) in enumerate(zip(w0s, biases, bss)))
    return ys, low


def _fwd(x, w0s, biases, a_cat, bss):
    ys, low = _forward(x, w0s, biases, a_cat, bss)
    return ys, (x, w0s, a_cat, bss, low)


def _bwd(res, dys):
    x, w0s, a_cat, bss, low = res
    r = bss[0].shape[0]
    dlow = jnp.concatenate([dy @ bs.T for dy, bs in zip(dys, bss)], axis=1)  # (T, k*r)
    dx = dlow @ a_cat.T
    for dy, w in zip(dys, w0s):
        dx = dx + dy @ w.T
    dlow_t, low_t = jax.lax.optimization_barrier((dlow.T, low.T))  # (k*r, T) each, made real
    da_cat_t = dlow_t @ x  # (k*r, T) x (T, in)
    dbss = tuple(low_t[i * r:(i + 1) * r] @ dy for i, dy in enumerate(dys))  # (r, T) x (T, out)
    # barrier on the results too: else XLA folds the transpose of the tiny (k*r, in) result into the
    # dot, giving dot(x, dlow^T) with x contracting its major (token) axis: the slow generic form
    da_cat_t, dbss = jax.lax.optimization_barrier((da_cat_t, dbss))
    return dx, None, None, da_cat_t.T, dbss


lora_multi.defvjp(_fwd, _bwd)


def _ln(params: dict, x: jax.Array) -> jax.Array:
    return nn.LayerNorm().apply({"params": params}, x)


def _group(block: dict, lora: dict, names: Sequence[str], x: jax.Array, scale: float):
    w0s = tuple(block[n]["kernel"] for n in names)
    biases = tuple(block[n]["bias"] for n in names)
    a_cat = jnp.concatenate([lora[n]["kernel"]["A"] for n in names], axis=1)
    bss = tuple(scale * lora[n]["kernel"]["B"] for n in names)
    return lora_multi(x, w0s, biases, a_cat, bss)


def fast_gpt_logits(frozen: dict, lora: dict, tokens: jax.Array, cfg: GPTConfig, scale: float) -> jax.Array:
    """Logits (batch*seq, vocab) of the Linen GPT with LoRA on q,k,v,o,fc1,fc2 (lora: jlora's tree layout)."""
    p, lp = frozen["params"], lora["params"]
    b, s = tokens.shape
    d = cfg.d_model
    h = jnp.take(p["embed"]["embedding"], tokens, axis=0) + p["pos"][:s]
    h = h.reshape(b * s, d)
    for i in range(cfg.layers):
        blk, lblk = p[f"block_{i}"], lp[f"block_{i}"]
        x = _ln(blk["ln1"], h)
        q, k, v = _group(blk["attn"], lblk["attn"], ("q", "k", "v"), x, scale)
        att = causal_attention(q.reshape(b, s, d), k.reshape(b, s, d), v.reshape(b, s, d), cfg.heads)
        (o,) = _group(blk["attn"], lblk["attn"], ("o",), att.reshape(b * s, d), scale)
        h = h + o
        (f1,) = _group(blk["mlp"], lblk["mlp"], ("fc1",), _ln(blk["ln2"], h), scale)
        (f2,) = _group(blk["mlp"], lblk["mlp"], ("fc2",), nn.gelu(f1), scale)
        h = h + f2
    x = _ln(p["ln_f"], h)
    return x @ p["head"]["kernel"] + p["head"]["bias"]
