"""Core invariants against an independent float64 NumPy computation."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpr_walk import out_shapes as _out_shapes
import jlora

KEY = jax.random.key(0)


def randomize(lora, seed=1, scale=0.3):
    """Non-zero factors, so the LoRA path matters."""
    leaves, tdef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tdef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def np_delta(a, b, n_stack, scale):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if n_stack:
        return scale * np.stack([np_delta(a[i], b[i], n_stack - 1, 1.0) for i in range(a.shape[0])])
    return scale * np.tensordot(a, b, axes=([a.ndim - 1], [0]))


def np_conv1d(x, w):
    """'SAME' 1-D conv, stride 1, NWC input, (k, cin, cout) kernel, float64."""
    k = w.shape[0]
    pad_l = (k - 1) // 2
    xp = np.pad(x, ((0, 0), (pad_l, k - 1 - pad_l), (0, 0)))
    return sum(np.einsum("bwc,co->bwo", xp[:, i : i + x.shape[1]], w[i]) for i in range(k))


class Mixed(nn.Module):
    """Every kernel kind in one model: embed, dense, DenseGeneral in/out, conv, einsum param."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(11, 8, name="emb")
        h = emb(ids)
        q = nn.DenseGeneral((2, 4), name="q")(h)
        h = nn.DenseGeneral(8, axis=(-2, -1), name="o")(q)
        h = nn.Conv(8, (3,), name="conv")(h)
        w = self.param("proj", nn.initializers.normal(0.3), (8, 6))
        h = jnp.einsum("bsd,de->bse", h, w)
        return nn.Dense(5, name="head")(h)


def mixed_reference(p, ids):
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)["params"]
    h = p["emb"]["embedding"][np.asarray(ids)]
    q = np.einsum("bsd,dhk->bshk", h, p["q"]["kernel"]) + p["q"]["bias"]
    h = np.einsum("bshk,hkd->bsd", q, p["o"]["kernel"]) + p["o"]["bias"]
    h = np_conv1d(h, p["conv"]["kernel"]) + p["conv"]["bias"]
    h = h @ p["proj"]
    return h @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.fixture(scope="module")
def mixed():
    model = Mixed()
    ids = jax.random.randint(jax.random.key(3), (2, 7), 0, 11)
    params = model.init(KEY, ids)
    cfg = jlora.LoraConfig(rank=2, alpha=3.0, targets=r".*/(emb/embedding|q/kernel|o/kernel|conv/kernel|proj)",
                           trainable=r".*/head/bias")
    frozen, lora = jlora.init(jax.random.key(1), params, cfg, apply_fn=model.apply, args=(ids,))
    return model, ids, params, cfg, frozen, lora


def test_splits_read_from_trace(mixed):
    _, _, _, cfg, frozen, lora = mixed
    info = jlora.adapted(frozen, lora, cfg)
    assert {p: (f.n_stack, f.n_in, f.rank) for p, f in info.items()} == {
        "params/emb/embedding": (0, 1, 2),
        "params/q/kernel": (0, 1, 2),
        "params/o/kernel": (0, 2, 2),
        "params/conv/kernel": (0, 2, 2),
        "params/proj": (0, 1, 2),
    }
    assert lora["params"]["conv"]["kernel"]["A"].shape == (3, 8, 2)  # a conv to r channels
    assert lora["params"]["conv"]["kernel"]["B"].shape == (2, 8)  # a 1x1 conv, true rank r
    assert lora["params"]["o"]["kernel"]["A"].shape == (2, 4, 2)


def test_output_unchanged_at_init(mixed):
    model, ids, params, cfg, frozen, lora = mixed
    # embedding A is zero, dense/conv B is zero
    emb = lora["params"]["emb"]["embedding"]
    assert float(jnp.abs(emb["A"]).max()) == 0 and float(jnp.abs(emb["B"]).max()) > 0
    assert float(jnp.abs(lora["params"]["q"]["kernel"]["B"]).max()) == 0
    fn = jlora.lora_apply(model.apply, cfg, mode="merged")
    np.testing.assert_array_equal(fn(frozen, lora, ids), model.apply(params, ids))


