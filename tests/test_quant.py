"""QLoRA (jlora.quant): NF4/int8 against an independent NumPy implementation, merge/apply on a
quantized base, lazy == merged, gradients, orbax round trip, byte counts and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jlora
from jlora import paths, quant

ROOT = Path(__file__).resolve().parents[1]

# bitsandbytes' NF4 levels, typed in again here (not imported from jlora) for an independent reference.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
NF4_BOUND = float(np.max(np.diff(NF4.astype(np.float64)))) / 2  # 0.1519: half the largest gap (-1 .. -0.696)


# --- NumPy reference implementations (independent of jlora.quant) ------------------------------

def np_nf4(w: np.ndarray, block: int = 64):
    """bitsandbytes' blockwise NF4: row-major flatten, zero-pad, absmax per block, nearest level."""
    x = np.asarray(w, np.float32).reshape(-1)
    n = x.size
    x = np.concatenate([x, np.zeros((-n) % block, np.float32)]).reshape(-1, block)
    absmax = np.abs(x).max(axis=1)
    inv = np.where(absmax > 0, np.float32(1) / np.where(absmax > 0, absmax, 1), 0).astype(np.float32)
    xn = (x * inv[:, None]).astype(np.float32)
    dist = np.abs(xn[..., None].astype(np.float64) - NF4.astype(np.float64))
    codes = dist.argmin(axis=-1)
    # an element whose two nearest levels are (numerically) equidistant may go either way
    part = np.sort(dist, axis=-1)
    tie = (part[..., 1] - part[..., 0]) < 1e-6
    packed = (codes[:, 0::2] << 4 | codes[:, 1::2]).astype(np.uint8)
    deq = (NF4[codes] * absmax[:, None]).astype(np.float32).reshape(-1)[:n].reshape(w.shape)
    return codes, tie, packed, absmax, deq


def np_unpack(packed: np.ndarray) -> np.ndarray:
    p = np.asarray(packed).reshape(-1)
    return np.stack([p >> 4, p & 15], axis=-1).reshape(-1)


def np_int8(w: np.ndarray, in_axes: tuple[int, ...]):
    x = np.asarray(w, np.float32)
    absmax = np.abs(x).max(axis=in_axes, keepdims=True)
    scale = (absmax / np.float32(127)).astype(np.float32)
    codes = np.clip(np.round(x / np.where(scale > 0, scale, 1)), -127, 127).astype(np.int8)
    return codes, scale, absmax


def np_dynamic_map() -> np.ndarray:
    vals = [0.0, 1.0]
    for e in range(7):
        edges = np.linspace(0.1, 1.0, 2**e + 1)
        mids = 10.0 ** (e - 6) * (edges[1:] + edges[:-1]) / 2
        vals += list(mids) + list(-mids)
    return np.sort(np.array(vals)).astype(np.float32)


def kernel(shape, seed=0, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(dtype)


# --- NF4 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(96, 128), (3, 8, 64), (5, 30, 7)])  # rows layout, stacked, padded
def test_nf4_matches_numpy_reference(shape):
    w = kernel(shape)
    q = quant.quantize({"k": jnp.asarray(w)}, "k")["k"]
    codes, tie, packed, absmax, deq = np_nf4(w)
    got = np_unpack(np.asarray(q.codes)).reshape(codes.shape)
    assert q.codes.dtype == jnp.uint8 and got.size == codes.size
    assert np.array_equal(got[~tie], codes[~tie])
    assert np.all(np.abs(got[tie].astype(int) - codes[tie]) <= 1)
    if not tie.any():
        assert np.array_equal(np.asarray(q.codes).reshape(-1), packed.reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.scales).reshape(-1), absmax)
    out = np.asarray(quant.dequantize(q))
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_array_equal(out.reshape(-1)[~tie.reshape(-1)[: w.size]], deq.reshape(-1)[~tie.reshape(-1)[: w.size]])
    per_elem_absmax = np.repeat(absmax, 64)[: w.size].reshape(shape)
    assert np.all(np.abs(out - w) <= NF4_BOUND * per_elem_absmax * (1 + 1e-6))
    assert q.rows == (shape[-1] % 64 == 0)


