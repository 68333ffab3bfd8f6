"""Many adapters over one base: mixed batches, switching without retracing, exact combination."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import multi

KEY = jax.random.key(0)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(16, name="fc1")(x))
        h = jnp.tanh(nn.Dense(16, name="fc2")(h))
        return nn.Dense(4, name="head")(h)


def randomize(lora, seed):
    leaves, tdef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tdef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def setup():
    model, x = Net(), jax.random.normal(KEY, (6, 8))
    params = model.init(KEY, x)
    cfgs = {
        "sql": jlora.LoraConfig(rank=2, alpha=4, targets=r".*/fc1/kernel"),
        "chat": jlora.LoraConfig(rank=4, alpha=2, targets=r".*/fc[12]/kernel", rslora=True),
        "code": jlora.LoraConfig(rank=3, alpha=6, targets=r".*/(fc2|head)/kernel", rank_pattern={r".*/head/.*": 1}),
    }
    adapters = {}
    for i, (name, cfg) in enumerate(cfgs.items()):
        frozen, lora = jlora.init(KEY, params, cfg)
        adapters[name] = (randomize(lora, i + 1), cfg)
    return model, x, params, adapters


# each adapter's scale by hand: alpha / r, rslora alpha / sqrt(r); per layer (fc1, fc2, head)
SCALES = {"sql": {"fc1": 4 / 2}, "chat": {"fc1": 2 / 4**0.5, "fc2": 2 / 4**0.5}, "code": {"fc2": 6 / 3, "head": 6 / 1}}


def np_kernels(params, adapters, name):
    """Each layer's kernel W0 + s A B for adapter ``name`` (None: the base), in float64 NumPy."""
    out = {}
    for layer in ("fc1", "fc2", "head"):
        w = np.asarray(params["params"][layer]["kernel"], np.float64)
        if name is not None and layer in SCALES[name]:
            f = adapters[name][0]["params"][layer]["kernel"]
            w = w + SCALES[name][layer] * np.asarray(f["A"], np.float64) @ np.asarray(f["B"], np.float64)
        out[layer] = w
    return out


def np_net(params, adapters, name, x):
    """Net's forward for one adapter, float64 NumPy."""
    k = np_kernels(params, adapters, name)
    b = {layer: np.asarray(params["params"][layer]["bias"], np.float64) for layer in k}
    h = np.tanh(np.asarray(x, np.float64) @ k["fc1"] + b["fc1"])
    h = np.tanh(h @ k["fc2"] + b["fc2"])
    return h @ k["head"] + b["head"]


def np_mixed(params, adapters, names, ids, x):
    return np.stack([np_net(params, adapters, None if i == len(names) else names[i], x[row])
                     for row, i in enumerate(list(ids))])


@pytest.mark.parametrize("mode", ["merged", "lazy", "rows"])
def test_mixed_batch_equals_each_example_with_its_own_adapter(setup, mode):
    model, x, params, adapters = setup
    s = multi.stack(params, adapters)
    ids = jnp.array([0, 1, 2, s.base_id, 1, 0])
    got = jax.jit(multi.mixed_apply(model.apply, s.config, mode=mode))(params, s.lora, ids, x)
    np.testing.assert_allclose(got, np_mixed(params, adapters, s.names, ids.tolist(), x), rtol=1e-5, atol=1e-5)


def test_out_of_range_ids_raise_and_never_pick_another_adapter(setup):
    model, x, params, adapters = setup
    s = multi.stack(params, adapters)
    fn = multi.mixed_apply(model.apply, s.config)
    for bad in ([0, 1, 2, 3, 4, 0], [0, 1, 2, -1, 1, 0]):  # 4 > base_id = 3; -1 is not the base entry
        with pytest.raises(ValueError, match=r"adapter_ids must be in \[0, 3\]"):
            fn(params, s.lora, jnp.array(bad), x)
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"adapter_ids must be in \[0, 3\]"):
            jax.block_until_ready(jax.jit(fn)(params, s.lora, jnp.array(bad), x))
    with pytest.raises(ValueError, match=r"index must be in \[0, 3\].*got \[-1\]"):
        multi.select(s, -1)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"index must be in \[0, 3\].*got \[7\]"):
        jax.block_until_ready(jax.jit(lambda i: multi.select(s, i))(7))


def test_any_mix_and_any_switch_compiles_once(setup):
    model, x, params, adapters = setup
    s = multi.stack(params, adapters)
    fn = multi.mixed_apply(model.apply, s.config, mode="lazy")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def serve(stacked, ids, x):
        return fn(params, stacked, ids, x)

    for ids in ([0] * 6, [1, 2, 0, 3, 3, 1], [2] * 6):
        got = serve(s.lora, jnp.array(ids), x)
        np.testing.assert_allclose(got, np_mixed(params, adapters, s.names, ids, x), rtol=1e-5, atol=1e-5)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def merged_for(index):  # single-task serving: merge adapter `index` from W0, never unmerge
        return jlora.merge(params, multi.select(s, index), s.config)

    for name in ("sql", "chat", "code", "sql"):
        m = merged_for(s.id(name))
        for layer, want in np_kernels(params, adapters, name).items():
            np.testing.assert_allclose(m["params"][layer]["kernel"], want, rtol=1e-5, atol=1e-6, err_msg=layer)