def test_merge_and_output_match_float64_reference(mixed):
    model, ids, params, cfg, frozen, lora = mixed
    lora = randomize(lora)
    merged = jlora.merge(frozen, lora, cfg)
    flat_m, flat_f, flat_l = (jlora.paths.flatten(t) for t in (merged, frozen, lora))
    for path, f in jlora.adapted(frozen, lora, cfg).items():
        ref = np.asarray(flat_f[path], np.float64) + np_delta(flat_l[path + "/A"], flat_l[path + "/B"], 0, 1.5)
        np.testing.assert_allclose(flat_m[path], ref, rtol=1e-6, atol=1e-6, err_msg=path)
    np.testing.assert_array_equal(flat_m["params/head/bias"], flat_l["params/head/bias"])
    out = jlora.lora_apply(model.apply, cfg, mode="merged")(frozen, lora, ids)
    np.testing.assert_allclose(out, mixed_reference(merged, ids), rtol=2e-5, atol=2e-5)


def test_unmerge_inverts_merge_within_two_roundings(mixed):
    _, _, params, cfg, frozen, lora = mixed
    lora = randomize(lora)
    merged = jlora.merge(frozen, lora, cfg)
    back = jlora.paths.flatten(jlora.unmerge(merged, lora, cfg))
    flat_m = jlora.paths.flatten(merged)
    for path in jlora.adapted(frozen, lora, cfg):
        w0 = np.asarray(jlora.paths.flatten(frozen)[path], np.float64)
        # merge rounds W0 + d once to f32 and unmerge rounds (W0 + d) - d once: 2 half-ulps of the largest
        bound = np.finfo(np.float32).eps * np.maximum(np.abs(w0), np.abs(np.asarray(flat_m[path], np.float64)))
        err = np.abs(np.asarray(back[path], np.float64) - w0)
        assert np.all(err <= bound + 1e-30), (path, float(err.max()))


def test_inputs_never_mutated(mixed):
    _, _, params, cfg, frozen, lora = mixed
    lora = randomize(lora)
    before = jax.tree.map(np.array, (frozen, lora))
    jlora.unmerge(jlora.merge(frozen, lora, cfg), lora, cfg)
    chex.assert_trees_all_equal(before, jax.tree.map(np.array, (frozen, lora)))