def test_nf4_bfloat16_kernel_and_zero_block():
    w = kernel((4, 128)).astype(jnp.bfloat16)
    w = jnp.asarray(w).at[0, :64].set(0)
    q = quant.quantize({"k": w}, "k")["k"]
    assert q.dtype == jnp.bfloat16
    back = quant.dequantize(q, dtype=None)
    assert back.dtype == jnp.bfloat16
    assert np.all(np.asarray(back[0, :64], np.float32) == 0)
    _, _, _, _, deq = np_nf4(np.asarray(w, np.float32))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), deq)


def test_double_quant_against_numpy_and_error_is_small():
    w = kernel((256, 256), seed=1)
    q = quant.quantize({"k": jnp.asarray(w)}, "k", double_quant=True)["k"]
    codes, tie, _, absmax, _ = np_nf4(w)
    assert q.scales.dtype == jnp.uint8 and q.scales_scale.dtype == jnp.float32 and q.scales_offset.shape == ()
    # reference double quantization: mean removed, blocks of 256, nearest level of the dynamic map
    dmap = np_dynamic_map()
    v = absmax.reshape(-1) - np.float32(absmax.mean(dtype=np.float64))
    blocks = np.concatenate([v, np.zeros((-v.size) % 256, np.float32)]).reshape(-1, 256)
    s2 = np.abs(blocks).max(axis=1)
    dist = np.abs((blocks / s2[:, None])[..., None].astype(np.float64) - dmap.astype(np.float64))
    ref = dist.argmin(-1).reshape(-1)[: v.size]
    np.testing.assert_allclose(np.asarray(q.scales_scale), s2, rtol=1e-6)
    agree = np.mean(np.asarray(q.scales).reshape(-1) == ref)
    assert agree > 0.99, agree  # float32 mean/rounding may flip a code sitting on a midpoint
    scale_back = dmap[ref] * np.repeat(s2, 256)[: v.size] + absmax.mean(dtype=np.float64)
    scale_err = np.max(np.abs(scale_back - absmax) / absmax)
    stored = dmap[np.asarray(q.scales).reshape(-1)] * np.repeat(np.asarray(q.scales_scale), 256)[: v.size]
    got_err = np.max(np.abs(stored + np.asarray(q.scales_offset) - absmax) / absmax)
    assert scale_err < 0.02 and got_err < 0.02, (scale_err, got_err)
    out = np.asarray(quant.dequantize(q))
    blockmax = np.repeat(absmax, 64).reshape(w.shape)
    assert np.all(np.abs(out - w) <= NF4_BOUND * blockmax * 1.02 + 0.02 * blockmax)
    rel = np.sqrt(np.mean((out - w) ** 2)) / np.sqrt(np.mean(w**2))
    plain = np.sqrt(np.mean((np.asarray(quant.dequantize(quant.quantize({"k": jnp.asarray(w)}, "k")["k"])) - w) ** 2))
    assert rel < 1.01 * plain / np.sqrt(np.mean(w**2))


# --- int8 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,config,in_axes", [
    ((96, 40), None, (0,)),
    ((3, 16, 2, 8), jlora.LoraConfig(rank=2, targets="k", stack={"k": 1}, axes={"k": 1}), (1,)),
    ((3, 3, 8, 16), None, (0, 1, 2)),  # conv kernel: per output channel over (kh, kw, cin)
])
def test_int8_matches_numpy_and_error_bound(shape, config, in_axes):
    w = kernel(shape, seed=2)
    q = quant.quantize({"k": jnp.asarray(w)}, config or "k", scheme="int8")["k"]
    codes, scale, absmax = np_int8(w, in_axes)
    assert q.codes.dtype == jnp.int8 and q.scales.shape == scale.shape
    np.testing.assert_allclose(np.asarray(q.scales), scale, rtol=3e-7)  # XLA may divide by 127 as * (1/127)
    assert np.mean(np.asarray(q.codes) == codes) > 0.999  # w/scale on a .5 boundary may round either way
    err = np.abs(np.asarray(quant.dequantize(q)) - w)
    assert np.all(err <= absmax / 254 * (1 + 1e-5))


