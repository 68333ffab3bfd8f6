"""Lazy LoRA (jlora.lazy): lazy == merged == a float64 reference, outputs and gradients of A and B.

The reference runs the model's own apply function in float64 on ``W0 + s * A ⊗ B`` formed in
NumPy float64, and takes the gradient of A and B by the chain rule in NumPy from the float64
gradient of the merged kernel. Tolerances: float32 lazy vs float64 reference, relative to the
largest magnitude of the compared array.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora import lazy
from jlora import paths as jpaths

RTOL = 2e-4


def randomize(lora, seed=1, scale=0.3):
    """Non-zero factors (NumPy RNG: no per-shape compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), lora)


def init(model, *args):
    return jax.jit(model.init)(jax.random.key(1), *args)


def _flat3(a, f, part):
    """A as (S, I, r) / B as (S, r, O) / kernel as (S, I, O), float64."""
    shape = f.kernel_shape
    s = int(np.prod(shape[: f.n_stack]))
    i = int(np.prod(shape[f.n_stack : f.n_stack + f.n_in]))
    a = np.asarray(a, np.float64)
    return a.reshape(s, f.rank, -1) if part == "B" else a.reshape(s, i, -1)


def reference(apply_fn, frozen, lora, cfg, args, cot):
    """(y, {path/A: dA, path/B: dB}) in float64 for the loss sum(y * cot)."""
    info = jlora.adapted(frozen, lora, cfg)
    lflat = jpaths.flatten(lora)

    def merged(path, w):
        w = np.asarray(w, np.float64)
        if path in info:
            f = info[path]
            a, b = _flat3(lflat[path + "/A"], f, "A"), _flat3(lflat[path + "/B"], f, "B")
            w = w + f.scale * np.matmul(a, b).reshape(w.shape)
        elif path in lflat:
            w = np.asarray(lflat[path], np.float64)
        return w

    as64 = lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    with jax.enable_x64(True):
        params = jpaths.map_with_path(lambda p, w: jnp.asarray(merged(p, w)), frozen)
        y, g = jax.jit(lambda q, c: _vjp(lambda q: apply_fn(q, *jax.tree.map(as64, args)), q, c))(
            params, jnp.asarray(cot, jnp.float64))
        y, gflat = np.asarray(y), {p: np.asarray(x) for p, x in jpaths.flatten(g).items()}
    grads = {}
    for path, f in info.items():
        gw = _flat3(gflat[path], f, "W")
        a, b = _flat3(lflat[path + "/A"], f, "A"), _flat3(lflat[path + "/B"], f, "B")
        grads[path + "/A"] = (f.scale * np.matmul(gw, b.transpose(0, 2, 1))).reshape(lflat[path + "/A"].shape)
        grads[path + "/B"] = (f.scale * np.matmul(a.transpose(0, 2, 1), gw)).reshape(lflat[path + "/B"].shape)
    return y, grads


def _vjp(fn, x, cot):
    y, vjp = jax.vjp(fn, x)
    return y, vjp(cot)[0]


