"""Tiny random models for the layout tests: real packages (gemma, tunix, equinox, keras) and stock JAX/Flax.

Each builder returns a :class:`Family`: a parameter pytree jlora can take, a pure ``apply(params, *args)``,
example ``args``, the target regexes and ``own``, the package's own forward pass on ``args`` computed
without ``apply`` (so a test can check that ``apply`` and the reference built on it are the model).
Nothing is downloaded; every config is tiny and random. gemma's modules import kauldron, which needs
tensorflow at import; where tensorflow is missing, :func:`gemma_modules` loads gemma's own
``_modules.py`` with three import-time names stood in (see there). tunix is imported module by module,
without its package ``__init__`` (which pulls in its trainers).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.machinery
import importlib.util
import os
import pathlib
import sys
import types
from collections.abc import Callable
from typing import Any

os.environ["KERAS_BACKEND"] = "jax"  # keras reads it once, at its import

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

B, T = 2, 8  # batch and sequence length of every token model
D, N, K, H, F = 256, 4, 2, 64, 512  # width, heads, kv heads, head dim, hidden: big enough for the FLOPs check


@dataclasses.dataclass(frozen=True)
class Family:
    """One model: ``apply(params, *args)`` is its forward pass; ``targets`` are the LoRA target regexes."""

    name: str
    params: Any
    apply: Callable[..., Any]
    args: tuple[Any, ...]
    targets: tuple[str, ...]
    own: Any  # the package's own forward pass on ``args``


def is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def path_str(keypath: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(tuple(keypath), simple=True, separator="/")


def flat(tree: Any) -> dict[str, Any]:
    """``{path: array}`` of a pytree (NNX Variables unwrapped: their paths have no '/value')."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)[0]
    return {path_str(p): (x.get_value() if is_variable(x) else x) for p, x in leaves}


def replace(tree: Any, new: dict[str, Any]) -> Any:
    """``tree`` with the leaves at the paths in ``new`` replaced (NNX Variables keep their wrapper)."""

    def one(keypath: tuple[Any, ...], x: Any) -> Any:
        p = path_str(keypath)
        if p not in new:
            return x
        if is_variable(x):
            return x.replace(value=jnp.asarray(new[p], x.get_value().dtype))
        return jnp.asarray(new[p], x.dtype)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_variable)