# --- pytree behaviour, abstract shapes, bytes ----------------------------------------------------

FROZEN = {"params": {"fc1": {"kernel": jnp.asarray(kernel((64, 128), 4)), "bias": jnp.zeros(128)},
                     "fc2": {"kernel": jnp.asarray(kernel((128, 64), 5)), "bias": jnp.zeros(64)}}}
CFG = jlora.LoraConfig(rank=4, alpha=8, targets=r".*/kernel")


def test_quantized_leaf_is_one_path_and_a_pytree():
    fq = quant.quantize(FROZEN, CFG)
    flat = paths.flatten(fq)
    assert sorted(flat) == sorted(paths.flatten(FROZEN))
    assert quant.is_quantized(flat["params/fc1/kernel"]) and flat["params/fc1/kernel"].shape == (64, 128)
    keys = [jax.tree_util.keystr(k, simple=True, separator="/") for k, _ in jax.tree_util.tree_leaves_with_path(fq)]
    assert "params/fc1/kernel/codes" in keys and not any(k.endswith(("/A", "/B")) for k in keys)
    # jit and eval_shape: same structure and shapes as the eager result, nothing computed abstractly
    abstract = jax.eval_shape(lambda f: quant.quantize(f, CFG, double_quant=True), FROZEN)
    eager = quant.quantize(FROZEN, CFG, double_quant=True)
    assert jax.tree.structure(abstract) == jax.tree.structure(eager)
    same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), abstract, eager)
    assert jax.tree.leaves(same) and all(jax.tree.leaves(same)), same
    jitted = jax.jit(lambda f: quant.quantize(f, CFG, double_quant=True))(FROZEN)
    jax.tree.map(np.testing.assert_array_equal, jitted, eager)
    # abstract input (ShapeDtypeStructs) under eval_shape: nothing is allocated
    from_abstract = jax.eval_shape(lambda f: quant.quantize(f, CFG, double_quant=True), jax.eval_shape(lambda: FROZEN))
    assert jax.tree.structure(from_abstract) == jax.tree.structure(eager)
    # adapted and summary read the kernel's shape and true bytes from the quantized leaf
    _, lora = jlora.init(jax.random.key(0), FROZEN, CFG)
    assert jlora.adapted(fq, lora, CFG)["params/fc1/kernel"].kernel_shape == (64, 128)
    s = jlora.summary(fq, lora)
    assert s.frozen == sum(x.size for x in jax.tree.leaves(FROZEN))
    assert s.frozen_bytes == sum(x.nbytes for x in jax.tree.leaves(fq))


def test_nf4_bytes_at_most_0_30_of_float32():
    w = jnp.asarray(kernel((256, 512), 6))
    f32 = w.size * 4
    ratios = {}
    for name, kw in {"nf4": {}, "nf4+dq": {"double_quant": True}, "int8": {"scheme": "int8"}}.items():
        q = quant.quantize({"k": w}, "k", **kw)["k"]
        nbytes = sum(x.nbytes for x in jax.tree.leaves(q))  # from the arrays themselves
        assert nbytes == q.nbytes
        ratios[name] = nbytes / f32
    assert ratios["nf4"] <= 0.30 and ratios["nf4+dq"] < ratios["nf4"]
    assert ratios["nf4"] == pytest.approx(0.5 / 4 + 4 / 64 / 4)
    assert ratios["int8"] == pytest.approx(0.25 + 512 * 4 / f32)


# --- merge, apply, lazy, gradients ---------------------------------------------------------------

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(64, name="fc2")(nn.gelu(nn.Dense(128, name="fc1")(x)))


X = jnp.asarray(kernel((2, 5, 64), 7, np.float32) * 20)


