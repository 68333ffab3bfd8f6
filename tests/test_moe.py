"""LoRA on mixture-of-experts expert kernels (jlora.moe, the lazy rewrite of ragged_dot / batched
einsum / indexed experts, PEFT ``target_parameters`` interop, the MoE example).

A top-k routed MoE FFN (``examples.models.moe.moe_ffn``) runs in three forms: ``ragged_dot`` on
slots sorted by expert, dense dispatch (an einsum with the expert axis as a batch axis, then a
combine), and a loop over ``W[e]``; with expert kernels stored ``(E, in, out)`` and ``(E, out, in)``.
Each is checked against a float64 NumPy MoE on ``W0 + delta``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import checkify

import jlora
from examples.models import moe as M

ROOT = Path(__file__).resolve().parents[1]
KEY = jax.random.key(0)
E, D, H, K, T, R = 4, 16, 8, 2, 12, 2
CASES = [(form, tr) for form in M.FORMS for tr in (False, True)]


def _layer(form, transposed, e=E, d=D, h=H, k=K):
    cfg = M.MoEConfig(d=d, hidden=h, experts=e, top_k=k, layers=1, form=form, transposed=transposed)
    p = M.init_params(jax.random.key(1), cfg)["params"]["layer_0"]["moe"]
    return cfg, p, (lambda params, x: M.moe_ffn(params, x, cfg))


def _x(t=T, d=D, seed=2):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(t, d)), jnp.float32)


def _randomise(lora, seed=5):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.5, x.dtype), lora)


def _init(form, transposed, rank=R, **kw):
    cfg, params, fn = _layer(form, transposed, **kw)
    lc = jlora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=r"w_in|w_out")
    x = _x(d=cfg.d)
    frozen, lora = jlora.init(KEY, params, lc, apply_fn=fn, args=(x,))
    return cfg, lc, fn, x, frozen, _randomise(lora)


def _reference(params, lora, cfg, x, scale):
    """The MoE in float64 NumPy with every expert kernel W0 + scale·A_e·B_e (canonical (E, in, out))."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    w = {}
    for name in ("w_in", "w_out"):
        w0 = f64(params[name])
        w0 = np.swapaxes(w0, 1, 2) if cfg.transposed else w0  # canonical (E, in, out)
        w[name] = w0 + scale * np.einsum("eir,ero->eio", f64(lora[name]["A"]), f64(lora[name]["B"]))
    x = f64(x)
    logits = x @ f64(params["router"])
    ids = np.argsort(-logits, axis=1, kind="stable")[:, : cfg.top_k]
    top = np.take_along_axis(logits, ids, 1)
    weights = np.exp(top - top.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    gelu = lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(cfg.top_k):
            e = ids[t, j]
            out[t] += weights[t, j] * (gelu(x[t] @ w["w_in"][e]) @ w["w_out"][e])
    return out


@pytest.mark.parametrize("form,transposed", CASES)
def test_forms_lazy_equal_merged_and_float64(form, transposed):
    cfg, lc, fn, x, frozen, lora = _init(form, transposed)
    for name in ("w_in", "w_out"):
        node = lora[name]
        assert node.layout.roles == ("soi" if transposed else "sio"), node.layout
        d_in, d_out = (D, H) if name == "w_in" else (H, D)
        assert node["A"].shape == (E, d_in, R) and node["B"].shape == (E, R, d_out)
    want = _reference(frozen, lora, cfg, x, 2.0)
    lazy = jlora.lora_apply(fn, lc, "lazy", strict=True)
    merged = jlora.lora_apply(fn, lc, "merged")
    ct = _x(*want.shape, seed=9)

    @jax.jit
    def both(lora):
        g_lazy, g_mrg = (jax.grad(lambda l, f=f: jnp.sum(f(frozen, l, x) * ct))(lora) for f in (lazy, merged))
        return lazy(frozen, lora, x), merged(frozen, lora, x), g_lazy, g_mrg

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, got_mrg, g_lazy, g_mrg = both(lora)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_mrg), want, atol=1e-5, rtol=1e-5)
    for p, g in jlora.paths.flatten(g_lazy).items():
        ref = np.asarray(jlora.paths.flatten(g_mrg)[p])
        np.testing.assert_allclose(np.asarray(g), ref, atol=1e-4 * max(1.0, np.abs(ref).max()), err_msg=p)