def close(got, want, rtol=RTOL, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
    assert err < rtol, f"{what}: relative error {err:.2e} >= {rtol:.0e}"


def check(apply_fn, params, cfg, args, *, init_args=True, lora=None):
    """lazy == merged == float64 reference, outputs and d/dA, d/dB; no fallback warning."""
    if lora is None:
        fn, example = (apply_fn, args) if init_args else (None, ())
        frozen, lora = jax.jit(lambda p: jlora.init(jax.random.key(0), p, cfg, apply_fn=fn, args=example))(params)
        lora = randomize(lora)
    else:
        frozen = params
    lazy_fn = jlora.lora_apply(apply_fn, cfg, "lazy", strict=True)
    merged_fn = jlora.lora_apply(apply_fn, cfg, "merged")
    shape = jax.eval_shape(merged_fn, frozen, lora, *args).shape
    cot = normal(7, *shape)
    y_ref, g_ref = reference(apply_fn, frozen, lora, cfg, args, cot)
    step = lambda fn: jax.jit(lambda l, c: _vjp(lambda l: fn(frozen, l, *args), l, c))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y_lazy, g_lazy = step(lazy_fn)(lora, cot)
    y_merged, g_merged = step(merged_fn)(lora, cot)
    close(y_lazy, y_ref, what="lazy output")
    close(y_merged, y_ref, what="merged output")
    g_lazy, g_merged = jpaths.flatten(g_lazy), jpaths.flatten(g_merged)
    assert set(g_ref) <= set(g_lazy)
    for p, want in g_ref.items():
        close(g_lazy[p], want, what=f"lazy grad {p}")
        close(g_merged[p], want, what=f"merged grad {p}")
    return frozen, lora


# --- models ---------------------------------------------------------------------------------------

class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 4), name="query")(x)  # (d, heads, hd)
        k = nn.DenseGeneral((2, 4), name="key")(x)
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0)
        v = nn.DenseGeneral((2, 4), name="value")(x)
        h = jnp.einsum("bhqk,bkhd->bqhd", w, v)
        return nn.DenseGeneral(8, axis=(-2, -1), name="out")(h)  # (heads, hd, d)


class HeadEinsum(nn.Module):
    """A custom module: its own params used by jnp.einsum, one with a batch (head) axis."""

    @nn.compact
    def __call__(self, x):
        w = self.param("proj", nn.initializers.normal(0.3), (8, 2, 3))
        h = jnp.einsum("bsd,dhe->bhse", x, w)
        u = self.param("per_head", nn.initializers.normal(0.3), (2, 3, 5))
        return jnp.einsum("bhse,hef->bshf", h, u)


class TiedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(13, 8, name="emb")
        h = jnp.tanh(nn.Dense(8, name="mix")(emb(ids)))
        return emb.attend(h)


class Convs(nn.Module):
    @nn.compact
    def __call__(self, x1, x2):
        a = nn.Conv(6, (3,), strides=2, kernel_dilation=2, padding="SAME", name="c1")(x1)
        b = nn.Conv(4, (3, 2), strides=(2, 1), kernel_dilation=(1, 2), padding=((1, 2), (0, 1)),
                    input_dilation=(1, 2), name="c2")(x2)
        return jnp.concatenate([a.sum(axis=1), b.sum(axis=(1, 2))], axis=-1)


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + jnp.tanh(nn.Dense(8, name="fc")(h)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return stack(name="layers")(x, None)[0]


class Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.remat(nn.Dense)
        return dense(8, name="fc2")(jnp.tanh(dense(8, name="fc1")(x)))


# --- tests ------------------------------------------------------------------------------------------

def normal(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


X = normal(3, 2, 5, 8)
IDS = jnp.array([[1, 2, 12, 4, 5], [0, 9, 8, 7, 6]], jnp.int32)


def test_dense():
    m = nn.Dense(6)
    check(m.apply, init(m, X), jlora.LoraConfig(rank=3, targets=".*kernel"), (X,))


def test_dense_general_attention():
    m = Attention()
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=r".*/(query|value|out)/kernel")
    check(m.apply, init(m, X), cfg, (X,))


def test_custom_einsum_module():
    m = HeadEinsum()
    check(m.apply, init(m, X), jlora.LoraConfig(rank=2, targets=r".*/(proj|per_head)"), (X,))


def test_embed_lookup_and_tied_attend():
    m = TiedLM()
    cfg = jlora.LoraConfig(rank=2, targets=r".*/(emb/embedding|mix/kernel)")
    check(m.apply, init(m, IDS), cfg, (IDS,))


def test_conv_1d_2d_stride_dilation_padding():
    m = Convs()
    x1, x2 = normal(4, 2, 9, 3), normal(5, 2, 7, 5, 3)
    check(m.apply, init(m, x1, x2), jlora.LoraConfig(rank=2, targets=".*kernel"), (x1, x2))


def test_scanned_layer_stack():
    m = Scanned()
    params = init(m, X)
    frozen, lora = check(m.apply, params, jlora.LoraConfig(rank=2, targets=".*kernel"), (X,))
    assert lora["params"]["layers"]["fc"]["kernel"]["A"].shape == (3, 8, 2)


def test_remat():
    m = Remat()
    check(m.apply, init(m, X), jlora.LoraConfig(rank=2, targets=".*kernel"), (X,))


def test_nnx_split_merge():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(13, 8, rngs=rngs)
            self.fc = nnx.Linear(8, 8, rngs=rngs)
            self.out = nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, ids):
            return self.out(nnx.relu(self.fc(self.emb(ids))))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))

    def apply(s, ids):
        return nnx.merge(graphdef, s)(ids)

    check(apply, state, jlora.LoraConfig(rank=2, targets=r"(emb/embedding|fc/kernel|out/kernel)"), (IDS,))