def _lora_with_b(seed=8):
    _, lora = jlora.init(jax.random.key(seed), FROZEN, CFG)
    return jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(seed + 1), a.shape), lora)


def test_merge_needs_into_and_float_merge_matches_numpy():
    fq = quant.quantize(FROZEN, CFG)
    lora = _lora_with_b()
    with pytest.raises(ValueError, match=r"frozen leaf 'params/fc1/kernel' is quantized .*into='float'"):
        jlora.merge(fq, lora, CFG)
    with pytest.raises(ValueError, match="into must be None or 'float'"):
        jlora.merge(fq, lora, CFG, into="nf4")
    with pytest.raises(ValueError, match="unmerge"):
        jlora.unmerge(fq, lora, CFG)
    merged = jlora.merge(fq, lora, CFG, into="float")
    for layer in ("fc1", "fc2"):
        deq = np_nf4(np.asarray(FROZEN["params"][layer]["kernel"]))[4].astype(np.float64)
        ab = lora["params"][layer]["kernel"]
        ref = deq + 2.0 * np.asarray(ab["A"], np.float64) @ np.asarray(ab["B"], np.float64)
        got = merged["params"][layer]["kernel"]
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
    assert jlora.merge(fq, lora, CFG, into="float", dtype=jnp.bfloat16)["params"]["fc1"]["kernel"].dtype == jnp.bfloat16
    assert merged["params"]["fc1"]["bias"] is FROZEN["params"]["fc1"]["bias"]


def test_apply_merged_and_lazy_on_quantized_base_and_gradients():
    fq = quant.quantize(FROZEN, CFG)
    lora = _lora_with_b()
    model = MLP()
    merged_fn = jax.jit(jlora.lora_apply(model.apply, CFG, mode="merged"))
    y = merged_fn(fq, lora, X)
    # reference: plain flax on float kernels dequantized by the NumPy reference, plus the delta
    ref_params = jax.tree.map(lambda a: a, FROZEN)
    for layer in ("fc1", "fc2"):
        ab = lora["params"][layer]["kernel"]
        deq = np_nf4(np.asarray(FROZEN["params"][layer]["kernel"]))[4]
        ref_params["params"][layer]["kernel"] = jnp.asarray(deq + 2.0 * np.asarray(ab["A"]) @ np.asarray(ab["B"]))
    np.testing.assert_allclose(np.asarray(y), np.asarray(model.apply(ref_params, X)), rtol=1e-4, atol=1e-5)

    lazy_fn = jax.jit(jlora.lora_apply(model.apply, CFG, mode="lazy"))
    np.testing.assert_allclose(np.asarray(lazy_fn(fq, lora, X)), np.asarray(y), rtol=1e-4, atol=1e-5)
    # lazy_call itself, with the quantized base dequantized inside the jitted function
    from jlora.trace import _lazy as lazy

    direct = jax.jit(lambda f, l, x: lazy.lazy_call(model.apply, quant.dequantize(f, dtype=None), l, CFG, (x,), {}))
    np.testing.assert_allclose(np.asarray(direct(fq, lora, X)), np.asarray(y), rtol=1e-4, atol=1e-5)

    def loss(fn):
        return lambda lo, f: jnp.mean(fn(f, lo, X) ** 2)

    g_lazy = jax.jit(jax.grad(loss(jlora.lora_apply(model.apply, CFG, mode="lazy"))))(lora, fq)
    g_merged = jax.jit(jax.grad(loss(jlora.lora_apply(model.apply, CFG, mode="merged"))))(lora, fq)
    assert jax.tree.structure(g_lazy) == jax.tree.structure(lora)  # gradients exist only for the factors
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-7),
                 g_lazy, g_merged)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_lazy))
    # an optax step trains the factors; the quantized base is untouched and holds no optimizer state
    tx = jlora.optimizer(optax.adam(1e-2), lora)
    state = tx.init(lora)
    updates, _ = tx.update(g_lazy, state, lora)
    new = optax.apply_updates(lora, updates)
    assert not np.allclose(np.asarray(new["params"]["fc1"]["kernel"]["A"]), np.asarray(lora["params"]["fc1"]["kernel"]["A"]))
    assert all(x.dtype != jnp.uint8 for x in jax.tree.leaves(state))


