"""QLoRA per-use dequantization (jlora.trace._quant): every use of a quantized base kernel dequantizes inside
the operation, forward and backward, so the compiled step keeps codes, not float kernels.

Values and gradients are checked against the same model run on float kernels W = dequantize(codes) + s·A@B
(the dequantization itself is checked against NumPy, bitsandbytes and gguf in test_quant*.py); memory
against the float base's compiled step (``memory_analysis()``, not a timing)."""

from __future__ import annotations

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.ad_checkpoint import print_saved_residuals

import jlora
from jlora import quant
from jlora.trace._quant import Dequant, apply_dequantized, layers

SCHEMES = {"nf4": dict(scheme="nf4"), "nf4+dq": dict(scheme="nf4", double_quant=True), "int8": dict(scheme="int8")}
KEY = jax.random.PRNGKey(0)


def _w(k, shape, scale=0.2):
    return jax.random.normal(jax.random.fold_in(KEY, k), shape, jnp.float32) * scale


def model(p, x, ids):
    """Every way real code uses a kernel: dense, a torch-layout (out, in) kernel, a Gemma einsum, a stacked
    scan, an embedding gather, a tied attend, a conv, ragged_dot experts and a quantized kernel with no LoRA."""
    h = x @ p["dense"]                                                   # (in, out)
    h = h @ p["torch"].T                                                 # (out, in), used transposed
    q = jnp.einsum("btd,ndh->btnh", h, p["einsum"])                      # (N, D, H)
    h = h + q.reshape(h.shape[:2] + (-1,))[..., : h.shape[-1]]

    def layer(c, w):
        return jnp.tanh(c @ w), None

    h, _ = lax.scan(layer, h, p["stack"])                                # (L, d, d) scanned
    h = h + p["embed"][ids]                                              # embedding rows
    h = h @ p["plain"]                                                   # quantized, no LoRA
    img = h.reshape(-1, 4, 4, 4)                                         # NHWC images
    c = lax.conv_general_dilated(img, p["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = h + c.reshape(h.shape)
    t = h.reshape(-1, h.shape[-1])
    e = lax.ragged_dot(t, p["experts"], jnp.array([5, 0, 11], jnp.int32))  # (E, d, d)
    return (t + e) @ p["embed"].T                                        # tied attend: logits


def params():
    d = 64
    return {"dense": _w(1, (d, d)), "torch": _w(2, (d, d)), "einsum": _w(3, (2, d, d)), "stack": _w(4, (2, d, d)),
            "embed": _w(5, (128, d)), "plain": _w(6, (d, d)), "conv": _w(7, (3, 3, 4, 4)), "experts": _w(8, (3, d, d))}


X = jax.random.normal(jax.random.PRNGKey(1), (1, 16, 64))
IDS = jnp.arange(16)[None] * 5 % 128
CFG = jlora.LoraConfig(rank=4, alpha=8.0, targets=r"dense|torch|einsum|stack|embed|conv|experts")
QUANTIZED = r"dense|torch|einsum|stack|embed|plain|conv|experts"


def _setup(scheme):
    p = params()
    frozen, lora = jlora.init(jax.random.PRNGKey(2), p, CFG, apply_fn=model, args=(X, IDS))
    lora = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(3), a.shape), lora)  # B != 0
    return frozen, lora, quant.quantize(frozen, QUANTIZED, **SCHEMES[scheme])


def _reference(fq, lora):
    """The model on float kernels: W = dequantize(codes) + s·A⊗B, differentiable in the factors."""
    return lambda lo: model(jlora.merge(quant.dequantize(fq, dtype=None), lo, CFG), X, IDS)