def _normal(seed: int, shape: tuple[int, ...], std: float = 1.0) -> jax.Array:
    return jnp.asarray(std * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def random_params(abstract: Any, seed: int) -> Any:
    """Concrete values for an abstract parameter tree (``jax.eval_shape`` of the package's init), drawn
    with NumPy: the packages' initializers would compile a PRNG program per shape (seconds per model).
    Kernels (2+ axes) are N(0, 1/fan), fan = all axes but the last; vectors (norm scales, biases) 1 + N(0, 0.01)."""
    new = {}
    for i, (p, x) in enumerate(flat(abstract).items()):
        fan = int(np.prod(x.shape[:-1])) if len(x.shape) >= 2 else 0
        new[p] = _normal(seed + i, x.shape, fan ** -0.5) if fan else 1.0 + _normal(seed + i, x.shape, 0.1)
    return replace(abstract, new)


def _tokens_x(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return _normal(seed, shape)


def _causal(b: int, t: int) -> tuple[jax.Array, jax.Array]:
    pos = np.broadcast_to(np.arange(t), (b, t))
    mask = np.broadcast_to(np.tril(np.ones((t, t), bool)), (b, t, t))
    return jnp.asarray(pos), jnp.asarray(mask)


# ---------------------------------------------------------------- gemma 3.3.0 (Flax Linen)

def _load_file(name: str, path: pathlib.Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def gemma_modules() -> types.ModuleType:
    """gemma's ``gemma.gm.nn._modules`` (Attention, FeedForward, Block), the package's own source.

    The real import needs kauldron, whose typing module imports tensorflow (and clu, lark,
    immutabledict); where that fails, the file is executed under a private name with three
    import-time names stood in: ``gemma.gm.math`` (gemma's own ``_positional_embeddings.py``, loaded
    without the package ``__init__``), ``kauldron.typing.{Bool, Int}`` (annotations only) and
    ``kauldron.kd.nn.Identity`` (the identity module gemma uses to name attention weights); the
    stand-ins leave ``sys.modules`` as they found it. ``gemma.gm.nn._layers`` (Einsum, RMSNorm) is
    imported for real. Only gemma itself must be installed (``pip install --no-deps gemma==3.3.0``).
    """
    try:
        return importlib.import_module("gemma.gm.nn._modules")
    except ImportError:
        pass
    from gemma.gm.nn import _layers  # noqa: F401  (fails here if gemma is absent: the family is skipped)

    root = pathlib.Path(importlib.util.find_spec("gemma").submodule_search_locations[0])
    rope = _load_file("_real_models_gemma_rope", root / "gm" / "math" / "_positional_embeddings.py")

    class Identity(nn.Module):
        @nn.compact
        def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
            return x

    class _Annotation:
        def __class_getitem__(cls, item: Any) -> Any:
            return Any

    kd = types.SimpleNamespace(nn=types.SimpleNamespace(Identity=Identity))
    typing = types.SimpleNamespace(Bool=_Annotation, Int=_Annotation)
    stand_ins = {
        "gemma.gm.math": types.SimpleNamespace(_positional_embeddings=rope),
        "kauldron": types.SimpleNamespace(kd=kd, typing=typing),  # kauldron itself need not be installed
        "kauldron.kd": kd,
        "kauldron.typing": typing,
    }
    saved = {k: sys.modules[k] for k in stand_ins if k in sys.modules}
    sys.modules.update(stand_ins)
    try:
        return _load_file("_real_models_gemma_modules", root / "gm" / "nn" / "_modules.py")
    finally:
        for k in stand_ins:
            sys.modules.pop(k, None)
        sys.modules.update(saved)


def gemma_block() -> Family:
    """gemma ``Block`` with GQA: q_einsum (N, D, H), kv_einsum (2, K, D, H), attn_vec_einsum (N, H, D),
    mlp gating_einsum (2, D, F), mlp linear (F, D)."""
    m = gemma_modules()
    block = m.Block(num_heads=N, num_kv_heads=K, embed_dim=D, head_dim=H, hidden_dim=F,
                    use_post_attn_norm=True, use_post_ffw_norm=True, attn_type=m.AttentionType.GLOBAL,
                    query_pre_attn_scalar=H ** -0.5, transpose_gating_einsum=False)
    x = _tokens_x(1, (B, T, D))
    pos, mask = _causal(B, T)
    params = random_params(jax.eval_shape(block.init, jax.random.key(0), x, pos, None, mask), 100)

    def apply(params: Any, x: jax.Array) -> jax.Array:
        return block.apply(params, x, pos, None, mask)[1]

    own = jax.jit(block.apply)(params, x, pos, None, mask)[1]
    targets = (r"params/attn/(q_einsum|kv_einsum|attn_vec_einsum)/w", r"params/mlp/(gating_einsum|linear)")
    return Family("gemma_block", params, apply, (x,), targets, own)


def gemma_attention_mha() -> Family:
    """gemma ``Attention`` with num_kv_heads == num_heads: one fused qkv_einsum (3, N, D, H)."""
    m = gemma_modules()
    attn = m.Attention(num_heads=N, num_kv_heads=N, features=D, head_dim=H, attn_type=m.AttentionType.GLOBAL,
                       query_pre_attn_scalar=H ** -0.5)
    x = _tokens_x(2, (B, T, D))
    pos, mask = _causal(B, T)
    params = random_params(jax.eval_shape(attn.init, jax.random.key(0), x, pos, None, mask), 200)

    def apply(params: Any, x: jax.Array) -> jax.Array:
        return attn.apply(params, x, pos, None, mask)[1]

    own = jax.jit(attn.apply)(params, x, pos, None, mask)[1]
    return Family("gemma_attention_mha", params, apply, (x,), (r"params/(qkv_einsum|attn_vec_einsum)/w",), own)


# ---------------------------------------------------------------- google-tunix 0.1.7 (Flax NNX)

def tunix_module(name: str) -> types.ModuleType:
    """``tunix.<name>`` imported without tunix's package ``__init__`` (it imports its trainers and metrax)."""
    if "tunix" not in sys.modules:
        spec = importlib.util.find_spec("tunix")
        if spec is None:
            raise ImportError("No module named 'tunix' (pip install --no-deps google-tunix==0.1.7)")
        bare = importlib.machinery.ModuleSpec("tunix", None, origin=spec.origin, is_package=True)
        bare.submodule_search_locations = list(spec.submodule_search_locations)
        sys.modules["tunix"] = importlib.util.module_from_spec(bare)
    return importlib.import_module(f"tunix.{name}")


def _nnx_family(name: str, make: Callable[[], nnx.Module], args: tuple[Any, ...], targets: tuple[str, ...],
                call: Callable[..., Any]) -> Family:
    """``make()`` builds the module (abstractly); ``own`` is ``call(module, *args)`` under ``nnx.jit``."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    state = random_params(abstract, 300)
    own = nnx.jit(call)(nnx.merge(graphdef, state), *args)

    def apply(state: Any, *args: Any) -> jax.Array:
        return call(nnx.merge(graphdef, state), *args)

    return Family(name, state, apply, args, targets, own)


def tunix_qwen3() -> Family:
    """tunix Qwen3, one layer: q_proj (D, N, H) `BTD,DNH->BTNH`, k/v_proj (D, K, H), o_proj (N, H, D)
    `BTNH,NHD->BTD` (einsum kernels), MLP gate/up/down (nnx.Linear)."""
    q3 = tunix_module("models.qwen3.model")
    cfg = q3.ModelConfig(num_layers=1, vocab_size=64, embed_dim=D, hidden_dim=F, num_heads=N, head_dim=H,
                         num_kv_heads=K, rope_theta=10_000, norm_eps=1e-6)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (B, T)), jnp.int32)
    pos, mask = _causal(B, T)
    targets = (r"layers/0/attn/(q|k|v|o)_proj/w", r"layers/0/mlp/(gate|up|down)_proj/kernel")
    return _nnx_family("tunix_qwen3", lambda: q3.Qwen3(cfg, rngs=nnx.Rngs(0)), (tokens,), targets,
                       lambda m, t: m(t, pos, None, mask)[0])


def tunix_qwen3_moe() -> Family:
    """tunix Qwen3-MoE layer: stacked expert kernels gate/up_proj (E, D, F), down_proj (E, F, D), each used
    per expert as ``W[i]`` (tunix's CPU path)."""
    q3 = tunix_module("models.qwen3.model")
    cfg = q3.ModelConfig(num_layers=1, vocab_size=64, embed_dim=D, hidden_dim=128, num_heads=N, head_dim=H,
                         num_kv_heads=K, rope_theta=10_000, norm_eps=1e-6, num_experts=4, num_experts_per_tok=2)
    x = _tokens_x(4, (B, T, D))
    return _nnx_family("tunix_qwen3_moe", lambda: q3.MoELayer(cfg, rngs=nnx.Rngs(0)), (x,),
                       (r"(gate|up|down)_proj",), lambda m, x: m(x))


# ---------------------------------------------------------------- equinox

def _eqx_family(name: str, make: Callable[[], Any], x: jax.Array, targets: tuple[str, ...]) -> Family:
    import equinox as eqx

    abstract = eqx.filter_eval_shape(make)
    params, static = eqx.partition(abstract, lambda v: isinstance(v, jax.ShapeDtypeStruct))
    params = random_params(params, 400)
    model = eqx.combine(params, static)

    def apply(params: Any, x: jax.Array) -> jax.Array:
        return jax.vmap(eqx.combine(params, static))(x)

    return Family(name, params, apply, (x,), targets, jax.jit(jax.vmap(model))(x))


def equinox_attention() -> Family:
    """equinox Linear (out, in) = (D, 128) then MultiheadAttention: query/key/value/output_proj (D, D)."""
    import equinox as eqx

    class Model(eqx.Module):
        embed: eqx.nn.Linear
        attn: eqx.nn.MultiheadAttention

        def __call__(self, x: jax.Array) -> jax.Array:
            h = jax.vmap(self.embed)(x)
            return self.attn(h, h, h)

    key = jax.random.key(0)
    make = lambda: Model(eqx.nn.Linear(128, D, key=key), eqx.nn.MultiheadAttention(N, D, key=key))
    targets = (r"embed/weight", r"attn/(query|key|value|output)_proj/weight")
    return _eqx_family("equinox_attention", make, _tokens_x(5, (B, T, 128)), targets)


def equinox_conv() -> Family:
    """equinox Conv2d (OIHW: (8, 4, 3, 3)) then ConvTranspose2d (OIHW: (6, 8, 3, 3), stride 2)."""
    import equinox as eqx

    class Model(eqx.Module):
        conv: eqx.nn.Conv2d
        convt: eqx.nn.ConvTranspose2d

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.convt(jnp.tanh(self.conv(x)))

    key = jax.random.key(0)
    make = lambda: Model(eqx.nn.Conv2d(4, 8, 3, padding=1, key=key),
                         eqx.nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, key=key))
    return _eqx_family("equinox_conv", make, _tokens_x(6, (B, 4, 8, 8)), (r"(conv|convt)/weight",))


# ---------------------------------------------------------------- keras 3, JAX backend

def _keras_family(name: str, model: Any, x: np.ndarray, targets: tuple[str, ...]) -> Family:
    """params: the trainable variables as nested dicts keyed by ``variable.path`` ('dense/kernel'), set to
    :func:`random_params` values (the layers are built with zeros initializers: nothing compiles)."""
    tv = list(model.trainable_variables)
    ntv = [v.value for v in model.non_trainable_variables]
    params: dict[str, Any] = {}
    for v in tv:
        *outer, leaf = v.path.split("/")
        node = params
        for part in outer:
            node = node.setdefault(part, {})
        node[leaf] = jax.ShapeDtypeStruct(tuple(v.shape), jnp.float32)
    params = random_params(params, 500)
    values = flat(params)
    for v in tv:
        v.assign(values[v.path])
    paths = [v.path for v in tv]

    def apply(params: Any, x: jax.Array) -> jax.Array:
        leaves = flat(params)
        return model.stateless_call([leaves[p] for p in paths], ntv, x)[0]

    own = jax.jit(lambda x: model(x))(x)  # the Keras call (not stateless_call), traced once
    return Family(name, params, apply, (jnp.asarray(x),), targets, own)


def _keras() -> types.ModuleType:
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"keras runs on the {keras.backend.backend()!r} backend: it was imported before "
                           "real_models set KERAS_BACKEND=jax; fix: import real_models first")
    return keras


def keras_dense() -> Family:
    """keras Dense (128, D), EinsumDense 'btd,dnh->btnh' (D, N, H) and 'btnh,nhd->btd' (N, H, D)."""
    keras = _keras()

    zeros = {"kernel_initializer": "zeros", "bias_initializer": "zeros"}
    inp = keras.Input((T, 128))
    h = keras.layers.Dense(D, name="dense", **zeros)(inp)
    h = keras.layers.EinsumDense("btd,dnh->btnh", output_shape=(None, N, H), name="q_proj", **zeros)(h)
    h = keras.layers.EinsumDense("btnh,nhd->btd", output_shape=(None, D), name="o_proj", **zeros)(h)
    model = keras.Model(inp, h)
    x = np.asarray(_tokens_x(7, (B, T, 128)))
    return _keras_family("keras_dense", model, x, (r"(dense|q_proj|o_proj)/kernel",))


def keras_conv() -> Family:
    """keras DepthwiseConv2D (3, 3, 4, 2), Conv2D(groups=2) (3, 3, 4, 8), Conv2DTranspose (3, 3, 6, 8)."""
    keras = _keras()

    zeros = {"kernel_initializer": "zeros", "bias_initializer": "zeros"}
    inp = keras.Input((8, 8, 4))
    h = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="depthwise",
                                     depthwise_initializer="zeros", bias_initializer="zeros")(inp)
    h = keras.layers.Conv2D(8, 3, padding="same", groups=2, name="grouped", **zeros)(h)
    h = keras.layers.Conv2DTranspose(6, 3, strides=2, padding="same", name="transposed", **zeros)(h)
    model = keras.Model(inp, h)
    x = np.asarray(_tokens_x(8, (B, 8, 8, 4)))
    return _keras_family("keras_conv", model, x, (r"(depthwise|grouped|transposed)/kernel",))


# ---------------------------------------------------------------- stock JAX/Flax reproductions of each layout

def _f64(*xs: Any) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in xs]


