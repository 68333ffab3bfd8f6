"""Mixed-adapter training: one jitted step over a batch mixing adapters equals training each alone."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import multi, paths

KEY = jax.random.key(0)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(16, name="fc1")(x))
        h = jnp.tanh(nn.Dense(16, name="fc2")(h))
        return nn.Dense(4, name="head")(h)


CFGS = {
    "sql": jlora.LoraConfig(rank=2, alpha=4, targets=r".*/fc1/kernel"),
    "chat": jlora.LoraConfig(rank=4, alpha=2, targets=r".*/fc[12]/kernel", rslora=True),
    "code": jlora.LoraConfig(rank=3, alpha=6, targets=r".*/(fc2|head)/kernel", rank_pattern={r".*/head/.*": 1}),
}


def loss_fn(y, t):
    return jnp.sum((y - t) ** 2, axis=-1)  # one loss per example


def optimizer():  # global-norm clipping (not elementwise) + adamw: per adapter only when vmapped
    return optax.chain(optax.clip_by_global_norm(0.05), optax.adamw(1e-2, weight_decay=0.1))


@pytest.fixture(scope="module")
def setup():
    model = Net()
    params = model.init(KEY, jnp.zeros((1, 8)))
    adapters = {}
    for i, (name, cfg) in enumerate(CFGS.items()):
        _, lora = jlora.init(jax.random.key(i + 1), params, cfg)
        leaves, tdef = jax.tree.flatten(lora)
        keys = jax.random.split(jax.random.key(10 + i), len(leaves))
        adapters[name] = (jax.tree.unflatten(tdef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]), cfg)
    return model, params, adapters


BATCHES = [  # ids per example (3 = base: trains nothing); step 2 has no "code" example
    [0, 1, 2, 0, 1, 1, 3, 0],
    [1, 0, 0, 1, 3, 1, 0, 1],
    [2, 2, 1, 0, 2, 1, 0, 3],
]


def data(step):
    kx, kt = jax.random.split(jax.random.key(100 + step))
    return jax.random.normal(kx, (8, 8)), jax.random.normal(kt, (8, 4))


def alone(model, params, lora, cfg, steps):
    """Training one adapter by itself on its own examples (mean loss), plain optax."""
    fwd = jlora.lora_apply(model.apply, cfg)
    opt = optimizer()
    state = opt.init(lora)
    grads_first = None

    @jax.jit
    def step(lora, state, x, t):
        g = jax.grad(lambda lo: jnp.mean(loss_fn(fwd(params, lo, x), t)))(lora)
        u, state = opt.update(g, state, lora)
        return optax.apply_updates(lora, u), state, g

    for rows, (x, t) in steps:
        if not rows:
            continue  # no example of this adapter: no step
        rows = np.array(rows)
        lora, state, g = step(lora, state, x[rows], t[rows])
        grads_first = g if grads_first is None else grads_first
    return lora, grads_first


def test_mixed_step_equals_each_adapter_trained_alone(setup):
    model, params, adapters = setup
    s = multi.stack(params, adapters, fold_scales=False)
    step = jax.jit(multi.train_step(model.apply, s, loss_fn, optimizer()))
    state = multi.per_adapter(optimizer()).init(s.lora)
    lora = s.lora
    # the first step's gradient of the mixed loss, per adapter, against the adapter alone
    ids0 = jnp.array(BATCHES[0])
    x0, t0 = data(0)
    fwd = multi.mixed_apply(model.apply, s.config)
    w = multi.example_weights(ids0, s.base_id + 1)
    g_mixed = jax.grad(lambda lo: jnp.sum(w * loss_fn(fwd(params, multi.scaled(lo, s.scales), ids0, x0), t0)))(lora)
    for k, ids in enumerate(BATCHES):  # compiled once for any mix
        x, t = data(k)
        lora, state, losses = step(params, lora, state, jnp.array(ids), (x,), t)
    assert step._cache_size() == 1
    got = multi.unstack(s.replace(lora=lora), params)
    g_got = multi.unstack(s.replace(lora=g_mixed), params)
    for i, name in enumerate(s.names):
        steps = []
        for k, ids in enumerate(BATCHES):
            steps.append(([r for r, j in enumerate(ids) if j == i], data(k)))
        want, g_want = alone(model, params, *adapters[name], steps)
        for (p, a), (_, b) in zip(paths.flatten(g_got[name][0]).items(), paths.flatten(g_want).items()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"grad {name} {p}")
        flat_got, flat_want = paths.flatten(got[name][0]), paths.flatten(want)
        assert flat_got.keys() == flat_want.keys()
        for p in flat_want:
            np.testing.assert_allclose(flat_got[p], flat_want[p], rtol=1e-5, atol=1e-5, err_msg=f"{name} {p}")
    # padded ranks stay exactly zero, the base entry never moves
    a_fc1 = paths.flatten(lora)["params/fc1/kernel/A"]
    assert float(jnp.abs(a_fc1[0, :, 2:]).max()) == 0.0  # sql has rank 2 of the stack's 4
    assert all(float(jnp.abs(x[-1]).max()) == 0.0 for x in jax.tree.leaves(lora))


def test_global_norm_clipping_needs_the_per_adapter_optimizer():
    g = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}  # two adapters' gradients, norms 5 and 0.5
    clip = optax.clip_by_global_norm(1.0)
    per = multi.per_adapter(clip).update(g, multi.per_adapter(clip).init(g))[0]["w"]
    np.testing.assert_allclose(per, [[0.6, 0.8], [0.3, 0.4]], rtol=1e-6)  # each adapter clipped alone
    shared = clip.update(g, clip.init(g))[0]["w"]
    assert not np.allclose(shared[1], [0.3, 0.4])  # over the stacked tree: adapter 1 is scaled by adapter 0's norm
    adam = optax.adam(0.1)  # elementwise: the same either way
    np.testing.assert_allclose(adam.update(g, adam.init(g))[0]["w"],
                               multi.per_adapter(adam).update(g, multi.per_adapter(adam).init(g))[0]["w"], rtol=1e-6)


@pytest.mark.parametrize("fold", [False, True])
def test_unstack_save_restore_stack_and_one_adapter(setup, tmp_path, fold):
    _, params, adapters = setup
    s = multi.stack(params, adapters, fold_scales=fold, rank=5)
    back = multi.unstack(s, params)
    for name, (lora, cfg) in adapters.items():
        assert back[name][1] == cfg
        want, got = paths.flatten(lora), paths.flatten(back[name][0])
        assert want.keys() == got.keys()
        for p in want:
            np.testing.assert_allclose(got[p], want[p], rtol=1e-6, atol=1e-7, err_msg=p)
    multi.save_stack(tmp_path / "stack", s)
    r = multi.restore_stack(tmp_path / "stack", params)
    assert r.names == s.names and r.folded == fold
    for a, b in zip(jax.tree.leaves(r.lora), jax.tree.leaves(s.lora)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    lora, cfg, meta = jlora.restore_adapter(tmp_path / "stack" / "chat", frozen=params)
    assert cfg == adapters["chat"][1] and meta["stack_index"] == 1
    np.testing.assert_allclose(jlora.delta(params, lora, cfg)["params/fc2/kernel"],
                               jlora.delta(params, *adapters["chat"])["params/fc2/kernel"], rtol=1e-6, atol=1e-7)
    with pytest.raises(FileExistsError, match="already holds a stack"):
        multi.save_stack(tmp_path / "stack", s)


def test_training_stack_errors(setup):
    model, params, adapters = setup
    with pytest.raises(ValueError, match="scales folded into B.*fold_scales=False"):
        multi.train_step(model.apply, multi.stack(params, adapters), loss_fn, optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"rank=1 but adapters have larger ranks.*fix"):
        multi.stack(params, adapters, rank=1)
    s = multi.stack(params, adapters, fold_scales=False)
    step = multi.train_step(model.apply, s, lambda y, t: jnp.sum((y - t) ** 2), optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"one loss per example, shape \(2,\)"):
        step(params, s.lora, multi.per_adapter(optax.sgd(0.1)).init(s.lora), jnp.array([0, 1]),
             (jnp.ones((2, 8)),), jnp.ones((2, 4)))
