"""Lazy LoRA (jlora.trace._lazy): lazy == merged == a float64 reference, outputs and gradients of A and B.

The reference runs the model's own apply function in float64 on ``W0 + s * A ⊗ B`` formed in
NumPy float64, and takes the gradient of A and B by the chain rule in NumPy from the float64
gradient of the merged kernel. Tolerances: float32 lazy vs float64 reference, relative to the
largest magnitude of the compared array.
"""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpr_walk import eqns as _eqns
import jlora
from jlora import paths as jpaths

RTOL = 2e-4


def randomize(lora, seed=1, scale=0.3):
    """Non-zero factors (NumPy RNG: no per-shape compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), lora)


def init(model, *args):
    """Random parameters of the model's shapes (NumPy: no XLA compile for the initialisers)."""
    return randomize(jax.eval_shape(model.init, jax.random.key(1), *args), seed=2, scale=0.4)


def lora_init(params, cfg, apply_fn=None, args=()):
    """(frozen, random non-zero lora): the lora tree's layout from jlora.init, on abstract shapes."""
    shapes = jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, cfg, apply_fn=apply_fn, args=args)[1], params)
    return params, randomize(shapes)


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
        fn = lambda q: apply_fn(q, *jax.tree.map(as64, args))  # noqa: E731
        if cot is None:  # forward only
            return np.asarray(jax.jit(fn)(params)), {}
        y, g = jax.jit(lambda q, c: _vjp(fn, q, c))(params, jnp.asarray(cot, jnp.float64))
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
        frozen, lora = lora_init(params, cfg, *((apply_fn, args) if init_args else ()))
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
    m = nn.Dense(6)  # with a bias trained whole (its value comes from the lora tree)
    check(m.apply, init(m, X), jlora.LoraConfig(rank=3, targets=".*kernel", trainable=".*bias"), (X,))


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

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Net(nnx.Rngs(0))))
    state = randomize(state, seed=2, scale=0.4)

    def apply(s, ids):
        return nnx.merge(graphdef, s)(ids)

    check(apply, state, jlora.LoraConfig(rank=2, targets=r"(emb/embedding|fc/kernel|out/kernel)"), (IDS,))


def plain(p, x):
    """A plain function: jit, custom_vjp, fori_loop over a stacked kernel, take/index of its layer axis,
    cond, a transposed use."""

    @jax.custom_vjp
    def mm(a, w):
        return a @ w

    mm.defvjp(lambda a, w: (a @ w, (a, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))
    h = jax.jit(lambda a, w: jnp.tanh(a @ w))(x, p["w1"])
    h = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["stack"][i]), h)
    h = jnp.tanh(h @ jnp.take(p["stack"], 1, axis=0) + h @ p["stack"][2])  # gather / slice of the layer axis
    h = jax.lax.cond(h.sum() > 0, lambda h: h @ p["w2"], lambda h: h @ p["w2"] * 2.0, h)
    return mm(h, p["w3"]) + h @ p["w1"].T


def test_plain_function_control_flow():
    params = {"w1": 0.3 * normal(10, 8, 8), "stack": 0.3 * normal(11, 3, 8, 8), "w2": 0.3 * normal(12, 8, 8),
              "w3": 0.3 * normal(13, 8, 8)}
    cfg = jlora.LoraConfig(rank=2, targets=r"(w1|w2|w3|stack)", stack={"stack": 1})
    check(plain, params, cfg, (X[0],), init_args=False)


def loops(p, x):
    """Forward-only control flow (while_loop is not reverse-differentiable): while, switch."""
    h, _ = jax.lax.while_loop(lambda c: c[1] < 2, lambda c: (jnp.tanh(c[0] @ p["w1"]), c[1] + 1), (x, 0))
    branches = [lambda h: h @ p["w2"], lambda h: h @ p["w2"].T, lambda h: jnp.tanh(h @ p["w1"])]
    return jax.lax.switch(jnp.int32(1), branches, h)