def _views_of_inputs(jaxpr, full_shapes):
    """Equations of ``jaxpr`` (recursively) whose output has a full expert-kernel shape but is not a
    view (transpose / reshape / cast / copy / call) of a top-level input: a formed delta, merged
    kernel or weight gradient."""
    bad = []

    def walk(jx, views):
        for eqn in jx.eqns:
            subs = [getattr(v, "jaxpr", v) for v in eqn.params.values() if hasattr(getattr(v, "jaxpr", v), "eqns")]
            ins_view = [v in views for v in eqn.invars if not hasattr(v, "val")]
            is_view = eqn.primitive.name in ("transpose", "reshape", "convert_element_type", "copy", "copy_p",
                                             "squeeze", "expand_dims") and all(ins_view) and ins_view
            for sub in subs:
                inner = {sv for sv, v in zip(sub.invars, eqn.invars) if not hasattr(v, "val") and v in views}
                walk(sub, inner)
            for out in eqn.outvars:
                if is_view:
                    views.add(out)
                elif tuple(getattr(out.aval, "shape", ())) in full_shapes and not subs:
                    bad.append(f"{eqn.primitive.name} -> {out.aval}")

    walk(jaxpr, set(jaxpr.invars))
    return bad


@pytest.mark.parametrize("form", M.FORMS)
def test_lazy_never_forms_full_expert_arrays_and_costs_less(form):
    e, d, h, t = 8, 64, 96, 32
    cfg, params, fn = _layer(form, False, e=e, d=d, h=h)
    lc = jlora.LoraConfig(rank=4, targets=r"w_in|w_out")
    x = _x(t, d)
    frozen, lora = jlora.init(KEY, params, lc, apply_fn=fn, args=(x,))
    full = {(e, d, h), (e, h, d), (e, d * h)}

    def step(mode):
        f = jlora.lora_apply(fn, lc, mode, strict=mode == "lazy")
        return jax.value_and_grad(lambda l, fr: jnp.sum(f(fr, l, x) ** 2))

    jaxprs = {m: jax.make_jaxpr(step(m))(lora, frozen) for m in ("lazy", "merged")}
    assert _views_of_inputs(jaxprs["lazy"].jaxpr, full) == []
    assert _views_of_inputs(jaxprs["merged"].jaxpr, full), "the check must see merged mode's delta"
    flops = {m: jax.jit(step(m)).lower(lora, frozen).compile().cost_analysis()["flops"] for m in jaxprs}
    assert flops["lazy"] < flops["merged"], flops


