"""jlora.trace._flat: dense LoRA outputs kept as (tokens, out) rows through the ops that follow them.

A function model exercising every row rule (bias add before the pending low-rank add, an
activation, broadcasts along features and along tokens, a residual with a model-shaped array, a
second LoRA dense and an un-adapted dense reading rows, a ``jit`` call, a reshape, a reduction
that needs the model's shape): outputs against a float64 NumPy reference (merged weights), the
factors' gradients against ``mode="merged"`` autodiff (the kernel W0 + s·A@B formed explicitly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpr_walk import eqns as _eqns
import jlora
from jlora.trace import _flat as lazy_flat

B, S, D, H = 2, 5, 8, 12
RNG = np.random.default_rng(0)


def _params():
    def n(*shape, scale=0.3):
        return jnp.asarray(RNG.normal(size=shape) * scale, jnp.float32)

    return {"w1": n(D, H), "b1": n(H), "g": n(H), "w2": n(H, D), "w3": n(D, D), "w4": n(D, 3)}


@jax.jit
def _scaled_gelu(h, g):
    return jax.nn.gelu(h, approximate=True) * g


def model(p, x):
    h = x @ p["w1"] + p["b1"]                            # LoRA dense, bias before the pending low add
    h = _scaled_gelu(h, p["g"][None, None, :])           # a jit call of elementwise ops, feature broadcast
    h = h * jnp.mean(x, axis=-1, keepdims=True)          # a per-token broadcast (B, S, 1)
    y = jnp.einsum("bsh,hd->bsd", h, p["w2"]) + x        # LoRA dense reading rows, residual (full array)
    u = jnp.tanh(y @ p["w3"])                            # un-adapted dense reading rows
    z = u.reshape(B, S * D)                              # one reshape from rows
    return z.sum(axis=-1)[:, None, None] * 0.1 + u[:, :, :3] @ p["w4"][:3]  # a reduction, a slice


def _np_model(p, x):
    gelu = lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))  # noqa: E731
    h = gelu(x @ p["w1"] + p["b1"]) * p["g"] * x.mean(-1, keepdims=True)
    u = np.tanh((h @ p["w2"] + x) @ p["w3"])
    return u.reshape(B, S * D).sum(-1)[:, None, None] * 0.1 + u[:, :, :3] @ p["w4"][:3]


def _setup():
    params = _params()
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=r"w[12]")
    frozen, lora = jlora.init(jax.random.key(0), params, cfg)
    lora = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(jax.random.key(3), a.shape), lora)
    x = jnp.asarray(RNG.normal(size=(B, S, D)), jnp.float32)
    return params, cfg, frozen, lora, x


def test_rows_match_float64_reference_and_merged_gradients():
    params, cfg, frozen, lora, x = _setup()
    lazy = jlora.lora_apply(model, cfg, mode="lazy")
    merged = jlora.lora_apply(model, cfg, mode="merged")
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for k in ("w1", "w2"):
        p64[k] = p64[k] + cfg.alpha / cfg.rank * np.asarray(lora[k]["A"], np.float64) @ np.asarray(lora[k]["B"], np.float64)
    want = _np_model(p64, np.asarray(x, np.float64))
    got = np.asarray(jax.jit(lazy)(frozen, lora, x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    loss = lambda fn: (lambda lo: jnp.sum(jnp.sin(fn(frozen, lo, x))))  # noqa: E731
    g_lazy, g_ref = jax.jit(jax.grad(loss(lazy)))(lora), jax.jit(jax.grad(loss(merged)))(lora)
    for path in ("w1", "w2"):
        for part in ("A", "B"):
            np.testing.assert_allclose(g_lazy[path][part], g_ref[path][part], rtol=2e-5, atol=1e-6,
                                       err_msg=f"{path}/{part}")


def test_the_lora_add_bias_and_activation_run_on_rows():
    """In the train step the bias add, the LoRA add and the activation read (tokens, features)
    arrays: no (B, S, H) add or tanh stands between the products and the activation."""
    _, cfg, frozen, lora, x = _setup()
    lazy = jlora.lora_apply(model, cfg, mode="lazy")
    step = jax.grad(lambda lo: jnp.sum(lazy(frozen, lo, x)))
    shapes = {(e.primitive.name, tuple(e.outvars[0].aval.shape)) for e in _eqns(jax.make_jaxpr(step)(lora).jaxpr)}
    assert ("add", (B * S, H)) in shapes and ("tanh", (B * S, H)) in shapes  # gelu's tanh on rows
    assert ("add", (B, S, H)) not in shapes and ("tanh", (B, S, H)) not in shapes


def test_elementwise_refuses_what_does_not_fit():
    """A Flat value meeting an array of another broadcast shape falls back to the model's shape."""
    rows = lazy_flat.Flat(jnp.ones((B * S, D)), (B, S, D))
    eqn = jax.make_jaxpr(lambda a, b: a * b)(jnp.ones((B, S, D)), jnp.ones((B, 1, D))).eqns[0]
    assert lazy_flat.elementwise(eqn, [rows, jnp.ones((B, 1, D))]) is None
    eqn = jax.make_jaxpr(lambda a, b: a * b)(jnp.ones((B, S, D)), jnp.ones((1, 1, D))).eqns[0]
    (out,) = lazy_flat.elementwise(eqn, [rows, jnp.full((1, 1, D), 2.0)])
    assert out.v2.shape == (B * S, D) and float(out.full()[1, 2, 3]) == 2.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_promotes_then_casts_once(dtype):
    base, low = jnp.full((2,), 1.0, dtype), jnp.full((2,), 1e-3, jnp.float32)
    out = lazy_flat.add(base, low)
    assert out.dtype == dtype
    assert float(out[0]) == float(jnp.asarray(1.001, jnp.float32).astype(dtype))
