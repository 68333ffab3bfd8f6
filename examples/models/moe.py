"""A small mixture-of-experts decoder in plain JAX (pure functions over a parameter dict).

Each layer: RMSNorm, single-head causal attention (``q``/``k``/``v``/``o`` kernels ``(in, out)``),
RMSNorm, a top-k routed MoE FFN. The expert kernels ``w_in`` and ``w_out`` hold all E experts in
one array, stored ``(E, in, out)`` or, like PyTorch / transformers, ``(E, out, in)``
(``transposed=True``). The MoE FFN runs in one of three forms, all computing the same function:

- ``'ragged'``: routed slots sorted by expert, ``jax.lax.ragged_dot`` with group sizes
  (MaxText / megablox style; the default);
- ``'dense'``: dense dispatch: an einsum with the expert axis as a batch axis over every token,
  then a combine with the routing weights (tunix's CPU path, GShard-style);
- ``'indexed'``: a loop over experts picking ``W[e]`` (the plain reference form).

>>> import jax, jax.numpy as jnp
>>> cfg = MoEConfig(vocab=16, d=8, hidden=8, experts=4, top_k=2, layers=1)
>>> params = init_params(jax.random.key(0), cfg)
>>> apply(params, jnp.zeros((2, 5), jnp.int32), cfg).shape
(2, 5, 16)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from examples.models.moe_routing import group_tokens

FORMS = ("ragged", "dense", "indexed")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Static sizes of the decoder (hashable: a static jit argument)."""

    vocab: int = 64
    d: int = 32
    hidden: int = 32
    experts: int = 8
    top_k: int = 2
    layers: int = 2
    form: str = "ragged"
    transposed: bool = False

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"MoEConfig.form must be one of {FORMS}, got {self.form!r}")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"MoEConfig.top_k must be in [1, experts={self.experts}], got {self.top_k}")


def init_params(key: jax.Array, cfg: MoEConfig) -> dict[str, Any]:
    """Random weights: ``params/layer_i/{attn/{q,k,v,o},moe/{router,w_in,w_out}}``, ``embed``, ``head``."""
    keys = iter(jax.random.split(key, 4 + 8 * cfg.layers))
    normal = lambda shape, fan_in: jax.random.normal(next(keys), shape) / jnp.sqrt(fan_in)  # noqa: E731
    e, d, h = cfg.experts, cfg.d, cfg.hidden
    p: dict[str, Any] = {"embed": jax.random.normal(next(keys), (cfg.vocab, d)), "head": normal((d, cfg.vocab), d)}
    for i in range(cfg.layers):
        w_in, w_out = normal((e, d, h), d), normal((e, h, d), h)
        if cfg.transposed:
            w_in, w_out = jnp.swapaxes(w_in, 1, 2), jnp.swapaxes(w_out, 1, 2)
        p[f"layer_{i}"] = {
            "attn": {n: normal((d, d), d) for n in ("q", "k", "v", "o")},
            "moe": {"router": normal((d, e), d), "w_in": w_in, "w_out": w_out},
        }
    return {"params": p}


def route(x: jax.Array, router: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k routing of tokens ``x`` (T, D): expert ids (T, k) and softmax weights over the k (T, k)."""
    logits = x @ router
    top, ids = lax.top_k(logits, k)
    return ids, jax.nn.softmax(top, axis=-1)


def _expert_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array, transposed: bool) -> jax.Array:
    """``ragged_dot`` of slots sorted by expert with an expert kernel stored (E, in, out) or (E, out, in)."""
    if not transposed:
        return lax.ragged_dot(x, w, sizes)
    dims = lax.RaggedDotDimensionNumbers((((1,), (2,)), ((), ())), (0,), (0,))
    return lax.ragged_dot_general(x, w, sizes, dims)


def moe_ffn(p: dict[str, Any], x: jax.Array, cfg: MoEConfig) -> jax.Array:
    """The routed FFN ``sum_k w_k * W_out[e_k]·gelu(W_in[e_k]·x)`` of tokens ``x`` (T, D) in ``cfg.form``."""
    ids, weights = route(x, p["router"], cfg.top_k)
    t, e = x.shape[0], cfg.experts
    w_in, w_out = p["w_in"], p["w_out"]
    if cfg.form == "ragged":
        order, sizes = group_tokens(ids.reshape(-1), e)
        xs = x[order // cfg.top_k]  # slot s belongs to token s // k
        h = jax.nn.gelu(_expert_matmul(xs, w_in, sizes, cfg.transposed))
        ys = _expert_matmul(h, w_out, sizes, cfg.transposed)
        ys = ys[jnp.argsort(order)].reshape(t, cfg.top_k, -1)
        return jnp.einsum("tkd,tk->td", ys, weights)
    combine = jnp.einsum("tke,tk->te", jax.nn.one_hot(ids, e, dtype=x.dtype), weights)  # (T, E)
    if cfg.form == "dense":
        w_in_ = jnp.swapaxes(w_in, 1, 2) if cfg.transposed else w_in
        w_out_ = jnp.swapaxes(w_out, 1, 2) if cfg.transposed else w_out
        xe = jnp.einsum("te,td->etd", (combine > 0).astype(x.dtype), x)  # dispatch
        h = jax.nn.gelu(jnp.einsum("etd,edh->eth", xe, w_in_))
        ye = jnp.einsum("eth,ehd->etd", h, w_out_)
        return jnp.einsum("etd,te->td", ye, combine)
    out = jnp.zeros_like(x)
    for i in range(e):
        wi = w_in[i].T if cfg.transposed else w_in[i]
        wo = w_out[i].T if cfg.transposed else w_out[i]
        out = out + combine[:, i : i + 1] * (jax.nn.gelu(x @ wi) @ wo)
    return out


def _rms(x: jax.Array) -> jax.Array:
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _attention(p: dict[str, Any], x: jax.Array) -> jax.Array:
    q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
    s = jnp.einsum("btd,bsd->bts", q, k) / jnp.sqrt(q.shape[-1]).astype(x.dtype)
    mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    s = jax.nn.softmax(jnp.where(mask, s, -1e9), axis=-1)
    return jnp.einsum("bts,bsd->btd", s, v) @ p["o"]


def apply(params: dict[str, Any], tokens: jax.Array, cfg: MoEConfig) -> jax.Array:
    """Logits ``(B, T, vocab)`` of int tokens ``(B, T)``."""
    p = params["params"]
    x = p["embed"][tokens]
    b, t, d = x.shape
    for i in range(cfg.layers):
        layer = p[f"layer_{i}"]
        x = x + _attention(layer["attn"], _rms(x))
        x = x + moe_ffn(layer["moe"], _rms(x).reshape(b * t, d), cfg).reshape(b, t, d)
    return _rms(x) @ p["head"]


EXPERT_TARGETS = r"params/layer_\d+/moe/(w_in|w_out)"
ALL_TARGETS = r"params/layer_\d+/(moe/(w_in|w_out)|attn/(q|k|v|o))"