def plain(p, x):
    """A plain function: jit, custom_vjp, fori_loop over a stacked kernel, cond, a transposed use."""

    @jax.custom_vjp
    def mm(a, w):
        return a @ w

    mm.defvjp(lambda a, w: (a @ w, (a, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))
    h = jax.jit(lambda a, w: jnp.tanh(a @ w))(x, p["w1"])
    h = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["stack"][i]), h)
    h = jax.lax.cond(h.sum() > 0, lambda h: h @ p["w2"], lambda h: h @ p["w2"] * 2.0, h)
    return mm(h, p["w3"]) + h @ p["w1"].T


def test_plain_function_control_flow():
    params = {"w1": 0.3 * normal(10, 8, 8), "stack": 0.3 * normal(11, 3, 8, 8), "w2": 0.3 * normal(12, 8, 8),
              "w3": 0.3 * normal(13, 8, 8)}
    cfg = jlora.LoraConfig(rank=2, targets=r"(w1|w2|w3|stack)", stack={"stack": 1})
    check(plain, params, cfg, (X[0],), init_args=False)


def test_mixed_precision_bf16_base_f32_factors():
    x = X.astype(jnp.bfloat16)
    params = {"w": (0.3 * normal(1, 8, 6)).astype(jnp.bfloat16)}
    lora = {"w": {"A": normal(2, 8, 2), "B": normal(3, 2, 6)}}
    cfg = jlora.LoraConfig(rank=2, alpha=1.0, targets="w")
    y = jlora.lora_apply(lambda p, x: x @ p["w"], cfg, "lazy")(params, lora, x)
    assert y.dtype == jnp.bfloat16
    x64 = np.asarray(x, np.float64)
    want = x64 @ np.asarray(params["w"], np.float64) + 0.5 * (x64 @ np.asarray(lora["w"]["A"])) @ np.asarray(
        lora["w"]["B"])
    close(y, want, rtol=1e-2, what="bf16 lazy")


class QKV(nn.Module):
    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.Dense(8, name=n)(x) for n in ("q", "k", "v"))
        return q * k + nn.Dense(8, name="o")(v)


def test_shared_input_one_low_rank_product():
    m = QKV()
    cfg = jlora.LoraConfig(rank=2, targets=r".*/(q|k|v|o)/kernel")
    frozen, lora = check(m.apply, init(m, X), cfg, (X,))
    fn = jlora.lora_apply(m.apply, cfg, "lazy")
    widths = [e.outvars[0].aval.shape for e in _eqns(jax.make_jaxpr(fn)(frozen, lora, X).jaxpr)
              if e.primitive.name == "dot_general"]
    assert (10, 6) in widths and (10, 2) in widths  # one x·[A_q|A_k|A_v] (T=10 tokens), and o's own x·A


# --- no full-size delta or gradient ------------------------------------------------------------------

def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for j in v if isinstance(v, (tuple, list)) else (v,):
                j = getattr(j, "jaxpr", j)
                if hasattr(j, "eqns"):
                    yield from _eqns(j)


