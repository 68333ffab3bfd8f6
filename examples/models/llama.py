"""A Llama-style decoder in Flax Linen that loads ``transformers`` ``LlamaForCausalLM`` checkpoints.

RMSNorm, rotary position embeddings (HF's ``rotate_half`` convention: the two halves of each
head, not interleaved pairs), grouped-query attention, SwiGLU MLP, untied (or tied) LM head,
and an optional functional KV cache for decoding (:func:`init_cache`; ``examples/generate.py``).
Weights are read from ``model.safetensors`` (or a sharded ``model.safetensors.index.json``) with
``safetensors.numpy``; never ``torch.load``/pickle.

Parameter paths (what jlora targets match; :data:`jlora.peft.LLAMA_KEY_MAP` maps them to
the torch module names)::

    params/embed_tokens/embedding                                   (vocab, d)
    params/layers_{i}/attn/{q,k,v,o}_proj/{kernel,bias}             (d, heads*hd) ... (heads*hd, d)
    params/layers_{i}/mlp/{gate,up,down}_proj/kernel                (d, ff), (ff, d)
    params/layers_{i}/{input,post_attention}_layernorm/scale        (d,)
    params/norm/scale, params/lm_head/kernel                        (d,), (d, vocab)

Kernels are in Flax ``(in, out)`` layout (``nn.Linear.weight`` transposed).

>>> model, params = load_llama("path/to/checkpoint")             # doctest: +SKIP
>>> model.apply(params, jnp.array([[1, 2, 3]])).shape            # doctest: +SKIP
(1, 3, 32000)
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora import paths
from jlora.peft import LLAMA_KEY_MAP, module_name


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of a transformers ``LlamaConfig`` that the forward pass uses.

    >>> LlamaConfig(hidden_size=64, num_attention_heads=4).head_size
    16
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    @property
    def head_size(self) -> int:
        """The per-head dimension (``head_dim``, or ``hidden_size // num_attention_heads``)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads (grouped-query attention)."""
        return self.num_key_value_heads or self.num_attention_heads

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        """Reads a transformers ``config.json``; refuses settings this port does not implement.

        >>> import json, tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "config.json"
        >>> _ = p.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}))
        >>> LlamaConfig.from_json(p).hidden_size
        64
        """
        raw = json.loads(Path(path).read_text())
        if raw.get("model_type", "llama") != "llama":
            raise ValueError(f"{path}: model_type {raw['model_type']!r} is not 'llama'")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (expected 'silu')")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{path}: rope_type {rope_type!r} is not supported (expected 'default')")
        fields = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw}
        theta = rope.get("rope_theta", raw.get("rope_theta"))
        if theta is not None:
            fields["rope_theta"] = float(theta)
        return cls(**fields)


