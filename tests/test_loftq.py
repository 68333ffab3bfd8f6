"""LoftQ init (jlora.quant._loftq, LoraConfig(init="loftq")) against PEFT's LoftQ loop and float64 NumPy.

PEFT 0.21's ``loftq_init`` moves the weight to CUDA/XPU unconditionally, so on this CPU-only machine the
reference is its loop run on the CPU with its own parts: ``peft.utils.loftq_utils._low_rank_decomposition``
(torch SVD, ``L = U sqrt(S)``, ``R = sqrt(S) Vh``) and the bitsandbytes quantizers it calls (NF4 blocks of 64,
no double quantization; int8 ``int8_vectorwise_quant``). The jlora kernel is stored ``(out, in)`` (layout
``'oi'``) so its NF4 blocks are PEFT's. Differences checked here, not hidden: jlora divides the singular
values by the scale s (``Q + s·A⊗B ≈ W``); PEFT's factors multiply to the residual (equal at s = 1).
Tolerances: products of factors 1e-5 of their largest entry on an NF4 base, 1e-4 on int8 (float32 SVDs
from LAPACK through jax and torch), reconstruction errors 1e-4 relative.
"""

from __future__ import annotations

import bitsandbytes.functional as bnb_f
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft.utils.loftq_utils import _low_rank_decomposition

import jlora
from jlora import quant
from jlora.quant import _loftq as loftq

KEY = jax.random.key(0)


def weights(shape, seed=0, heavy=False):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, shape) if heavy else rng.standard_normal(shape)
    return (w * 0.02).astype(np.float32)


def peft_loftq(weight: np.ndarray, bits: int, rank: int, iters: int):
    """PEFT's ``loftq_init`` loop on the CPU (its decomposition, bitsandbytes' quantizers); the error per step."""
    w = torch.from_numpy(weight)
    res, errors = w.clone(), []
    for i in range(iters):
        if bits == 4:
            packed, state = bnb_f.quantize_4bit(res, blocksize=64, compress_statistics=False, quant_type="nf4")
            deq = bnb_f.dequantize_4bit(packed, state)
        else:
            codes, stats, _ = bnb_f.int8_vectorwise_quant(res)
            deq = bnb_f.int8_vectorwise_dequant(codes, stats)
        res = w - deq
        out = _low_rank_decomposition(res, reduced_rank=rank)
        low_l, low_r = out["L"], out["R"]
        errors.append(float(torch.linalg.norm(w - deq - low_l @ low_r) / torch.linalg.norm(w)))
        if i + 1 == iters:
            break
        res = w - low_l @ low_r
    return deq.numpy(), low_r.numpy(), low_l.numpy(), errors  # Q, lora_A.weight (r, in), lora_B.weight (out, r)