def np_total(params, adapters, weights):
    total = {}
    for (lora, cfg), w in zip(adapters, weights):
        for p, d in jlora.delta(params, lora, cfg).items():
            total[p] = total.get(p, 0) + w * np.asarray(d, np.float64)
    return total


def test_cat_is_the_exact_weighted_sum(setup):
    _, _, params, adapters = setup
    pairs, weights = list(adapters.values()), [0.5, 1.5, -1.0]
    lora, cfg, errors = multi.combine(params, pairs, weights, "cat")
    got = jlora.delta(params, lora, cfg)
    for p, want in np_total(params, pairs, weights).items():
        np.testing.assert_allclose(got[p], want, rtol=1e-5, atol=1e-6, err_msg=p)
        assert errors[p] == 0.0
    assert jlora.adapted(params, lora, cfg)["params/fc2/kernel"].rank == 4 + 3


def test_svd_error_is_the_discarded_singular_values(setup):
    _, _, params, adapters = setup
    pairs, weights = list(adapters.values()), [1.0, 1.0, 1.0]
    lora, cfg, errors = multi.combine(params, pairs, weights, "svd", rank=2)
    got = jlora.delta(params, lora, cfg)
    for p, want in np_total(params, pairs, weights).items():
        sv = np.linalg.svd(want, compute_uv=False)
        np.testing.assert_allclose(errors[p], np.sqrt(np.sum(sv[2:] ** 2)), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.linalg.norm(want - np.asarray(got[p], np.float64)), errors[p], rtol=1e-3, atol=1e-6)


def test_linear_reports_its_cross_term_error(setup):
    _, _, params, _ = setup
    cfg = jlora.LoraConfig(rank=2, alpha=2, targets=r".*/fc1/kernel")
    pairs = [(randomize(jlora.init(KEY, params, cfg)[1], s), cfg) for s in (7, 8)]
    lora, ccfg, errors = multi.combine(params, pairs, [1.0, 1.0], "linear")
    want = np_total(params, pairs, [1.0, 1.0])["params/fc1/kernel"]
    got = np.asarray(jlora.delta(params, lora, ccfg)["params/fc1/kernel"], np.float64)
    np.testing.assert_allclose(errors["params/fc1/kernel"], np.linalg.norm(want - got), rtol=1e-4)
    assert errors["params/fc1/kernel"] > 0  # the cross terms are real


def test_bad_input():
    with pytest.raises(ValueError, match="needs a positive target rank"):
        multi.combine({"w": jnp.zeros((2, 2))}, [({"w": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2))}},
                      jlora.LoraConfig(rank=1, targets="w"))], [1.0], "svd")
    s = multi.Stack({}, jlora.LoraConfig(targets=".*"), ("a",))
    with pytest.raises(ValueError, match=r"no adapter named 'b'; the stack holds \['a'\]"):
        s.id("b")


def test_dora_adapters_are_refused_not_dropped(setup):
    _, _, params, adapters = setup
    cfg = jlora.LoraConfig(rank=2, targets=r".*/fc1/kernel", use_dora=True)
    _, lora = jlora.init(KEY, params, cfg)
    with pytest.raises(ValueError, match="carries a DoRA magnitude"):
        multi.stack(params, {"dora": (lora, cfg), **adapters})
    with pytest.raises(ValueError, match="carries a DoRA magnitude"):
        multi.combine(params, [(lora, cfg)], [1.0], "cat")


def test_hot_swap_never_recompiles(setup):
    """Same shapes, same paths, same dtypes: any mix of ids, any slot, another stack, a new adapter put in a slot."""
    model, x, params, adapters = setup
    s = multi.stack(params, adapters, rank=4)  # every path padded to rank 4: stacks of these adapters share shapes
    fn = multi.mixed_apply(model.apply, s.config)
    traces = []

    @jax.jit
    def serve(stacked, ids, x):
        traces.append(1)  # runs only when jax traces (compiles) again
        return fn(params, stacked, ids, x)

    def check(st, ads, ids):
        names = list(st.names)
        got = serve(st.lora, jnp.array(ids), x)
        np.testing.assert_allclose(got, np_mixed(params, ads, names, ids, x), rtol=1e-5, atol=1e-5)

    check(s, adapters, [0, 1, 2, 3, 1, 0])
    check(s, adapters, [2, 2, 2, 2, 2, 2])  # another mix
    reordered = {k: adapters[k] for k in ("code", "sql", "chat")}
    check(multi.stack(params, reordered, rank=4), reordered, [0, 1, 2, 0, 1, 3])  # another stack, same shapes
    _, lora = jlora.init(jax.random.key(5), params, adapters["chat"][1])  # a freshly trained "chat" into its slot
    fresh = dict(adapters, chat=(randomize(lora, 9), adapters["chat"][1]))
    check(multi.put(s, "chat", params, *fresh["chat"]), fresh, [1, 1, 0, 2, 3, 1])
    assert len(traces) == 1 and serve._cache_size() == 1
    small = multi.stack(params, {"sql": adapters["sql"]})  # rank 2 at fc1 only
    with pytest.raises(ValueError, match=r"has leaves the stack lacks: \['params/fc2/kernel/A'"):
        multi.put(small, "sql", params, *adapters["chat"])
    cfg4 = jlora.LoraConfig(rank=4, targets=r".*/fc1/kernel")
    with pytest.raises(ValueError, match=r"has rank 4 at 'params/fc1/kernel', the stack 2.*fix: .*rank="):
        multi.put(small, "sql", params, jlora.init(KEY, params, cfg4)[1], cfg4)