def rotate_half(x: jax.Array) -> jax.Array:
    """HF's ``rotate_half``: ``concat(-x2, x1)`` of the two halves of the last axis.

    >>> rotate_half(jnp.array([1.0, 2.0, 3.0, 4.0])).tolist()
    [-3.0, -4.0, 1.0, 2.0]
    """
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles, shape ``positions.shape + (head_dim,)`` (float32).

    >>> c, s = rope_cos_sin(jnp.arange(3), 4, 10000.0); c.shape, float(c[0, 0])
    ((3, 4), 1.0)
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x**2) + eps) * scale``, computed in float32 (HF ``LlamaRMSNorm``)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., d) -> (..., d)."""
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return scale * h.astype(x.dtype)


def init_cache(config: LlamaConfig, batch: int, length: int, dtype: Any = jnp.float32) -> list[dict[str, jax.Array]]:
    """An empty KV cache: per layer ``{"k", "v"}`` of shape (batch, length, kv_heads, head_size).

    Batch is axis 0 of every leaf (so :func:`jlora.multi.mixed_apply` can vmap over it).

    >>> c = init_cache(LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=3), 2, 5)
    >>> len(c), c[0]["k"].shape
    (3, (2, 5, 2, 4))
    """
    shape = (batch, length, config.kv_heads, config.head_size)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_hidden_layers)]


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary embeddings (and an optional KV cache)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 cache: dict[str, jax.Array] | None = None, cache_index: jax.Array | int = 0):
        """x: (batch, seq, d); cos/sin: (batch or 1, seq, hd); mask: (batch, 1, seq, keys) bool -> (batch, seq, d).

        With ``cache`` (``{"k", "v"}``, (batch, keys, kv_heads, hd)) the new keys/values are written at
        slots ``cache_index ...`` and attention runs over all ``keys`` slots; returns ``(out, cache)``.
        """
        c = self.config
        heads, kv, hd = c.num_attention_heads, c.kv_heads, c.head_size
        b, t, _ = x.shape
        q = nn.Dense(heads * hd, use_bias=c.attention_bias, name="q_proj")(x).reshape(b, t, heads, hd)
        k = nn.Dense(kv * hd, use_bias=c.attention_bias, name="k_proj")(x).reshape(b, t, kv, hd)
        v = nn.Dense(kv * hd, use_bias=c.attention_bias, name="v_proj")(x).reshape(b, t, kv, hd)
        cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            start = (0, cache_index, 0, 0)
            cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
                     "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)}
            k, v = cache["k"].astype(x.dtype), cache["v"].astype(x.dtype)
        rep = heads // kv  # query head h reads key/value head h // rep (HF repeat_kv)
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, heads * hd)
        out = nn.Dense(c.hidden_size, use_bias=c.attention_bias, name="o_proj")(out)
        return out if cache is None else (out, cache)


class Mlp(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., d) -> (..., d)."""
        c = self.config
        gate = nn.Dense(c.intermediate_size, use_bias=c.mlp_bias, name="gate_proj")(x)
        up = nn.Dense(c.intermediate_size, use_bias=c.mlp_bias, name="up_proj")(x)
        return nn.Dense(c.hidden_size, use_bias=c.mlp_bias, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 cache: dict[str, jax.Array] | None = None, cache_index: jax.Array | int = 0):
        """x: (batch, seq, d) -> (batch, seq, d) (and the updated cache when one is given)."""
        eps = self.config.rms_norm_eps
        h = Attention(self.config, name="attn")(RMSNorm(eps, name="input_layernorm")(x), cos, sin, mask,
                                                cache, cache_index)
        h, cache = (h, None) if cache is None else h
        x = x + h
        x = x + Mlp(self.config, name="mlp")(RMSNorm(eps, name="post_attention_layernorm")(x))
        return x if cache is None else (x, cache)


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM: ``__call__(input_ids, attention_mask=None)`` -> logits (batch, seq, vocab).

    ``attention_mask`` (batch, keys), 1 for real tokens, masks padded keys (as transformers does).
    ``positions`` (batch, seq) are the rotary positions (default ``0..seq-1``; with left padding,
    ``cumsum(mask) - 1`` as transformers' ``generate`` uses).

    Decoding: pass ``cache`` (:func:`init_cache`, ``keys`` slots) and ``cache_index`` (the slot of
    ``input_ids[:, 0]``); then ``attention_mask`` covers all ``keys`` slots, a query at slot ``s``
    sees the slots ``<= s`` that the mask allows, and the call returns ``(logits, cache)``.

    ``logit_positions`` (batch, k) int: compute logits only at these sequence positions (batch, k, vocab);
    a training loss on a few answer tokens then skips most of the (large-vocabulary) LM head.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: list[dict[str, jax.Array]] | None = None,
                 cache_index: jax.Array | int = 0, logit_positions: jax.Array | None = None):
        c = self.config
        b, t = input_ids.shape
        embed = nn.Embed(c.vocab_size, c.hidden_size, name="embed_tokens")
        x = embed(input_ids)
        if positions is None:
            positions = (cache_index + jnp.arange(t))[None]
        cos, sin = rope_cos_sin(positions, c.head_size, c.rope_theta)
        keys = t if cache is None else cache[0]["k"].shape[1]
        query_slot = cache_index + jnp.arange(t)
        mask = (jnp.arange(keys)[None, :] <= query_slot[:, None])[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        new_cache = []
        for i in range(c.num_hidden_layers):
            layer = DecoderLayer(c, name=f"layers_{i}")
            if cache is None:
                x = layer(x, cos, sin, mask)
            else:
                x, layer_cache = layer(x, cos, sin, mask, cache[i], cache_index)
                new_cache.append(layer_cache)
        if logit_positions is not None:
            x = jnp.take_along_axis(x, logit_positions[..., None].astype(jnp.int32), axis=1)
        x = RMSNorm(c.rms_norm_eps, name="norm")(x)
        logits = embed.attend(x) if c.tie_word_embeddings else nn.Dense(c.vocab_size, use_bias=False,
                                                                         name="lm_head")(x)
        return logits if cache is None else (logits, new_cache)


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for name in files:
            out.update(load_file(str(directory / name)))
        return out
    if any((directory / n).is_file() for n in ("pytorch_model.bin", "model.bin")):
        raise ValueError(
            f"{directory} holds only a pickled PyTorch checkpoint; this port never unpickles. Fix: in PyTorch, "
            "load it and save_pretrained(directory, safe_serialization=True)"
        )
    raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def load_params(directory: str | Path, config: LlamaConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """Reads a ``LlamaForCausalLM`` safetensors checkpoint into this port's Flax parameter tree.

    Args:
      directory: the folder ``save_pretrained(..., safe_serialization=True)`` wrote.
      config: the architecture (see :meth:`LlamaConfig.from_json`).
      dtype: the dtype of the returned arrays.

    Returns:
      ``{"params": ...}`` nested dicts of ``jax.Array``, kernels in (in, out) layout.

    >>> params = load_params("path/to/checkpoint", LlamaConfig())   # doctest: +SKIP
    """
    directory = Path(directory)
    tensors = _read_tensors(directory)
    model = LlamaForCausalLM(config)
    shapes = paths.flatten(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    flat: dict[str, jax.Array] = {}
    for path, want in shapes.items():
        leaf = path.rsplit("/", 1)[-1]
        key = f"{module_name(path, LLAMA_KEY_MAP)}.{'bias' if leaf == 'bias' else 'weight'}"
        if key not in tensors:
            raise ValueError(f"{directory}: checkpoint has no tensor {key!r} (for {path!r}, shape {want.shape})")
        value = tensors[key].T if leaf == "kernel" else tensors[key]
        if value.shape != want.shape:
            raise ValueError(
                f"{directory}: tensor {key!r} has shape {tensors[key].shape}; {path!r} expects {want.shape} "
                "(after transposing kernels); check config.json"
            )
        flat[path] = jnp.asarray(value, dtype)
    return paths.unflatten_dict(flat)


def load_llama(directory: str | Path, dtype: Any = jnp.float32) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """``(model, params)`` from a transformers Llama checkpoint folder (``config.json`` + safetensors).

    >>> model, params = load_llama("path/to/checkpoint")             # doctest: +SKIP
    """
    directory = Path(directory)
    config = LlamaConfig.from_json(directory / "config.json")
    return LlamaForCausalLM(config), load_params(directory, config, dtype)
