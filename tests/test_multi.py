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


@pytest.mark.parametrize("mode", ["merged", "lazy"])
def test_mixed_batch_equals_each_example_with_its_own_adapter(setup, mode):
    model, x, params, adapters = setup
    s = multi.stack(params, adapters)
    ids = jnp.array([0, 1, 2, s.base_id, 1, 0])
    got = jax.jit(multi.mixed_apply(model.apply, s.config, mode=mode))(params, s.lora, ids, x)
    for row, i in enumerate(ids.tolist()):
        if i == s.base_id:
            want = model.apply(params, x[row : row + 1])
        else:
            lora, cfg = adapters[s.names[i]]
            want = model.apply(jlora.merge(params, lora, cfg), x[row : row + 1])
        np.testing.assert_allclose(got[row], want[0], rtol=1e-5, atol=1e-5)


def test_any_mix_and_any_switch_compiles_once(setup):
    model, x, params, adapters = setup
    s = multi.stack(params, adapters)
    fn = multi.mixed_apply(model.apply, s.config, mode="lazy")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def serve(stacked, ids, x):
        return fn(params, stacked, ids, x)

    for ids in ([0] * 6, [1, 2, 0, 3, 3, 1], [2] * 6):
        serve(s.lora, jnp.array(ids), x)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def merged_for(index):  # single-task serving: merge adapter `index` from W0, never unmerge
        return jlora.merge(params, multi.select(s, index), s.config)

    for name in ("sql", "chat", "code", "sql"):
        m = merged_for(s.id(name))
        lora, cfg = adapters[name]
        chex.assert_trees_all_close(m, jlora.merge(params, lora, cfg), rtol=1e-6, atol=1e-6)


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
    with pytest.raises(ValueError, match="give the target rank"):
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