def jlora_loftq(weight: np.ndarray, bits: int, rank: int, iters: int, alpha: float, layout: str = "oi"):
    cfg = jlora.LoraConfig(rank=rank, alpha=alpha, targets="w", layout={"w": layout}, init="loftq",
                           loftq_bits=bits, loftq_iter=iters)
    frozen, lora = jlora.init(KEY, {"w": jnp.asarray(weight)}, cfg)
    return frozen["w"], lora["w"], cfg


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("alpha", [8.0, 16.0])  # s = 1 (PEFT's factors) and s = 2
def test_one_step_matches_peft_loftq(bits, alpha):
    w = weights((96, 192))  # torch (out, in); last axis a multiple of 64 (see tests/test_quant_bnb.py)
    q_ref, a_ref, b_ref, err_ref = peft_loftq(w, bits, 8, 1)
    q, kernel, _ = jlora_loftq(w, bits, 8, 1, alpha)
    scale = alpha / 8
    assert q.scheme == loftq.SCHEMES[bits] and q.shape == w.shape
    q_got = np.asarray(quant.dequantize(q))
    if bits == 4:
        np.testing.assert_array_equal(q_got, q_ref)  # NF4 is bitsandbytes' bit for bit
    else:  # int8: bitsandbytes rounds w * (127/absmax), jlora w / (absmax/127): the same codes here
        np.testing.assert_allclose(q_got, q_ref, rtol=1e-6, atol=0)
    low = scale * np.asarray(kernel["A"]) @ np.asarray(kernel["B"])  # (in, out)
    low_ref = (b_ref @ a_ref).T
    # NF4 bases are equal, so the residuals are; int8 bases differ by float32 ulps (bitsandbytes multiplies by
    # 1/127 after the absmax, jlora by absmax/127), which the SVD turns into 1e-5 of the product
    tol = 1e-5 if bits == 4 else 1e-4
    np.testing.assert_allclose(low, low_ref, atol=tol * np.abs(low_ref).max(), rtol=0)
    # the factors are PEFT's divided by sqrt(s), up to the sign of each singular pair
    a, b = np.asarray(kernel["A"]) * np.sqrt(scale), np.asarray(kernel["B"]) * np.sqrt(scale)
    sign = np.sign(np.sum(a * a_ref.T, axis=0))
    np.testing.assert_allclose(a * sign, a_ref.T, atol=1e-4 * np.abs(a_ref).max(), rtol=0)
    np.testing.assert_allclose(b * sign[:, None], b_ref.T, atol=1e-4 * np.abs(b_ref).max(), rtol=0)
    err = float(loftq.reconstruction_error(jnp.asarray(w), q, kernel["A"], kernel["B"], scale, kernel.layout))
    assert err == pytest.approx(err_ref[0], rel=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_error_curve_matches_peft_loftq(bits):
    w = weights((128, 192), seed=1, heavy=True)
    _, _, _, curve_ref = peft_loftq(w, bits, 16, 4)
    curve = []
    for t in range(1, 5):
        q, kernel, _ = jlora_loftq(w, bits, 16, t, alpha=32.0)
        curve.append(float(loftq.reconstruction_error(jnp.asarray(w), q, kernel["A"], kernel["B"], 2.0, kernel.layout)))
    np.testing.assert_allclose(curve, curve_ref, rtol=1e-4)
    assert curve[-1] < curve[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rank, iters", [(4, 1), (16, 1), (16, 5), (32, 5)])
def test_loftq_beats_plain_qlora_init(bits, rank, iters):
    w = weights((256, 256), seed=2, heavy=True)
    plain = quant.quantize({"w": jnp.asarray(w)}, "w", scheme=loftq.SCHEMES[bits],
                           layouts={"w": jlora.Layout((256, 256), "io")})["w"]
    q, kernel, cfg = jlora_loftq(w, bits, rank, iters, alpha=2.0 * rank, layout="io")
    plain_err = float(loftq.reconstruction_error(jnp.asarray(w), plain))
    err = float(loftq.reconstruction_error(jnp.asarray(w), q, kernel["A"], kernel["B"], 2.0, kernel.layout))
    # float64 NumPy: ||W - (Q + s A B)|| / ||W||
    low = 2.0 * np.asarray(kernel["A"], np.float64) @ np.asarray(kernel["B"], np.float64)
    ref = np.linalg.norm(w.astype(np.float64) - np.asarray(quant.dequantize(q), np.float64) - low) / np.linalg.norm(w)
    assert err == pytest.approx(ref, rel=1e-5)
    assert err < plain_err


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(96)(x)
        return nn.DenseGeneral((4, 16), name="heads")(jax.nn.relu(h))


def test_init_returns_quantized_base_and_lazy_apply_runs_on_q_plus_low_rank():
    net = Net()
    x = jnp.asarray(np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32))
    params = net.init(KEY, x)
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=r".*/kernel", init="loftq", loftq_bits=4, loftq_iter=2)
    frozen, lora = jlora.init(KEY, params, cfg, apply_fn=net.apply, args=(x,))
    for path in ("Dense_0", "heads"):
        q = frozen["params"][path]["kernel"]
        assert quant.is_quantized(q) and q.scheme == "nf4" and q.shape == params["params"][path]["kernel"].shape
        assert frozen["params"][path]["bias"] is params["params"][path]["bias"] or np.array_equal(
            frozen["params"][path]["bias"], params["params"][path]["bias"])
    assert lora["params"]["heads"]["kernel"]["B"].shape == (4, 4, 16)  # DenseGeneral (d, h, hd): B (r, h, hd)
    # float64 reference: the model with W = dequantize(Q) + s·A⊗B
    ref_params = jax.tree.map(lambda a: np.asarray(a, np.float64), quant.dequantize(frozen))
    for path in ("Dense_0", "heads"):
        k = lora["params"][path]["kernel"]
        a, b = np.asarray(k["A"], np.float64), np.asarray(k["B"], np.float64)
        ref_params["params"][path]["kernel"] = ref_params["params"][path]["kernel"] + 2.0 * np.tensordot(a, b, 1)
    xs = np.asarray(x, np.float64)
    h = np.maximum(xs @ ref_params["params"]["Dense_0"]["kernel"] + ref_params["params"]["Dense_0"]["bias"], 0)
    want = np.tensordot(h, ref_params["params"]["heads"]["kernel"], 1) + ref_params["params"]["heads"]["bias"]
    for mode in ("lazy", "merged"):
        got = jlora.lora_apply(net.apply, cfg, mode=mode)(frozen, lora, x)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5 * np.abs(want).max(), rtol=0)
    merged = jlora.merge(frozen, lora, cfg, into="float")
    np.testing.assert_allclose(np.asarray(merged["params"]["Dense_0"]["kernel"]),
                               ref_params["params"]["Dense_0"]["kernel"], atol=1e-6, rtol=0)
    # closer to the float model than the plain QLoRA start
    plain = quant.quantize(params, r".*/kernel")
    y = net.apply(params, x)
    err_loftq = float(jnp.linalg.norm(jlora.lora_apply(net.apply, cfg)(frozen, lora, x) - y))
    err_plain = float(jnp.linalg.norm(net.apply(quant.dequantize(plain), x) - y))
    assert err_loftq < err_plain