def test_gradients_reach_only_lora_and_step_never_retraces(mixed):
    model, ids, params, cfg, frozen, lora = mixed
    fn = jlora.lora_apply(model.apply, cfg, mode="merged")
    tx = jlora.optimizer(optax.adamw(1e-2), lora)
    opt_state = tx.init(lora)
    n_state = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim)
    assert n_state == 2 * sum(x.size for x in jax.tree.leaves(lora))  # adam mu and nu, lora only

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(lora, opt_state):
        loss, grads = jax.value_and_grad(lambda l: jnp.mean(fn(frozen, l, ids) ** 2))(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    losses = []
    for _ in range(5):
        lora, opt_state, loss = step(lora, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    # optimising a (frozen, lora) container: no state and a zero update for every frozen leaf
    g = jax.grad(lambda t: jnp.mean(fn(t[0], t[1], ids) ** 2))((frozen, lora))
    tx2 = jlora.optimizer(optax.adam(1e-2), lora)
    st2 = tx2.init((frozen, lora))
    upd, _ = tx2.update(g, st2, (frozen, lora))
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(upd[0]))
    assert sum(x.size for x in jax.tree.leaves(st2) if x.ndim) == n_state


@pytest.mark.parametrize("mode", ["lazy", "merged"])
def test_lora_gradients_match_float64_and_no_frozen_gradient_is_formed(mode):
    """d loss / d(A, B) against the float64 chain rule; lazy mode never forms a kernel-shaped gradient."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8)).astype(np.float32)  # (T, in): no shape (8, 12) except the kernel's
    w0 = rng.standard_normal((8, 12)).astype(np.float32)
    bias = rng.standard_normal(12).astype(np.float32)
    a = rng.standard_normal((8, 3)).astype(np.float32)
    b = rng.standard_normal((3, 12)).astype(np.float32)
    cfg = jlora.LoraConfig(rank=3, alpha=6.0, targets="w")  # scale 2
    frozen = {"w": jnp.asarray(w0), "b": jnp.asarray(bias)}
    lora = {"w": {"A": jnp.asarray(a), "B": jnp.asarray(b)}}
    fn = jlora.lora_apply(lambda p, x: jnp.tanh(x @ p["w"] + p["b"]), cfg, mode)
    loss = lambda l: jnp.sum(fn(frozen, l, jnp.asarray(x)) ** 2)  # noqa: E731
    g = jax.grad(loss)(lora)
    x64, w64, a64, b64 = (v.astype(np.float64) for v in (x, w0, a, b))
    y = np.tanh(x64 @ (w64 + 2.0 * a64 @ b64) + bias)
    dz = 2 * y * (1 - y**2)  # d loss / d pre-activation
    dw = x64.T @ dz  # d loss / d W (8, 12): what the frozen kernel's gradient would be
    np.testing.assert_allclose(np.asarray(g["w"]["A"], np.float64), 2.0 * dw @ b64.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g["w"]["B"], np.float64), 2.0 * a64.T @ dw, rtol=1e-4, atol=1e-5)
    # the low-rank path: nothing of the kernel's shape is computed, forward or backward (merged forms W0 + delta
    # and its gradient: the walk below must find those)
    found = [s for s in _out_shapes(jax.make_jaxpr(jax.grad(loss))(lora).jaxpr) if s in ((8, 12), (12, 8))]
    assert bool(found) == (mode == "merged"), found


def test_lora_plus_scales_b_updates():
    lora = {"k": {"A": jnp.ones((3, 1)), "B": jnp.ones((1, 3))}}
    grads = jax.tree.map(jnp.ones_like, lora)
    plain = jlora.optimizer(optax.sgd(0.1), lora)
    plus = jlora.optimizer(optax.sgd(0.1), lora, b_lr_ratio=16.0)
    u1, _ = plain.update(grads, plain.init(lora), lora)
    u2, _ = plus.update(grads, plus.init(lora), lora)
    np.testing.assert_allclose(u2["k"]["A"], u1["k"]["A"])
    np.testing.assert_allclose(u2["k"]["B"], 16 * u1["k"]["B"])


def test_init_on_abstract_shapes_allocates_nothing():
    # a 70B-style plan: 80 layers of 8192x8192 q/v kernels, never allocated
    params = {"params": {f"layer_{i}": {"q": {"kernel": jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16)},
                                        "v": {"kernel": jax.ShapeDtypeStruct((8192, 1024), jnp.bfloat16)}}
                         for i in range(80)}}
    cfg = jlora.LoraConfig(rank=16, targets=r".*/(q|v)/kernel")
    frozen, lora = jax.eval_shape(lambda p: jlora.init(KEY, p, cfg), params)
    s = jlora.summary(frozen, lora)
    assert s.trainable == 80 * 16 * (8192 + 8192 + 8192 + 1024)
    assert lora["params"]["layer_3"]["v"]["kernel"]["B"].shape == (16, 1024)


def test_stacked_scan_kernels_get_layer_axis():
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return jnp.tanh(nn.Dense(6, name="fc")(h)), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scan(name="layers")(x, None)[0]

    model, x = Stack(), jnp.ones((2, 6))
    params = model.init(KEY, x)
    cfg = jlora.LoraConfig(rank=2, targets=r".*/fc/kernel")
    frozen, lora = jlora.init(KEY, params, cfg, apply_fn=model.apply, args=(x,))
    a = lora["params"]["layers"]["fc"]["kernel"]["A"]
    assert a.shape == (3, 6, 2) and lora["params"]["layers"]["fc"]["kernel"]["B"].shape == (3, 2, 6)
    assert not np.allclose(a[0], a[1])  # each layer its own init
    lora = randomize(lora)
    merged = jlora.merge(frozen, lora, cfg)
    k = lora["params"]["layers"]["fc"]["kernel"]
    ref = np.asarray(params["params"]["layers"]["fc"]["kernel"], np.float64) + np_delta(k["A"], k["B"], 1, 16 / 2)
    np.testing.assert_allclose(merged["params"]["layers"]["fc"]["kernel"], ref, rtol=1e-5, atol=1e-6)


def test_fused_qkv_adapts_only_enabled_groups():
    params = {"qkv": {"kernel": jax.random.normal(KEY, (4, 12))}}
    cfg = jlora.LoraConfig(rank=2, alpha=2, targets=".*kernel", fused={".*qkv.*": (True, False, True)})
    frozen, lora = jlora.init(KEY, params, cfg)
    assert lora["qkv"]["kernel"]["A"].shape == (4, 4) and lora["qkv"]["kernel"]["B"].shape == (2, 2, 4)
    lora = randomize(lora)
    d = np.asarray(jlora.delta(frozen, lora, cfg)["qkv/kernel"])
    a = np.asarray(lora["qkv"]["kernel"]["A"], np.float64)
    b = np.asarray(lora["qkv"]["kernel"]["B"], np.float64)
    np.testing.assert_allclose(d[:, 0:4], a[:, :2] @ b[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(d[:, 4:8], 0.0)
    np.testing.assert_allclose(d[:, 8:12], a[:, 2:] @ b[1], rtol=1e-5, atol=1e-6)


def test_nnx_state_round_trip():
    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    graphdef, state = nnx.split(model)
    x = jax.random.normal(KEY, (5, 4))

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    cfg = jlora.LoraConfig(rank=2, targets=r"layers/\d+/kernel")
    frozen, lora = jlora.init(KEY, state, cfg, apply_fn=apply, args=(x,))
    assert set(jlora.paths.flatten(lora)) == {"layers/0/kernel/A", "layers/0/kernel/B", "layers/2/kernel/A", "layers/2/kernel/B"}
    lora = randomize(lora)
    merged = jlora.merge(frozen, lora, cfg)
    assert type(merged) is type(state)
    got = jlora.lora_apply(apply, cfg, mode="merged")(frozen, lora, x)
    p = {k: np.asarray(v, np.float64) for k, v in jlora.paths.flatten(merged).items()}
    ref = np.maximum(np.asarray(x, np.float64) @ p["layers/0/kernel"] + p["layers/0/bias"], 0) @ p["layers/2/kernel"] + p["layers/2/bias"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_bf16_base_merge_sums_in_f32():
    w0 = jnp.full((4, 4), 1.0, jnp.bfloat16)
    lora = {"w": {"A": jnp.full((4, 1), 1e-3, jnp.float32), "B": jnp.ones((1, 4), jnp.float32)}}
    cfg = jlora.LoraConfig(rank=1, alpha=1, targets="w")
    m = jlora.merge({"w": w0}, lora, cfg)["w"]
    assert m.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(m, np.float32), np.asarray(jnp.asarray(1.001, jnp.bfloat16), np.float32))


def test_deterministic_per_key_and_distinct_per_leaf():
    params = {"a": {"kernel": jnp.ones((8, 8))}, "b": {"kernel": jnp.ones((8, 8))}}
    cfg = jlora.LoraConfig(rank=2, targets=".*kernel")
    _, l1 = jlora.init(KEY, params, cfg)
    _, l2 = jlora.init(KEY, params, cfg)
    _, l3 = jlora.init(jax.random.key(9), params, cfg)
    chex.assert_trees_all_equal(l1, l2)
    assert not np.allclose(l1["a"]["kernel"]["A"], l1["b"]["kernel"]["A"])
    assert not np.allclose(l1["a"]["kernel"]["A"], l3["a"]["kernel"]["A"])
    bound = 1 / np.sqrt(8)  # PEFT's kaiming_uniform(a=sqrt(5)) bound
    assert float(jnp.abs(l1["a"]["kernel"]["A"]).max()) <= bound


def test_summary_counts_and_table(mixed):
    _, _, params, _, frozen, lora = mixed
    s = jlora.summary(frozen, lora, per_path=True)
    assert s.trainable == sum(x.size for x in jax.tree.leaves(lora))
    assert s.frozen == sum(x.size for x in jax.tree.leaves(params))
    text = str(s)
    assert "params/conv/kernel/A" in text and "trainable share" in text


@pytest.mark.parametrize("base_dtype", [jnp.bfloat16, jnp.float16])
def test_factors_default_to_float32_over_a_half_precision_base(base_dtype):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((16, 24)).astype(np.float32)
    frozen = {"w": jnp.asarray(w0, base_dtype)}
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets="w", use_dora=False)
    _, lora = jlora.init(KEY, frozen, cfg)
    assert {x.dtype for x in jax.tree.leaves(lora)} == {jnp.dtype(jnp.float32)}
    _, half = jlora.init(KEY, frozen, cfg, dtype=base_dtype)  # explicit: half-size factors
    assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(base_dtype)}
    _, dlora = jlora.init(KEY, frozen, cfg.replace(use_dora=True))
    assert dlora["w"]["m"].dtype == jnp.float32
    a = rng.standard_normal((16, 4)).astype(np.float32) * 0.3
    b = rng.standard_normal((4, 24)).astype(np.float32) * 0.3
    lora = {"w": {"A": jnp.asarray(a), "B": jnp.asarray(b)}}
    x = rng.standard_normal((8, 16)).astype(np.float32)
    xb = jnp.asarray(x, base_dtype)
    y = jlora.lora_apply(lambda p, x: x @ p["w"], cfg, "lazy")(frozen, lora, xb)
    assert y.dtype == base_dtype  # the output keeps the base's dtype
    # float64 reference from the rounded base and input: the f32 branch adds no error beyond one final rounding
    x64, w64 = np.asarray(xb, np.float64), np.asarray(frozen["w"], np.float64)
    want = x64 @ w64 + 2.0 * (x64 @ a.astype(np.float64)) @ b.astype(np.float64)
    eps = float(jnp.finfo(base_dtype).eps)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=0, atol=4 * eps * np.abs(want).max())