@pytest.mark.parametrize("scheme,mode", [("nf4", "lazy"), ("nf4+dq", "lazy"), ("int8", "lazy"), ("nf4+dq", "merged")])
def test_quantized_base_equals_float_kernels_values_and_gradients(scheme, mode):
    _, lora, fq = _setup(scheme)
    fn = jlora.lora_apply(model, CFG, mode=mode, strict=mode == "lazy")
    ref = _reference(fq, lora)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(fq, lora, X, IDS)), np.asarray(ref(lora)), rtol=2e-4, atol=2e-4)
    loss = lambda lo: jnp.mean(jnp.sin(fn(fq, lo, X, IDS)))  # noqa: E731
    g = jax.jit(jax.grad(loss))(lora)
    g_ref = jax.grad(lambda lo: jnp.mean(jnp.sin(ref(lo))))(lora)
    assert jax.tree.structure(g) == jax.tree.structure(lora)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-4 * float(jnp.abs(b).max()))


def _kernel_shapes(fq):
    return {tuple(q.shape) for q in jax.tree.leaves(fq, is_leaf=quant.is_quantized) if quant.is_quantized(q)}


@pytest.mark.parametrize("mode", ["lazy", "merged"])
def test_no_float_kernel_crosses_from_forward_to_backward(mode):
    """JAX's own list of what the backward pass keeps: codes and scales, never a float kernel."""
    _, lora, fq = _setup("nf4")
    fn = jlora.lora_apply(model, CFG, mode=mode)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda lo: jnp.sum(fn(fq, lo, X, IDS)), lora)
    saved = [(m.group(1), tuple(int(n) for n in m.group(2).split(",") if n), line)
             for line in out.getvalue().splitlines() if (m := re.match(r"(\w+)\[([\d,]*)\]", line))]
    shapes = _kernel_shapes(fq)
    floats = [line for dtype, shape, line in saved  # (a factor passed in may share a small kernel's shape)
              if dtype.startswith(("f", "bf")) and shape in shapes and "from the argument" not in line]
    assert floats == [], floats
    assert any(dtype == "u8" for dtype, _, _ in saved)  # the codes are what is kept


def _layers(p, x):
    for k in range(len(p) // 4):
        for j in range(4):
            x = jnp.tanh(x @ p[f"l{k}_{j}"])
    return x


def _temp_bytes(frozen, lora, cfg, fn_model, x):
    fn = jlora.lora_apply(fn_model, cfg)
    tx = jlora.optimizer(optax.adamw(1e-3), lora)

    def step(lo, opt, fr, xx):
        g = jax.grad(lambda l_: jnp.mean(fn(fr, l_, xx) ** 2))(lo)
        upd, opt = tx.update(g, opt, lo)
        return optax.apply_updates(lo, upd), opt

    opt = jax.eval_shape(tx.init, lora)
    return jax.jit(step, donate_argnums=(0, 1)).lower(lora, opt, frozen, x).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("scheme", ["nf4+dq", "int8"])
def test_compiled_step_keeps_at_most_about_one_layer_of_float_kernels(scheme):
    """8 layers of four 256x256 kernels, 8 tokens: the activations are tiny, so the float base's step temp
    is small, and a quantized step that kept its float kernels alive would add up to 8 layers of them."""
    n, d = 8, 256
    p = {f"l{k}_{j}": jax.ShapeDtypeStruct((d, d), jnp.float32) for k in range(n) for j in range(4)}
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=r"l\d+_\d")
    x = jax.ShapeDtypeStruct((8, d), jnp.float32)
    frozen, lora = jax.eval_shape(lambda pp: jlora.init(jax.random.PRNGKey(0), pp, cfg), p)
    fq = jax.eval_shape(lambda f: quant.quantize(f, cfg, **SCHEMES[scheme]), frozen)
    layer = 4 * d * d * 4
    extra = (_temp_bytes(fq, lora, cfg, _layers, x) - _temp_bytes(frozen, lora, cfg, _layers, x)) / layer
    assert extra <= 1.5, f"the quantized step's temp exceeds the float step's by {extra:.2f} layers of float kernels"


