"""Benchmark workloads: a GPT-style decoder and a small conv net, in Flax Linen (and the decoder in NNX).

The Linen models build every adapted layer through one hook, so the same module code gives the
plain model (``nn.Dense`` / ``nn.Conv``) and the hand-written naive lazy LoRA variant
(``x @ W0 + b + s * (x @ A) @ B``). Parameter paths look like ``params/block_0/attn/q/kernel``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab: int = 8192
    d_model: int = 512
    layers: int = 4
    heads: int = 8
    mlp: int = 2048
    seq: int = 128
    batch: int = 8

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclasses.dataclass(frozen=True)
class ConvConfig:
    channels: tuple[int, ...] = (32, 64, 128, 256)
    image: int = 32
    batch: int = 32
    classes: int = 10


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


GPT_TARGETS = ("q", "k", "v", "o", "fc1", "fc2")
GPT_TARGET_REGEX = r".*/(q|k|v|o|fc1|fc2)/kernel"
CONV_TARGET_REGEX = r".*/conv_\d+/kernel"


# --------------------------------------------------------------------------------------------
# Shared maths


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Multi-head causal softmax attention. q, k, v: (batch, seq, d) -> (batch, seq, d)."""
    b, s, d = q.shape
    hd = d // heads
    q, k, v = (t.reshape(b, s, heads, hd) for t in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    mask = jnp.tril(jnp.ones((s, s), dtype=bool))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    w = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, s, d)


def lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# --------------------------------------------------------------------------------------------
# Linen modules


