"""lora_apply(..., lora_scale=c): W0 + c·s·A⊗B from one tree, against a float64 NumPy forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(jnp.tanh(nn.Dense(5, name="hidden")(x)))


MODEL = Mlp()
X = jax.random.normal(jax.random.key(0), (4, 6))
PARAMS = MODEL.init(jax.random.key(1), X)
CFG = jlora.LoraConfig(rank=2, alpha=6, targets=r"params/.*/kernel")  # s = 3


def random_lora(seed):
    _, lora = jlora.init(jax.random.key(seed), PARAMS, CFG)
    leaves, tdef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree.unflatten(tdef, [0.4 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def np_forward(params, lora, c):
    """float64: tanh(x·(W1 + c·s·A1·B1) + b1)·(W2 + c·s·A2·B2) + b2."""
    p, l = params["params"], lora["params"]
    f64 = lambda a: np.asarray(a, np.float64)
    w = {k: f64(p[k]["kernel"]) + c * 3.0 * f64(l[k]["kernel"]["A"]) @ f64(l[k]["kernel"]["B"]) for k in p}
    h = np.tanh(f64(X) @ w["hidden"] + f64(p["hidden"]["bias"]))
    return h @ w["out"] + f64(p["out"]["bias"])


@pytest.mark.parametrize("mode", ["lazy", "merged"])
@pytest.mark.parametrize("c", [0.0, 0.5, 1.0, -2.0])
def test_scaled_update_matches_float64(mode, c):
    lora = random_lora(2)
    got = jlora.lora_apply(MODEL.apply, CFG, mode)(PARAMS, lora, X, lora_scale=c)
    np.testing.assert_allclose(np.asarray(got), np_forward(PARAMS, lora, c), rtol=1e-5, atol=1e-5)


def test_scale_zero_is_the_base_and_one_is_unscaled():
    lora = random_lora(3)
    fn = jlora.lora_apply(MODEL.apply, CFG)
    np.testing.assert_allclose(fn(PARAMS, lora, X, lora_scale=0.0), MODEL.apply(PARAMS, X), rtol=0, atol=1e-6)
    np.testing.assert_allclose(fn(PARAMS, lora, X, lora_scale=1.0), fn(PARAMS, lora, X), rtol=0, atol=1e-6)


def test_traced_scale_compiles_once_and_gradients_scale():
    fn = jlora.lora_apply(MODEL.apply, CFG)
    run = jax.jit(lambda lora, c: fn(PARAMS, lora, X, lora_scale=c))
    for seed, c in [(4, 0.0), (4, 1.0), (5, 0.25), (6, -1.0)]:
        lora = random_lora(seed)
        np.testing.assert_allclose(run(lora, c), np_forward(PARAMS, lora, c), rtol=1e-5, atol=1e-5)
    assert run._cache_size() == 1
    # d/dB of sum(y) at scale c is c times the gradient the unscaled adapter gets through B·c
    lora = random_lora(7)
    loss = lambda l, c: fn(PARAMS, l, X, lora_scale=c).sum()
    g_half = jax.grad(loss)(lora, 0.5)["params"]["out"]["kernel"]["A"]
    half_b = jax.tree.map(lambda x: x, lora)
    half_b["params"]["hidden"]["kernel"]["B"] = 0.5 * lora["params"]["hidden"]["kernel"]["B"]
    half_b["params"]["out"]["kernel"]["B"] = 0.5 * lora["params"]["out"]["kernel"]["B"]
    g_ref = jax.grad(lambda l: fn(PARAMS, l, X).sum())(half_b)["params"]["out"]["kernel"]["A"]
    np.testing.assert_allclose(g_half, g_ref, rtol=1e-5, atol=1e-6)


def test_refuses_dora_whole_leaves_and_non_scalars():
    dora_cfg = jlora.LoraConfig(rank=2, targets=r"params/.*/kernel", use_dora=True)
    _, dora = jlora.init(jax.random.key(0), PARAMS, dora_cfg)
    with pytest.raises(ValueError, match=r"params/hidden/kernel/.*DoRA kernel"):
        jlora.lora_apply(MODEL.apply, dora_cfg)(PARAMS, dora, X, lora_scale=0.0)
    whole_cfg = jlora.LoraConfig(rank=2, targets=r"params/.*/kernel", trainable=(r"params/out/bias",))
    _, whole = jlora.init(jax.random.key(0), PARAMS, whole_cfg)
    with pytest.raises(ValueError, match=r"'params/out/bias' is a trained-whole leaf"):
        jlora.lora_apply(MODEL.apply, whole_cfg)(PARAMS, whole, X, lora_scale=0.5)
    with pytest.raises(ValueError, match=r"lora_scale must be a scalar, got shape \(2,\)"):
        jlora.lora_apply(MODEL.apply, CFG)(PARAMS, random_lora(1), X, lora_scale=jnp.ones(2))