def test_while_and_switch_forward():
    frozen = {"w1": 0.3 * normal(20, 8, 8), "w2": 0.3 * normal(21, 8, 8)}
    lora = randomize({k: {"A": jnp.zeros((8, 2)), "B": jnp.zeros((2, 8))} for k in frozen})
    cfg = jlora.LoraConfig(rank=2, targets="w1|w2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = jax.jit(jlora.lora_apply(loops, cfg, "lazy", strict=True))(frozen, lora, X[0])
    y_ref, _ = reference(loops, frozen, lora, cfg, (X[0],), None)
    close(y, y_ref, what="while/switch")


def test_fused_partial_kernel():
    """loralib MergedLinear: a fused qkv kernel (8, 3*4) with LoRA on q and v only."""
    frozen = {"qkv": 0.3 * normal(30, 8, 12)}
    lora = {"qkv": {"A": normal(31, 8, 4), "B": normal(32, 2, 2, 4)}}  # E=2 enabled groups, r=2
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets="qkv", fused={"qkv": (True, False, True)})
    x = X[0]
    lazy_fn = jlora.lora_apply(lambda p, x: x @ p["qkv"], cfg, "lazy", strict=True)
    a, b = np.asarray(lora["qkv"]["A"], np.float64), np.asarray(lora["qkv"]["B"], np.float64)
    delta = np.concatenate([2.0 * a[:, :2] @ b[0], np.zeros((8, 4)), 2.0 * a[:, 2:] @ b[1]], axis=1)
    close(lazy_fn(frozen, lora, x), np.asarray(x, np.float64) @ (np.asarray(frozen["qkv"], np.float64) + delta),
          what="fused lazy")
    merged_fn = jlora.lora_apply(lambda p, x: x @ p["qkv"], cfg, "merged")
    g_lazy, g_merged = (jax.grad(lambda l, fn=fn: jnp.sum(jnp.sin(fn(frozen, l, x))))(lora)
                        for fn in (lazy_fn, merged_fn))
    for k in ("A", "B"):
        close(g_lazy["qkv"][k], g_merged["qkv"][k], rtol=1e-5, what=f"fused grad {k}")


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
    step = jax.grad(lambda lo: jnp.sum(fn(frozen, lo, X) ** 2))
    widths = [e.outvars[0].aval.shape for e in _eqns(jax.make_jaxpr(step)(lora).jaxpr)
              if e.primitive.name == "dot_general"]
    assert (10, 6) in widths and (10, 2) in widths  # one x·[A_q|A_k|A_v] (T=10 tokens), and o's own x·A
    assert (6, 8) in widths and (8, 8) not in widths  # one dA_catᵀ product; no kernel-sized product or gradient


def test_inference_merges_when_cheaper():
    """Not differentiated, a plain dense use runs ``x·(W0 + A·Bs)`` when T·(in + out) ≥ in·out (here
    T=10, in=out=8) and stays low-rank for fewer tokens (decoding: T=1); both equal the float64 reference."""
    m = QKV()
    cfg = jlora.LoraConfig(rank=2, targets=r".*/(q|k|v|o)/kernel")
    frozen, lora = check(m.apply, init(m, X), cfg, (X,))
    fn = jlora.lora_apply(m.apply, cfg, "lazy")
    for x, merged in ((X, True), (X[:1, :1], False)):
        widths = [e.outvars[0].aval.shape for e in _eqns(jax.make_jaxpr(fn)(frozen, lora, x).jaxpr)
                  if e.primitive.name == "dot_general"]
        t = x.shape[0] * x.shape[1]
        assert ((8, 8) in widths) == merged and ((t, 6) in widths) == (not merged), (t, widths)
        close(jax.jit(fn)(frozen, lora, x), m.apply(jlora.merge(frozen, lora, cfg), x), rtol=1e-5, what=f"T={t}")
    # a bf16 base computing in bf16 with f32 factors keeps the f32 low-rank branch (merging would round
    # s·A·B to bf16); with an f32 input Dense promotes W0 to f32 and the merge loses nothing
    frozen16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), frozen)
    widths = [e.outvars[0].aval.shape for e in _eqns(jax.make_jaxpr(fn)(frozen16, lora, X.astype(jnp.bfloat16)).jaxpr)
              if e.primitive.name == "dot_general"]
    assert (8, 8) not in widths and (10, 6) in widths