def test_merge_unmerge_summary_and_quantized_base():
    cfg, lc, fn, x, frozen, lora = _init("ragged", True)
    merged = jlora.merge(frozen, lora, lc)
    back = jlora.unmerge(merged, lora, lc)
    for name in ("w_in", "w_out"):
        np.testing.assert_allclose(np.asarray(back[name]), np.asarray(frozen[name]), atol=1e-6)
        assert not np.allclose(np.asarray(merged[name]), np.asarray(frozen[name]))
    np.testing.assert_allclose(np.asarray(fn(merged, x)), _reference(frozen, lora, cfg, x, 2.0), atol=1e-5)
    s = jlora.summary(frozen, lora, per_path=True)
    assert s.trainable == E * (D * R + R * H) + E * (H * R + R * D)
    assert s.frozen == 2 * E * D * H + D * E
    assert {r[0]: r[1] for r in s.rows}["w_in/A"] == (E, D, R)
    # nf4 expert kernels: lazy on the quantized base == merged on the dequantized one
    q = jlora.quantize(frozen, lc, scheme="nf4", block_size=32)
    assert isinstance(q["w_in"], jlora.QuantizedArray)
    deq = jlora.dequantize(q)
    got = jax.jit(jlora.lora_apply(fn, lc, "lazy", strict=True))(q, lora, x)
    want = fn(jlora.merge(deq, lora, lc), x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    np.testing.assert_allclose(np.asarray(jlora.lora_apply(fn, lc, "merged")(q, lora, x)), np.asarray(want), atol=1e-5)


def test_expert_count_mismatch_names_both_shapes():
    lc = jlora.LoraConfig(rank=R, targets=r"w_in|w_out")

    def made(e):  # abstract: (frozen, lora) shapes only
        _, params, fn = _layer("ragged", False, e=e)
        return jax.eval_shape(lambda p: jlora.init(KEY, p, lc, apply_fn=fn, args=(_x(),)), params)

    frozen8, lora4 = made(8)[0], made(4)[1]
    with pytest.raises(ValueError, match=r"'w_in'.*\(4, 16, 8\).*\(8, 16, 8\)"):
        jlora.adapted(frozen8, lora4, lc)
    plain = {n: dict(lora4[n]) for n in lora4}  # plain dict nodes: the factor shapes are checked
    with pytest.raises(ValueError, match=r"'w_in'.*A \(4, 16, 2\) and B \(4, 2, 8\).*\(8, 16, 8\)"):
        jlora.adapted(frozen8, plain, lc)


def test_group_sizes_checked_eagerly_and_under_jit():
    sizes = jnp.array([3, 0, 2, 1], jnp.int32)
    assert jlora.moe.check_group_sizes(sizes, 6, n_experts=4) is sizes
    with pytest.raises(ValueError, match=r"group_sizes: the group sizes \[3, 0, 2, 1\] sum to 6 but the ragged_dot "
                                         r"input has 7 rows.*Fix"):
        jlora.moe.check_group_sizes(sizes, 7)
    with pytest.raises(ValueError, match=r"4 group sizes for an expert kernel of 8 experts"):
        jlora.moe.check_group_sizes(sizes, 6, n_experts=8)
    with pytest.raises(TypeError, match=r"1-D int array"):
        jlora.moe.check_group_sizes(sizes.astype(jnp.float32), 6)

    def layer(w, x, s):
        return lax.ragged_dot(x, w, jlora.moe.check_group_sizes(s, x.shape[0]))

    w, x = jnp.ones((4, 3, 2)), jnp.ones((6, 3))
    checked = checkify.checkify(jax.jit(layer))
    err, _ = checked(w, x, sizes)
    err.throw()  # no error
    err, _ = checked(w, x, jnp.array([3, 0, 2, 2], jnp.int32))
    with pytest.raises(checkify.JaxRuntimeError, match=r"sum to 7 but the ragged_dot input has 6 rows"):
        err.throw()
    order, got = jlora.moe.group_tokens(jnp.array([1, 3, 1, 0]), 4)
    assert got.tolist() == [1, 2, 0, 1] and order.tolist() == [3, 0, 2, 1]


_TRAIN = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, sys.argv[1])
    import jax
    assert jax.device_count() == 8, jax.devices()
    from examples import moe_train
    one = moe_train.train(steps=4, devices=1)
    eight = moe_train.train(steps=4, devices=8)
    print(json.dumps({"one": one["losses"], "eight": eight["losses"], "specs": eight["specs"],
                      "lora": {p: float(abs(one["lora"][p] - eight["lora"][p]).max()) for p in one["lora"]}}))
""")


def test_example_trains_and_experts_shard_on_8_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", _TRAIN, str(ROOT)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(res["eight"], res["one"], rtol=1e-5)
    assert max(res["lora"].values()) < 1e-4, res["lora"]  # after 4 adam steps (which amplify tiny gradients)
    assert res["one"][-1] < res["one"][0], res["one"]
    assert res["specs"]["params/layer_0/moe/w_in/A"] == "PartitionSpec('expert', None, None)"
    assert res["specs"]["params/layer_0/moe/w_out/B"] == "PartitionSpec('expert', None, None)"