@pytest.mark.parametrize("shape, roles, rank", [
    ((3, 3, 4, 8), "iiio", 4),    # conv HWIO: (36, 8) matrices
    ((2, 32, 48), "sio", 3),      # two stacked layers, int8 scales per layer and output
    ((4, 16, 24), "ios", 2),      # a stack axis stored last
])
@pytest.mark.parametrize("bits", [4, 8])
def test_any_layout_fits_the_residual_svd(shape, roles, rank, bits):
    w = weights(shape, seed=4)
    lay = jlora.Layout(shape, roles)
    q, kernel, _ = jlora_loftq(w, bits, rank, 1, alpha=float(rank), layout=roles)
    assert q.shape == shape and q.scheme == loftq.SCHEMES[bits]
    # float64 NumPy: the top-r SVD of each stack entry's (prod(in), prod(out)) residual W - Q
    resid = np.asarray(lay.to_canonical(jnp.asarray(w - np.asarray(quant.dequantize(q)))), np.float64)
    mats = resid.reshape(lay.stack_shape + (int(np.prod(lay.in_shape)), int(np.prod(lay.out_shape))))
    u, s, vh = np.linalg.svd(mats, full_matrices=False)
    best = np.einsum("...ik,...k,...kj->...ij", u[..., :rank], s[..., :rank], vh[..., :rank, :])
    a = np.asarray(kernel["A"], np.float64).reshape(mats.shape[:-1] + (rank,))
    b = np.asarray(kernel["B"], np.float64).reshape(mats.shape[:-2] + (rank, mats.shape[-1]))
    np.testing.assert_allclose(a @ b, best, atol=1e-5 * np.abs(best).max(), rtol=0)
    if bits == 8 and roles == "sio":
        assert q.scales.shape == (2, 1, 48)


def test_dora_and_eval_shape_with_loftq():
    w = {"w": jnp.asarray(weights((64, 32), seed=5))}
    cfg = jlora.LoraConfig(rank=2, alpha=2, targets="w", init="loftq", use_dora=True)
    frozen, lora = jlora.init(KEY, w, cfg)
    v = np.asarray(quant.dequantize(frozen["w"]), np.float64) + np.asarray(lora["w"]["A"]) @ np.asarray(lora["w"]["B"])
    np.testing.assert_allclose(np.asarray(lora["w"]["m"]), np.linalg.norm(v, axis=0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jlora.merge(frozen, lora, cfg, into="float")["w"]), v, atol=1e-6)
    shapes = jax.eval_shape(lambda p: jlora.init(KEY, p, cfg.replace(use_dora=False, loftq_bits=8)), w)
    assert shapes[0]["w"].scheme == "int8" and shapes[0]["w"].codes.shape == (64, 32)
    assert shapes[1]["w"]["A"].shape == (64, 2)


def test_config_settings_validate_and_round_trip():
    cfg = jlora.LoraConfig(targets="w", init="loftq", loftq_bits=8, loftq_iter=5)
    assert jlora.LoraConfig.from_json(cfg.to_json()) == cfg
    assert jlora.LoraConfig.from_json('{"targets": ["w"], "init": "loftq"}').loftq_bits == 4
    for kw, msg in [({"loftq_bits": 3}, "loftq_bits: expected 4 .NF4. or 8"), ({"loftq_bits": 4.0}, "loftq_bits"),
                    ({"loftq_iter": 0}, "loftq_iter: expected an int >= 1"), ({"loftq_iter": True}, "loftq_iter")]:
        with pytest.raises(ValueError, match=msg):
            jlora.LoraConfig(targets="w", init="loftq", **kw)
    with pytest.raises(ValueError, match="apply to init='loftq', got init='kaiming'; fix"):
        jlora.LoraConfig(targets="w", loftq_iter=2)


def test_loftq_refuses_what_it_cannot_fit():
    w = {"w": jnp.asarray(weights((64, 96), seed=6))}
    cfg = jlora.LoraConfig(rank=2, targets="w", init="loftq")
    frozen, lora = jlora.init(KEY, w, cfg)
    with pytest.raises(ValueError, match="LoftQ adapter .* no low-rank adapter of the original base.*Fix"):
        jlora.to_plain_adapter(w, frozen, lora, cfg)
    with pytest.raises(ValueError, match="is fused .* Fix: init='kaiming'"):
        jlora.init(KEY, w, cfg.replace(fused={"w": (True, False)}))
    with pytest.raises(ValueError, match="needs the values of kernel 'w', got a jax.ShapeDtypeStruct"):
        jlora.init(KEY, {"w": jax.ShapeDtypeStruct((64, 96), jnp.float32)}, cfg)
    with pytest.raises(ValueError, match="'w' is already quantized"):
        jlora.init(KEY, quant.quantize(w, "w"), cfg)
