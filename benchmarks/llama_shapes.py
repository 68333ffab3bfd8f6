"""A compact Flax Linen Llama for abstract-shape benchmarks (Llama-2-7B and SmolLM2-135M shapes).

RMSNorm, rotary embeddings, grouped-query causal attention, SwiGLU MLP, no biases; the adapted
projections are ``attn_q, attn_k, attn_v, attn_o, mlp_gate, mlp_up, mlp_down``, paths like
``params/layers_0/attn_q/kernel``. ``dense`` is a hook: the factory of every projection (default
``nn.Dense(use_bias=False)``), so a prototype LoRA layer can replace it without another model.
``embed_offset`` (a ``(d,)`` vector added to the input embeddings) is the probe's only trainable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab: int = 32000
    d_model: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    ffn: int = 11008
    seq: int = 512
    batch: int = 1
    tied: bool = False
    rope_theta: float = 10000.0

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


LLAMA2_7B = LlamaConfig()
SMOLLM2_135M = LlamaConfig(vocab=49152, d_model=576, layers=30, heads=9, kv_heads=3, ffn=1536, seq=512,
                           batch=1, tied=True, rope_theta=100000.0)


def default_dense(features: int, name: str) -> nn.Module:
    return nn.Dense(features, use_bias=False, name=name)


class RMSNorm(nn.Module):
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * w


def rope(x: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding on (batch, seq, heads, head_dim), half-split (Llama/HF) layout."""
    s, hd = x.shape[1], x.shape[-1]
    inv = 1.0 / theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    ang = jnp.arange(s, dtype=jnp.float32)[:, None] * inv[None, :]  # (s, hd/2)
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """Causal GQA. q: (b, s, H·hd), k/v: (b, s, Hkv·hd) -> (b, s, H·hd)."""
    b, s, _ = q.shape
    hd, h, hk = cfg.head_dim, cfg.heads, cfg.kv_heads
    q = rope(q.reshape(b, s, h, hd), cfg.rope_theta)
    k = rope(k.reshape(b, s, hk, hd), cfg.rope_theta)
    v = v.reshape(b, s, hk, hd)
    q = q.reshape(b, s, hk, h // hk, hd)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / math.sqrt(hd)
    mask = jnp.tril(jnp.ones((s, s), dtype=bool))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    w = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bkgqs,bskd->bqkgd", w, v).reshape(b, s, h * hd)


class Layer(nn.Module):
    cfg: LlamaConfig
    dense: Callable[[int, str], nn.Module] = default_dense

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.cfg
        kvd = cfg.kv_heads * cfg.head_dim
        x = RMSNorm(name="ln1")(h)
        q = self.dense(cfg.d_model, "attn_q")(x)
        k = self.dense(kvd, "attn_k")(x)
        v = self.dense(kvd, "attn_v")(x)
        h = h + self.dense(cfg.d_model, "attn_o")(attention(q, k, v, cfg))
        x = RMSNorm(name="ln2")(h)
        g = self.dense(cfg.ffn, "mlp_gate")(x)
        u = self.dense(cfg.ffn, "mlp_up")(x)
        return h + self.dense(cfg.d_model, "mlp_down")(jax.nn.silu(g) * u)


class Llama(nn.Module):
    """Llama decoder; projections named ``attn_q``.. ``mlp_down`` (paths ``params/layers_i/attn_q/kernel``)."""

    cfg: LlamaConfig
    dense: Callable[[int, str], nn.Module] = default_dense

    @nn.compact
    def __call__(self, tokens: jax.Array, embed_offset: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        embed = nn.Embed(cfg.vocab, cfg.d_model, name="embed")
        h = embed(tokens)
        if embed_offset is not None:  # the probe differentiates only this
            h = h + embed_offset
        for i in range(cfg.layers):
            h = Layer(cfg, self.dense, name=f"layers_{i}")(h)
        h = RMSNorm(name="norm")(h)
        if cfg.tied:
            return embed.attend(h)
        return nn.Dense(cfg.vocab, use_bias=False, name="lm_head")(h)


TARGETS = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down")
TARGET_REGEX = r".*/(attn_q|attn_k|attn_v|attn_o|mlp_gate|mlp_up|mlp_down)/kernel"


def lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.reshape(-1, logits.shape[-1]),
                                                           labels.reshape(-1)).mean()


def abstract_batch(cfg: LlamaConfig) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    s = jax.ShapeDtypeStruct((cfg.batch, cfg.seq), jnp.int32)
    return s, s


def abstract_params(model: nn.Module, cfg: LlamaConfig) -> Any:
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), abstract_batch(cfg)[0])


def adapted_input_floats(cfg: LlamaConfig, rank: int) -> dict[str, int]:
    """Floats lazy LoRA must keep for dA/dB that a no-weight-gradient probe need not.

    dA of a kernel needs its input x (q/k/v share the normed x, gate/up share the second normed x, o
    reads the attention output, down reads silu(g)·u): per layer tokens·(d + d + d + ffn). dB needs
    low = x·A (tokens·r per kernel, 7 kernels).
    """
    t = cfg.tokens
    x = cfg.layers * t * (3 * cfg.d_model + cfg.ffn)
    low = cfg.layers * t * 7 * rank
    return dict(inputs=x, low=low, total=x + low)