def _np_softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _np_conv_same(x: np.ndarray, w_hwio: np.ndarray, groups: int = 1) -> np.ndarray:
    """float64 NHWC x HWIO conv, stride 1, 'SAME' padding, ``groups`` feature groups (group-major channels)."""
    kh, kw, cin_g, cout = w_hwio.shape
    xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    hh, ww = x.shape[1:3]
    patches = np.stack([np.stack([xp[:, i:i + hh, j:j + ww] for j in range(kw)], 3) for i in range(kh)], 3)
    out = []  # patches: (b, h, w, kh, kw, cin)
    for g in range(groups):
        p = patches[..., g * cin_g:(g + 1) * cin_g]
        out.append(np.einsum("bxyijc,ijco->bxyo", p, w_hwio[..., g * (cout // groups):(g + 1) * (cout // groups)]))
    return np.concatenate(out, -1)


def stock_einsum() -> Family:
    """flax nn.Einsum q (N, D, H) 'BTD,NDH->BTNH' and o (N, H, D) 'BTNH,NHD->BTD'; a raw jnp.einsum kv
    kernel (2, N, D, H) 'BSD,CKDH->CBSKH'."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            q = nn.Einsum((N, D, H), "BTD,NDH->BTNH", use_bias=False, name="q")(x)
            kv = self.param("kv", nn.initializers.normal(D ** -0.5), (2, N, D, H))
            k, v = jnp.einsum("BSD,CKDH->CBSKH", x, kv)
            probs = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k) * H ** -0.5)
            return nn.Einsum((N, H, D), "BTNH,NHD->BTD", use_bias=False, name="o")(
                jnp.einsum("BNTS,BSNH->BTNH", probs, v))

    x = _tokens_x(9, (B, T, D))
    params = random_params(jax.eval_shape(Model().init, jax.random.key(0), x), 600)
    xs, wq, kv, wo = _f64(x, params["params"]["q"]["kernel"], params["params"]["kv"], params["params"]["o"]["kernel"])
    q = np.einsum("btd,ndh->btnh", xs, wq)
    k, v = np.einsum("bsd,ckdh->cbskh", xs, kv)
    probs = _np_softmax(np.einsum("btnh,bsnh->bnts", q, k) * H ** -0.5)
    own = np.einsum("btnh,nhd->btd", np.einsum("bnts,bsnh->btnh", probs, v), wo)
    return Family("stock_einsum", params, Model().apply, (x,), (r"params/(q/kernel|kv|o/kernel)",), own)


def stock_dense_out_in() -> Family:
    """Hand-written dense layers stored (out, in), PyTorch layout: ``x @ W.T``; w1 (D, 128), w2 (128, D)."""
    params = {"w1": _normal(10, (D, 128), 128 ** -0.5), "w2": _normal(11, (128, D), D ** -0.5)}

    def apply(p: Any, x: jax.Array) -> jax.Array:
        return jnp.tanh(x @ p["w1"].T) @ p["w2"].T

    x = _tokens_x(12, (B, T, 128))
    xs, w1, w2 = _f64(x, params["w1"], params["w2"])
    return Family("stock_dense_out_in", params, apply, (x,), (r"w1|w2",), np.tanh(xs @ w1.T) @ w2.T)


def stock_conv_oihw() -> Family:
    """An OIHW kernel (8, 4, 3, 3) through lax.conv_general_dilated(('NHWC', 'OIHW', 'NHWC'))."""
    params = {"conv": {"w": _normal(13, (8, 4, 3, 3), 36 ** -0.5)}}

    def apply(p: Any, x: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(x, p["conv"]["w"], (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "OIHW", "NHWC"))

    x = _tokens_x(14, (B, 8, 8, 4))
    xs, w = _f64(x, params["conv"]["w"])
    return Family("stock_conv_oihw", params, apply, (x,), (r"conv/w",), _np_conv_same(xs, w.transpose(2, 3, 1, 0)))


def _flax_conv_family(name: str, module: nn.Module, x: jax.Array, targets: tuple[str, ...],
                      own: Callable[[Any, np.ndarray], np.ndarray] | None = None) -> Family:
    params = random_params(jax.eval_shape(module.init, jax.random.key(0), x), 700)
    ref = jax.jit(module.apply)(params, x) if own is None else own(params, np.asarray(x, np.float64))
    return Family(name, params, module.apply, (x,), targets, ref)


def stock_conv_grouped() -> Family:
    """flax nn.Conv(8, (3, 3), feature_group_count=2) on 4 channels: kernel (3, 3, 2, 8)."""
    conv = nn.Conv(8, (3, 3), feature_group_count=2, use_bias=False)
    own = lambda p, x: _np_conv_same(x, np.asarray(p["params"]["kernel"], np.float64), groups=2)
    return _flax_conv_family("stock_conv_grouped", conv, _tokens_x(15, (B, 8, 8, 4)), (r"params/kernel",), own)


def stock_conv_depthwise() -> Family:
    """flax nn.Conv(8, (3, 3), feature_group_count=4) on 4 channels (depthwise, multiplier 2): (3, 3, 1, 8)."""
    conv = nn.Conv(8, (3, 3), feature_group_count=4, use_bias=False)
    own = lambda p, x: _np_conv_same(x, np.asarray(p["params"]["kernel"], np.float64), groups=4)
    return _flax_conv_family("stock_conv_depthwise", conv, _tokens_x(16, (B, 8, 8, 4)), (r"params/kernel",), own)


def stock_conv_transpose() -> Family:
    """flax nn.ConvTranspose (3, 3, 4, 8), stride 2, then nn.ConvTranspose(transpose_kernel=True) (3, 3, 6, 8):
    the second flips its kernel (rev) and swaps its channel axes."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            h = nn.ConvTranspose(8, (3, 3), strides=(2, 2), use_bias=False, name="convt")(x)
            return nn.ConvTranspose(6, (3, 3), transpose_kernel=True, use_bias=False, name="convt_flip")(h)

    return _flax_conv_family("stock_conv_transpose", Model(), _tokens_x(17, (B, 8, 8, 4)),
                             (r"params/(convt|convt_flip)/kernel",))


E = 4  # experts


def stock_experts() -> Family:
    """Stacked kernels (E, in, out) used per expert: ``W[i]``, ``jnp.take(W, i, 0)``, and
    ``lax.dynamic_index_in_dim(W, e)`` with a traced expert index ``e``."""
    params = {"w_index": _normal(18, (E, D, 128), D ** -0.5), "w_take": _normal(19, (E, D, 128), D ** -0.5),
              "w_dyn": _normal(20, (E, 128, D), 128 ** -0.5)}

    def apply(p: Any, x: jax.Array, e: jax.Array) -> jax.Array:
        h = sum(jnp.tanh(x @ p["w_index"][i]) for i in range(E))
        h = h + sum(x @ jnp.take(p["w_take"], i, axis=0) for i in range(E))
        return h @ jax.lax.dynamic_index_in_dim(p["w_dyn"], e, keepdims=False)

    x, e = _tokens_x(21, (B, T, D)), jnp.int32(2)
    xs, wi, wt, wd = _f64(x, params["w_index"], params["w_take"], params["w_dyn"])
    own = (sum(np.tanh(xs @ wi[i]) for i in range(E)) + sum(xs @ wt[i] for i in range(E))) @ wd[2]
    return Family("stock_experts", params, apply, (x, e), (r"w_index|w_take|w_dyn",), own)


def stock_views() -> Family:
    """Kernels reached through views: w_merge (D, N, H) used as ``reshape(D, N*H)``; w_perm (D, N, H) used
    as ``transpose(1, 2, 0)`` in 'btnh,nhd->btd'; w_split (D, N*H) used as ``reshape(D, N, H)`` in
    'btd,dnh->btnh'; w_rev (N*H, D) used as ``jnp.flip(w, 0)``."""
    params = {"w_merge": _normal(22, (D, N, H), D ** -0.5), "w_perm": _normal(23, (D, N, H), (N * H) ** -0.5),
              "w_split": _normal(24, (D, N * H), D ** -0.5), "w_rev": _normal(25, (N * H, D), (N * H) ** -0.5)}

    def apply(p: Any, x: jax.Array) -> jax.Array:
        q = (x @ p["w_merge"].reshape(D, N * H)).reshape(B, T, N, H)
        o = jnp.einsum("btnh,nhd->btd", jnp.tanh(q), jnp.transpose(p["w_perm"], (1, 2, 0)))
        z = jnp.einsum("btd,dnh->btnh", o, p["w_split"].reshape(D, N, H)).reshape(B, T, N * H)
        return jnp.tanh(z) @ jnp.flip(p["w_rev"], 0)

    x = _tokens_x(26, (B, T, D))
    xs, wm, wp, ws, wr = _f64(x, *params.values())
    q = np.einsum("btd,dnh->btnh", xs, wm)
    o = np.einsum("btnh,dnh->btd", np.tanh(q), wp)
    z = np.einsum("btd,df->btf", o, ws)
    own = np.tanh(z) @ wr[::-1]
    return Family("stock_views", params, apply, (x,), (r"w_merge|w_perm|w_split|w_rev",), own)


BUILDERS: dict[str, Callable[[], Family]] = {f.__name__: f for f in (
    gemma_block, gemma_attention_mha, tunix_qwen3, tunix_qwen3_moe, equinox_attention, equinox_conv,
    keras_dense, keras_conv, stock_einsum, stock_dense_out_in, stock_conv_oihw, stock_conv_grouped,
    stock_conv_depthwise, stock_conv_transpose, stock_experts, stock_views)}
"""Every family by name; a builder raises ImportError where its package is not installed."""


@functools.cache
def build(name: str) -> Family:
    """The family ``name`` (built once per process)."""
    return BUILDERS[name]()