# --- no full-size delta or gradient ------------------------------------------------------------------


def _full_size_products(jaxpr, shapes):
    """Equations computing (not merely viewing) an array of a kernel's shape."""
    views = {"convert_element_type", "copy", "reshape", "transpose", "broadcast_in_dim", "squeeze", "rev", "pjit",
             "stop_gradient",
             "jit"}
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


@pytest.mark.parametrize("use_dora", [False, True])
def test_no_full_size_delta_or_gradient(use_dora):
    """Also for DoRA: the norm ||W0 + s·A⊗B||_in comes from low-rank identities, not the kernel."""
    m = AllKinds()
    params = init(m, IDS)
    cfg = jlora.LoraConfig(rank=2, targets=".*(kernel|embedding)", use_dora=use_dora)
    frozen, lora = lora_init(params, cfg, m.apply, (IDS,))
    if use_dora:
        lora = randomize(lora, seed=3)  # a non-trivial magnitude
        assert all(f.dora for f in jlora.adapted(frozen, lora, cfg).values())
    shapes = {tuple(x.shape) for p, x in jpaths.flatten(frozen).items() if p in jlora.adapted(frozen, lora, cfg)}
    assert shapes == {(13, 16), (16, 24), (3, 24, 20), (20, 13)}
    alternatives = "|".join(",".join(map(str, x)) for x in shapes)
    hlo_shape = re.compile(r"=\s*f32\[(" + alternatives + r")\]\{[^}]*\}\s+([\w\-]+)\(")
    w0_views = {"parameter", "reverse", "bitcast", "copy", "transpose"}  # W0 itself, e.g. flipped for a conv's dX
    for mode, want_none in (("lazy", True), ("merged", False)):
        fn = jlora.lora_apply(m.apply, cfg, mode, **({"strict": True} if mode == "lazy" else {}))
        grad = jax.grad(lambda l, f: jnp.sum(fn(f, l, IDS) ** 2))
        found = _full_size_products(jax.make_jaxpr(grad)(lora, frozen).jaxpr, shapes)
        assert (not found) == want_none, (mode, found)
        # the compiled train step: kernel-shaped HLO values are W0 parameters (and views), nothing computed
        text = jax.jit(grad).lower(lora, frozen).compile().as_text()
        # values inside a fusion body are not materialised (W0·W0 of DoRA's ||W0||² is fused into its reduce)
        unfused = "\n\n".join(c for c in text.split("\n\n") if "fused" not in c.split("\n", 1)[0])
        ops = {op for _, op in hlo_shape.findall(unfused)}
        assert (ops <= w0_views) == want_none, (mode, sorted(ops))


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