# --- orbax ---------------------------------------------------------------------------------------

def test_quantized_tree_saves_and_restores_with_orbax(tmp_path):
    fq = {"dq": quant.quantize(FROZEN, CFG, double_quant=True), "int8": quant.quantize(FROZEN, CFG, scheme="int8")}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "base", fq)
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / "base", jax.eval_shape(lambda: fq))
    assert jax.tree.structure(restored) == jax.tree.structure(fq)
    q = restored["dq"]["params"]["fc1"]["kernel"]
    assert quant.is_quantized(q) and q.scheme == "nf4" and q.scales_scale is not None
    assert restored["int8"]["params"]["fc2"]["kernel"].scheme == "int8"
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, fq)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)),
                                  np.asarray(quant.dequantize(fq["dq"]["params"]["fc1"]["kernel"])))


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("rules,kw,match", [
    (r".*/bias", {}, r"'params/fc1/bias' \(shape \(128,\), dtype float32\) is not a float kernel.*fix: narrow"),
    (r".*/kernl", {}, r"'.\*/kernl' matched no parameter; closest paths: params/fc2/kernel, params/fc1/kernel"),
    (r".*/kernel", {"block_size": 63}, "block_size must be a positive even int"),
    (r".*/kernel", {"scheme": "int4"}, "scheme must be one of"),
    (r".*/kernel", {"scheme": "int8", "double_quant": True}, "double_quant=True applies to scheme='nf4'"),
])
def test_bad_input(rules, kw, match):
    with pytest.raises(ValueError, match=match):
        quant.quantize(FROZEN, rules, **kw)


def test_bad_input_int_kernel_and_twice():
    with pytest.raises(ValueError, match=r"'ids' \(shape \(4, 4\), dtype int32\) is not a float kernel"):
        quant.quantize({"ids": jnp.zeros((4, 4), jnp.int32)}, "ids")
    fq = quant.quantize(FROZEN, CFG)
    with pytest.raises(ValueError, match="'params/fc1/kernel' is already quantized"):
        quant.quantize(fq, CFG)
    with pytest.raises(TypeError, match="rules_or_config must be"):
        quant.quantize(FROZEN, 3)


# --- sharding (8 fake CPU devices, in a subprocess: XLA_FLAGS must precede jax's import) -----------

def test_codes_and_scales_follow_the_kernel_sharding():
    code = textwrap.dedent("""
        import json, jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jlora import quant
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
        w = jax.random.normal(jax.random.key(0), (64, 512))
        ws = jax.device_put(w, NamedSharding(mesh, P("data", "model")))
        out = {}
        for name, kw in {"nf4": {}, "int8": {"scheme": "int8"}, "dq": {"double_quant": True}}.items():
            q = quant.quantize({"w": ws}, "w", **kw)["w"]
            out[name] = [tuple(x.sharding.spec) for x in jax.tree.leaves(q)]
            ref = quant.dequantize(quant.quantize({"w": w}, "w", **kw)["w"])
            # (double quant: the sharded mean of the scales may differ in the last bit)
            out[name + "_err"] = float(np.max(np.abs(np.asarray(jax.jit(quant.dequantize)(q)) - np.asarray(ref))))
        print("RESULT" + json.dumps(out))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.split("RESULT")[-1])
    assert out["nf4"] == [["data", "model"], ["data", "model"]]     # codes (64, 256), absmax (64, 8)
    assert out["int8"] == [["data", "model"], [None, "model"]]      # scales (1, 512): input axis replicated
    assert out["dq"][0] == ["data", "model"] and out["dq"][1:] == [[], [], []]
    assert out["nf4_err"] == 0 and out["int8_err"] == 0 and out["dq_err"] < 1e-5