class Decoder(nn.Module):  # one decode step: (token embedding, recurrent cache) -> (logits, new cache)
    @nn.compact
    def __call__(self, x, cache, temperature=1.0):
        h = jnp.tanh(nn.Dense(16, name="fc1")(x) + nn.Dense(16, name="fc2", use_bias=False)(cache["h"]))
        return nn.Dense(4, name="head")(h) / temperature, {"h": h}


def test_decode_loop_with_four_adapters_in_one_batch():
    """Generation calls mixed_apply's function per step: batched args (tokens, cache) on axis 0, shared kwargs."""
    model = Decoder()
    x, cache = jax.random.normal(KEY, (4, 8)), {"h": jnp.zeros((4, 16))}
    params = model.init(KEY, x, cache)
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=r".*/(fc1|fc2|head)/kernel")
    adapters = {f"user{i}": (randomize(jlora.init(jax.random.key(i), params, cfg)[1], i), cfg) for i in range(4)}
    s = multi.stack(params, adapters)
    ids = jnp.array([3, 0, 2, 1])
    step = multi.mixed_apply(model.apply, s.config)

    @jax.jit
    def generate(stacked, ids, x, cache):
        def body(_, carry):
            x, cache = carry
            logits, cache = step(params, stacked, ids, x, cache, temperature=0.5)
            return jnp.tile(logits, (1, 2)), cache  # the next "token embedding"
        return jax.lax.fori_loop(0, 3, body, (x, cache))

    got = generate(s.lora, ids, x, cache)
    single = jax.jit(jlora.lora_apply(model.apply, cfg), static_argnames="temperature")
    for row, i in enumerate(ids.tolist()):
        xe, ce = x[row : row + 1], {"h": cache["h"][row : row + 1]}
        for _ in range(3):
            logits, ce = single(params, adapters[f"user{i}"][0], xe, ce, temperature=0.5)
            xe = jnp.tile(logits, (1, 2))
        np.testing.assert_allclose(got[0][row], xe[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[1]["h"][row], ce["h"][0], rtol=1e-5, atol=1e-5)


def test_bgmv_and_sgmv_kernels_equal_the_per_row_product():
    rng = np.random.default_rng(0)
    x, a, b = rng.standard_normal((7, 5)), rng.standard_normal((4, 5, 2)), rng.standard_normal((4, 2, 3))
    ids = np.array([3, 0, 2, 2, 0, 1, 3])
    want = np.stack([x[t] @ a[i] @ b[i] for t, i in enumerate(ids)])
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    for kernel in (multi.gathered_lowrank, multi.grouped_lowrank):
        got = jax.jit(kernel)(f32(x), jnp.asarray(ids), f32(a), f32(b))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=kernel.__name__)
    with pytest.raises(ValueError, match=r"grouped_lowrank: expected x \(rows, in\).*got x \(7, 5\), ids \(6,\).*fix"):
        multi.grouped_lowrank(f32(x), jnp.asarray(ids[:6]), f32(a), f32(b))
    with pytest.raises(ValueError, match=r"does not record its adapters' configs"):
        multi.unstack(multi.Stack({}, jlora.LoraConfig(targets=".*"), ("a",)))


def test_rows_mode_gradients_and_refusals(setup):
    model, x, params, adapters = setup
    s = multi.stack(params, adapters, fold_scales=False)
    ids = jnp.array([0, 1, 2, 3, 1, 0])

    def loss(lora, mode):
        return jnp.sum(multi.mixed_apply(model.apply, s.config, mode=mode)(params, multi.scaled(lora, s.scales), ids, x) ** 2)

    for a, b in zip(jax.tree.leaves(jax.grad(loss)(s.lora, "rows")), jax.tree.leaves(jax.grad(loss)(s.lora, "lazy"))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"mode='rows'.*'params/fc1/kernel' is used by primitive 'reduce_sum'.*fix: use mode='lazy'"):
        multi.mixed_apply(lambda p, x: x * p["params"]["fc1"]["kernel"].sum(), s.config, mode="rows")(params, s.lora, ids, x)
    with pytest.raises(ValueError, match=r"without the 6 examples on axis 0.*fix"):
        multi.mixed_apply(lambda p, x: model.apply(p, x.T[:, :6].T.reshape(2, 3, 8)), s.config, mode="rows")(
            params, s.lora, ids, x)