class NaiveLoRADense(nn.Module):
    """Hand-written lazy LoRA Dense: ``x @ W0 + b + s * (x @ A) @ B`` on the raw (3-D) activations."""

    features: int
    rank: int
    scale: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (d_in, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        a = self.param("lora_a", nn.initializers.he_uniform(), (d_in, self.rank))
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
        return x @ kernel + bias + self.scale * ((x @ a) @ b)


class NaiveLoRAConv(nn.Module):
    """Hand-written lazy conv LoRA: ``conv(x, W0) + b + s * conv(x, A) @ B`` (A: a conv to r channels)."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int]
    rank: int
    scale: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel_size, cin, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        a = self.param("lora_a", nn.initializers.he_uniform(), (*self.kernel_size, cin, self.rank))
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
        conv = lambda w: jax.lax.conv_general_dilated(  # noqa: E731
            x, w, self.strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return conv(kernel) + bias + self.scale * (conv(a) @ b)


def _dense(features: int, name: str, lora: LoraSpec | None) -> nn.Module:
    if lora is None:
        return nn.Dense(features, name=name)
    return NaiveLoRADense(features, lora.rank, lora.scale, name=name)


class Attention(nn.Module):
    cfg: GPTConfig
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.cfg.d_model
        q, k, v = (_dense(d, n, self.lora)(x) for n in ("q", "k", "v"))
        return _dense(d, "o", self.lora)(causal_attention(q, k, v, self.cfg.heads))


class MLP(nn.Module):
    cfg: GPTConfig
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.gelu(_dense(self.cfg.mlp, "fc1", self.lora)(x))
        return _dense(self.cfg.d_model, "fc2", self.lora)(h)


class Block(nn.Module):
    cfg: GPTConfig
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(self.cfg, self.lora, name="attn")(nn.LayerNorm(name="ln1")(x))
        return x + MLP(self.cfg, self.lora, name="mlp")(nn.LayerNorm(name="ln2")(x))


class GPT(nn.Module):
    """Pre-LN GPT decoder: token + learned position embeddings, causal attention, untied LM head."""

    cfg: GPTConfig
    lora: LoraSpec | None = None  # None: nn.Dense everywhere; else NaiveLoRADense on q,k,v,o,fc1,fc2

    @nn.compact
    def __call__(self, tokens: jax.Array, embed_offset: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        h = nn.Embed(cfg.vocab, cfg.d_model, name="embed")(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (cfg.seq, cfg.d_model))
        h = h + pos[: tokens.shape[1]]
        if embed_offset is not None:  # the probe step differentiates only this
            h = h + embed_offset
        for i in range(cfg.layers):
            h = Block(cfg, self.lora, name=f"block_{i}")(h)
        return nn.Dense(cfg.vocab, name="head")(nn.LayerNorm(name="ln_f")(h))


class ConvNet(nn.Module):
    """Small conv net: 3x3 convs (stride 1 then 2), ReLU, global mean pool, dense head."""

    cfg: ConvConfig
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array, embed_offset: jax.Array | None = None) -> jax.Array:
        if embed_offset is not None:
            x = x + embed_offset
        for i, c in enumerate(self.cfg.channels):
            strides = (1, 1) if i == 0 else (2, 2)
            if self.lora is None:
                x = nn.Conv(c, (3, 3), strides, name=f"conv_{i}")(x)
            else:
                x = NaiveLoRAConv(c, (3, 3), strides, self.lora.rank, self.lora.scale, name=f"conv_{i}")(x)
            x = nn.relu(x)
        return nn.Dense(self.cfg.classes, name="head")(x.mean(axis=(1, 2)))


# --------------------------------------------------------------------------------------------
# NNX mirror of the decoder, with nnx.LoRALinear on the targets (weights copied from Linen params)


class NNXBlock(nnx.Module):
    def __init__(self, cfg: GPTConfig, rank: int, rngs: nnx.Rngs):
        d = cfg.d_model
        lin = lambda i, o: nnx.LoRALinear(i, o, lora_rank=rank, rngs=rngs)  # noqa: E731
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.q, self.k, self.v, self.o = (lin(d, d) for _ in range(4))
        self.fc1 = lin(d, cfg.mlp)
        self.fc2 = lin(cfg.mlp, d)
        self.heads = cfg.heads

    def __call__(self, h: jax.Array) -> jax.Array:
        x = self.ln1(h)
        h = h + self.o(causal_attention(self.q(x), self.k(x), self.v(x), self.heads))
        return h + self.fc2(nn.gelu(self.fc1(self.ln2(h))))


class NNXGPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, rank: int, rngs: nnx.Rngs):
        self.layers = cfg.layers
        self.embed = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs)
        self.pos = nnx.Param(jnp.zeros((cfg.seq, cfg.d_model)))
        for i in range(cfg.layers):
            setattr(self, f"block_{i}", NNXBlock(cfg, rank, rngs))
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, cfg.vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
        for i in range(self.layers):
            h = getattr(self, f"block_{i}")(h)
        return self.head(self.ln_f(h))


def nnx_gpt_from_linen(cfg: GPTConfig, params: dict, factors: dict[str, tuple[Any, Any]],
                       lora: LoraSpec) -> NNXGPT:
    """Builds the NNX decoder holding the Linen weights; nnx.LoRA has no alpha/r, so B is stored as s*B."""
    model = NNXGPT(cfg, lora.rank, nnx.Rngs(0))
    p = params["params"]
    model.embed.embedding[...] = p["embed"]["embedding"]
    model.pos[...] = p["pos"]
    for i in range(cfg.layers):
        blk, src = getattr(model, f"block_{i}"), p[f"block_{i}"]
        for ln in ("ln1", "ln2"):
            getattr(blk, ln).scale[...] = src[ln]["scale"]
            getattr(blk, ln).bias[...] = src[ln]["bias"]
        for n in GPT_TARGETS:
            group = "attn" if n in ("q", "k", "v", "o") else "mlp"
            layer = getattr(blk, n)
            layer.kernel[...] = src[group][n]["kernel"]
            layer.bias[...] = src[group][n]["bias"]
            a, b = factors[f"params/block_{i}/{group}/{n}/kernel"]
            layer.lora.lora_a[...] = a
            layer.lora.lora_b[...] = lora.scale * b
    model.ln_f.scale[...] = p["ln_f"]["scale"]
    model.ln_f.bias[...] = p["ln_f"]["bias"]
    model.head.kernel[...] = p["head"]["kernel"]
    model.head.bias[...] = p["head"]["bias"]
    return model


# --------------------------------------------------------------------------------------------
# Data and factors


def gpt_batch(cfg: GPTConfig, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab, (cfg.batch, cfg.seq + 1), dtype=np.int32)
    return jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])


def conv_batch(cfg: ConvConfig, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((cfg.batch, cfg.image, cfg.image, 3), dtype=np.float32)
    y = rng.integers(0, cfg.classes, (cfg.batch,), dtype=np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def make_factors(key: jax.Array, flat_params: dict[str, jax.Array], regex: str,
                 rank: int) -> dict[str, tuple[jax.Array, jax.Array]]:
    """A (kaiming-uniform) and a NON-ZERO B (normal 0.1) per target kernel, so the loss check means something.

    Dense kernel (in, out): A (in, r), B (r, out). Conv kernel (kh, kw, cin, cout): A (kh, kw, cin, r), B (r, cout).
    """
    import re

    out = {}
    for path, w in flat_params.items():
        if not re.fullmatch(regex, path):
            continue
        key, ka, kb = jax.random.split(key, 3)
        fan_in = math.prod(w.shape[:-1])
        bound = math.sqrt(6.0 / fan_in)
        a = jax.random.uniform(ka, (*w.shape[:-1], rank), jnp.float32, -bound, bound)
        b = 0.1 * jax.random.normal(kb, (rank, w.shape[-1]), jnp.float32)
        out[path] = (a, b)
    return out


def factor_delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    return scale * jnp.tensordot(a, b, axes=1)