def test_dropout_inside_scan_and_remat():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Remat(name="r")(Scanned(name="s")(x))

    m = Net()
    params = init(m, X)
    cfg = jlora.LoraConfig(rank=2, targets=".*kernel", dropout=0.5)
    frozen, lora = lora_init(params, cfg, m.apply, (X,))
    lazy_fn = jlora.lora_apply(m.apply, cfg, "lazy", strict=True)
    off = jax.jit(lazy_fn)(frozen, lora, X)
    close(off, jax.jit(jlora.lora_apply(m.apply, cfg, "merged"))(frozen, lora, X), rtol=1e-5, what="dropout off")
    loss = jax.jit(lambda l, k: jnp.sum(lazy_fn(frozen, l, X, lora_rng=k) ** 2))
    step = jax.jit(jax.value_and_grad(lambda l, k: jnp.sum(lazy_fn(frozen, l, X, lora_rng=k) ** 2)))
    (l1, g), (l2, _) = step(lora, jax.random.key(1)), step(lora, jax.random.key(2))
    assert abs(float(l1) - float(jnp.sum(off**2))) > 1e-3 and abs(float(l1) - float(l2)) > 1e-3
    # the gradient is the gradient of THIS key's loss: remat and scan recompute the same masks in the backward
    # pass (a mask drawn afresh would give a different derivative). Central differences along a random direction.
    v = randomize(lora, seed=7, scale=1.0)
    eps = 1e-3  # float32 central differences: agree to ~0.5% here (a fresh mask would be off by O(1))
    plus = loss(jax.tree.map(lambda a, d: a + eps * d, lora, v), jax.random.key(1))
    minus = loss(jax.tree.map(lambda a, d: a - eps * d, lora, v), jax.random.key(1))
    numeric = (float(plus) - float(minus)) / (2 * eps)
    analytic = sum(float(jnp.vdot(a, d)) for a, d in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
    assert abs(numeric - analytic) <= 2e-2 * abs(analytic), (numeric, analytic)


def test_dropout_is_an_inverted_mask_on_the_input_of_a():
    """The mask read off one adapter (A = B = I) predicts, in float64, the output and gradients of another."""
    n, rate = 16, 0.25
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, n)).astype(np.float32)
    w0 = rng.standard_normal((n, n)).astype(np.float32)
    cfg = jlora.LoraConfig(rank=n, alpha=float(n), targets="w", dropout=rate)  # scale 1
    fn = jax.jit(jlora.lora_apply(lambda p, x: x @ p["w"], cfg, "lazy"))
    key = jax.random.key(3)
    eye = {"w": {"A": jnp.eye(n), "B": jnp.eye(n)}}
    probe = np.asarray(fn({"w": w0}, eye, x, lora_rng=key), np.float64) - x.astype(np.float64) @ w0
    scaled = x.astype(np.float64) / (1 - rate)
    kept = np.abs(probe - scaled) < np.abs(probe)  # nearer x / (1 - rate) than 0
    # inverted dropout: a kept entry is x / (1 - rate), a dropped one 0 (float32 base product: atol 1e-5)
    np.testing.assert_allclose(probe[kept], scaled[kept], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probe[~kept], 0, atol=1e-5)
    share = kept.mean()  # 1024 Bernoulli(0.75) draws: 4 sigma = 0.054
    assert abs(share - (1 - rate)) < 0.054, share
    # the same key on other factors: the same mask, on the input of A only (the base sees the whole input)
    a = rng.standard_normal((n, n)).astype(np.float32) * 0.3
    b = rng.standard_normal((n, n)).astype(np.float32) * 0.3
    lora = {"w": {"A": jnp.asarray(a), "B": jnp.asarray(b)}}
    xd = np.where(kept, x.astype(np.float64) / (1 - rate), 0.0)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    want = x.astype(np.float64) @ w0 + xd @ a64 @ b64
    np.testing.assert_allclose(np.asarray(fn({"w": w0}, lora, x, lora_rng=key), np.float64), want, rtol=1e-4, atol=1e-4)
    g = jax.grad(lambda l: jnp.sum(fn({"w": w0}, l, x, lora_rng=key) ** 2))(lora)
    dy = 2 * want
    np.testing.assert_allclose(np.asarray(g["w"]["A"], np.float64), xd.T @ dy @ b64.T, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(g["w"]["B"], np.float64), (xd @ a64).T @ dy, rtol=1e-4, atol=1e-3)


def test_grouped_conv_runs_lazily():
    m = nn.Conv(4, (3,), feature_group_count=2)
    x = normal(6, 2, 7, 4)
    params = init(m, x)
    cfg = jlora.LoraConfig(rank=2, targets=".*kernel")
    frozen, lora = lora_init(params, cfg, m.apply, (x,))
    assert lora["params"]["kernel"]["A"].shape == (2, 3, 2, 1)  # (groups, k, cin per group, r per group)
    y = jlora.lora_apply(m.apply, cfg, "lazy", strict=True)(frozen, lora, x)
    close(y, jlora.lora_apply(m.apply, cfg, "merged")(frozen, lora, x), rtol=1e-5, what="grouped conv")


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