def test_scan_slices_codes_per_layer_and_falls_back_for_double_quant():
    w = _w(9, (3, 8, 64))
    assert layers(Dequant(quant.quantize({"w": w}, "w")["w"]), 3) is not None
    assert layers(Dequant(quant.quantize({"w": w}, "w", double_quant=True)["w"]), 3) is None  # scales span layers
    q = quant.quantize({"w": w}, "w")["w"]
    xs, step = layers(Dequant(q), 3)
    one = step({k: v[1] for k, v in xs.items()})
    np.testing.assert_array_equal(np.asarray(quant.dequantize_leaf(one.q)), np.asarray(quant.dequantize(q)[1]))


def test_apply_dequantized_gradient_reaches_other_inputs_only():
    q = quant.quantize({"w": _w(10, (64, 32))}, "w", scheme="int8")["w"]
    x = _w(11, (4, 64))
    y, vjp = jax.vjp(lambda xx: apply_dequantized(lambda t: jnp.sin(t[0] @ t[1]), (xx, Dequant(q))), x)
    w = quant.dequantize(q)
    y_ref, vjp_ref = jax.vjp(lambda xx: jnp.sin(xx @ w), x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6)
    ct = jnp.ones_like(y)
    np.testing.assert_allclose(np.asarray(vjp(ct)[0]), np.asarray(vjp_ref(ct)[0]), rtol=1e-5, atol=1e-6)


def test_quantized_apply_without_adapter_equals_dequantized_and_keeps_codes():
    """jlora.quantized_apply: a function of a quantized tree with no adapter (here trained in its biases)."""
    n, d = 8, 256
    p = {f"l{k}_{j}": jax.ShapeDtypeStruct((d, d), jnp.float32) for k in range(n) for j in range(4)}
    fq = jax.eval_shape(lambda pp: quant.quantize(pp, r"l\d+_\d"), p)

    def f(params, bias, x):
        return _layers(params, x + bias)

    def temp(fn, params):
        g = jax.jit(jax.grad(lambda b, pp, x: jnp.mean(fn(pp, b, x) ** 2)))
        return g.lower(jax.ShapeDtypeStruct((d,), jnp.float32), params,
                       jax.ShapeDtypeStruct((8, d), jnp.float32)).compile().memory_analysis().temp_size_in_bytes

    extra = (temp(jlora.quantized_apply(f), fq) - temp(f, p)) / (4 * d * d * 4)
    assert extra <= 1.5, extra
    small = {"l0_0": _w(12, (64, 64)), "l0_1": _w(13, (64, 64)), "l0_2": _w(14, (64, 64)), "l0_3": _w(15, (64, 64))}
    sq = quant.quantize(small, r"l\d+_\d", scheme="int8")
    x, b = _w(16, (4, 64), 1.0), _w(17, (64,), 1.0)
    np.testing.assert_allclose(np.asarray(jax.jit(jlora.quantized_apply(f))(sq, b, x)),
                               np.asarray(f(quant.dequantize(sq), b, x)), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="apply_fn must be callable"):
        jlora.quantized_apply(None)


def test_a_quantized_kernel_carried_through_a_loop_is_dequantized_for_it():
    """A kernel in a scan's carry (not sliced per step) cannot stay codes inside the loop: it is dequantized
    for that use, and the result equals the model on the float kernel."""
    def f(p, x):
        def body(c, _):
            w, h = c
            return (w, jnp.tanh(h @ w)), None

        (_, h), _ = lax.scan(body, (p["w"], x), None, length=2)
        return h

    q = quant.quantize({"w": _w(18, (64, 64), 0.1)}, "w", scheme="int8")
    x = _w(19, (2, 64), 1.0)
    np.testing.assert_allclose(np.asarray(jlora.quantized_apply(f)(q, x)), np.asarray(f(quant.dequantize(q), x)),
                               rtol=1e-6, atol=1e-6)