def _full_size_products(jaxpr, shapes):
    """Equations computing (not merely viewing) an array of a kernel's shape."""
    views = {"convert_element_type", "copy", "reshape", "transpose", "broadcast_in_dim", "squeeze", "rev", "pjit", "jit"}
    return [(e.primitive.name, tuple(v.aval.shape)) for e in _eqns(jaxpr) if e.primitive.name not in views
            for v in e.outvars if tuple(getattr(v.aval, "shape", ())) in shapes]


class AllKinds(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(13, 16, name="emb")
        h = emb(ids)
        h = nn.Dense(24, name="fc")(h)
        h = nn.Conv(20, (3,), name="conv")(h)
        return nn.Dense(13, name="head")(h)


def test_no_full_size_delta_or_gradient():
    m = AllKinds()
    params = init(m, IDS)
    cfg = jlora.LoraConfig(rank=2, targets=".*(kernel|embedding)")
    frozen, lora = jax.jit(lambda p: jlora.init(jax.random.key(0), p, cfg, apply_fn=m.apply, args=(IDS,)))(params)
    shapes = {tuple(x.shape) for p, x in jpaths.flatten(frozen).items() if p in jlora.adapted(frozen, lora, cfg)}
    assert shapes == {(13, 16), (16, 24), (3, 24, 20), (20, 13)}
    for mode, want_none in (("lazy", True), ("merged", False)):
        fn = jlora.lora_apply(m.apply, cfg, mode)
        grad = jax.grad(lambda l: jnp.sum(fn(frozen, l, IDS) ** 2))
        found = _full_size_products(jax.make_jaxpr(grad)(lora).jaxpr, shapes)
        assert (not found) == want_none, (mode, found)


# --- fallback, strict, dropout --------------------------------------------------------------------------

def odd(p, x):
    w = p["w"]
    return x @ jnp.sin(w) + jnp.sin(w).sum() + x @ w


def test_fallback_warns_once_and_strict_raises():
    frozen = {"w": normal(1, 8, 4)}
    lora = {"w": {"A": normal(2, 8, 2), "B": normal(3, 2, 4)}}
    cfg = jlora.LoraConfig(rank=2, targets="w")
    x = X[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = jlora.lora_apply(odd, cfg, "lazy")(frozen, lora, x)
    msgs = [str(w.message) for w in caught if "jlora lazy" in str(w.message)]
    assert len(msgs) == 1 and "'w'" in msgs[0] and "'sin'" in msgs[0], msgs
    close(y, odd(jlora.merge(frozen, lora, cfg), x), rtol=1e-5, what="fallback")
    with pytest.raises(ValueError, match=r"'w'.*'sin'"):
        jlora.lora_apply(odd, cfg, "lazy", strict=True)(frozen, lora, x)


def test_dropout_off_without_rng_on_with_rng():
    n = 64
    frozen = {"w": jnp.zeros((n, 1))}
    lora = {"w": {"A": jnp.ones((n, 1)), "B": jnp.ones((1, 1))}}
    cfg = jlora.LoraConfig(rank=1, alpha=1.0, targets="w", dropout=0.25)
    fn = jlora.lora_apply(lambda p, x: (x @ p["w"], x @ p["w"]), cfg, "lazy")
    x = jnp.ones((1, n))
    y1, y2 = fn(frozen, lora, x)
    assert float(y1[0, 0]) == n and float(y2[0, 0]) == n  # off without an rng
    y1, y2 = jax.jit(fn)(frozen, lora, x, lora_rng=jax.random.key(0))
    kept1, kept2 = float(y1[0, 0]) * 0.75, float(y2[0, 0]) * 0.75  # inverted dropout: sum of 1/(1-p)
    assert abs(kept1 - round(kept1)) < 1e-3 and abs(kept2 - round(kept2)) < 1e-3
    assert 0 < kept1 < n and 0 < kept2 < n and kept1 != kept2  # independent mask per use
    again = jax.jit(fn)(frozen, lora, x, lora_rng=jax.random.key(0))
    assert float(again[0][0, 0]) == float(y1[0, 0])
