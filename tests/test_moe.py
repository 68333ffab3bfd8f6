"""LoRA on mixture-of-experts expert kernels (examples/models/moe_routing.py: token routing, the lazy rewrite of ragged_dot / batched
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
from examples.models import moe_routing

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


@pytest.mark.parametrize("shared", ["A", "B"])
def test_factor_shared_across_experts_on_ragged_dot(shared):
    """One A for all experts (the expert axis stated as an output axis: A (in, r), B (r, E, out)) or
    one B (expert axis as an input axis: A (E, in, r), B (r, out)): lazy on ragged_dot == float64."""
    cfg, params, fn = _layer("ragged", True)
    roles = "ooi" if shared == "A" else "ioi"  # stored (E, out, in)
    lc = jlora.LoraConfig(rank=R, alpha=2.0 * R, targets=r"w_in|w_out", layout={r"w_in|w_out": roles})
    x = _x()
    frozen, lora = jlora.init(KEY, params, lc, apply_fn=fn, args=(x,))
    lora = _randomise(lora)
    a, b = lora["w_in"]["A"], lora["w_in"]["B"]
    assert (a.shape, b.shape) == (((D, R), (R, E, H)) if shared == "A" else ((E, D, R), (R, H)))
    per_expert = {}  # the same adapter written as per-expert factors, for the float64 reference
    for name, node in lora.items():
        a, b = np.asarray(node["A"]), np.asarray(node["B"])
        if shared == "A":
            per_expert[name] = {"A": np.broadcast_to(a, (E,) + a.shape), "B": np.transpose(b, (1, 0, 2))}
        else:
            per_expert[name] = {"A": a, "B": np.broadcast_to(b, (E,) + b.shape)}
    want = _reference(frozen, per_expert, cfg, x, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(jlora.lora_apply(fn, lc, "lazy", strict=True))(frozen, lora, x)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jlora.lora_apply(fn, lc, "merged")(frozen, lora, x)), want, atol=1e-5,
                               rtol=1e-5)


def test_einsum_summing_the_expert_axis_with_combine_weights():
    """Dense dispatch with the combine folded into the contraction (``tef,efd->td``: the expert axis
    is summed): read from the trace it is an input axis (one shared B); stated ``'sio'`` it gets
    per-expert factors, and the lazy rewrite batches x·A over experts and sums them with r in (x·A)·B."""
    rng = np.random.default_rng(3)
    w0 = jnp.asarray(rng.normal(size=(E, H, D)) / 3, jnp.float32)
    combine = jnp.asarray(rng.random((T, E)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(T, E, H)), jnp.float32)

    def apply(p, h):
        return jnp.einsum("teh,ehd->td", h * combine[:, :, None], p["w"])

    for roles, shapes in ((None, ((E, H, R), (R, D))), ("sio", ((E, H, R), (E, R, D)))):
        lc = jlora.LoraConfig(rank=R, alpha=2.0 * R, targets="w", layout={"w": roles} if roles else ())
        frozen, lora = jlora.init(KEY, {"w": w0}, lc, apply_fn=apply, args=(h,))
        assert lora["w"].layout.roles == (roles or "iio")
        assert (lora["w"]["A"].shape, lora["w"]["B"].shape) == shapes
        lora = _randomise(lora)
        a, b = np.asarray(lora["w"]["A"], np.float64), np.asarray(lora["w"]["B"], np.float64)
        delta = 2.0 * (np.einsum("ehr,erd->ehd", a, b) if roles else np.einsum("ehr,rd->ehd", a, b))
        want = np.einsum("teh,ehd->td", np.asarray(h * combine[:, :, None], np.float64),
                         np.asarray(w0, np.float64) + delta)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            lazy = jlora.lora_apply(apply, lc, "lazy", strict=True)
            got = jax.jit(lazy)(frozen, lora, h)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
        merged = jlora.lora_apply(apply, lc, "merged")
        g = jax.jit(jax.grad(lambda l: jnp.sum(lazy(frozen, l, h) ** 2)))(lora)
        g_ref = jax.jit(jax.grad(lambda l: jnp.sum(merged(frozen, l, h) ** 2)))(lora)
        for part in "AB":
            ref = np.asarray(g_ref["w"][part])
            np.testing.assert_allclose(np.asarray(g["w"][part]), ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("loop", ["fori_loop", "scan"])
def test_expert_loops_in_lax_control_flow(loop):
    """Experts visited by ``lax.fori_loop`` (``dynamic_index_in_dim(W, e)``) or ``lax.scan`` over the
    expert axis: per-expert factors, lazy (strict) == float64."""
    rng = np.random.default_rng(4)
    w0 = jnp.asarray(rng.normal(size=(E, D, H)) / 4, jnp.float32)
    combine = jnp.asarray(rng.random((T, E)), jnp.float32)

    def fori(p, x):
        def body(e, acc):
            w = lax.dynamic_index_in_dim(p["w"], e, 0, keepdims=False)
            return acc + lax.dynamic_index_in_dim(combine, e, 1, keepdims=True) * (x @ w)
        return lax.fori_loop(0, E, body, jnp.zeros((x.shape[0], H)))

    def scan(p, x):
        return lax.scan(lambda acc, wc: (acc + wc[1][:, None] * (x @ wc[0]), None), jnp.zeros((x.shape[0], H)),
                        (p["w"], combine.T))[0]

    apply = fori if loop == "fori_loop" else scan
    lc = jlora.LoraConfig(rank=R, alpha=2.0 * R, targets="w")
    x = _x()
    frozen, lora = jlora.init(KEY, {"w": w0}, lc, apply_fn=apply, args=(x,))
    assert lora["w"].layout.roles == "sio" and lora["w"]["B"].shape == (E, R, H)
    lora = _randomise(lora)
    w = np.asarray(w0, np.float64) + 2.0 * np.einsum("eir,ero->eio", np.asarray(lora["w"]["A"], np.float64),
                                                     np.asarray(lora["w"]["B"], np.float64))
    per_expert = np.einsum("ti,eio->teo", np.asarray(x, np.float64), w)
    want = np.einsum("te,ted->td", np.asarray(combine, np.float64), per_expert)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(jlora.lora_apply(apply, lc, "lazy", strict=True))(frozen, lora, x)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


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
    assert moe_routing.check_group_sizes(sizes, 6, n_experts=4) is sizes
    with pytest.raises(ValueError, match=r"group_sizes: the group sizes \[3, 0, 2, 1\] sum to 6 but the ragged_dot "
                                         r"input has 7 rows.*Fix"):
        moe_routing.check_group_sizes(sizes, 7)
    with pytest.raises(ValueError, match=r"4 group sizes for an expert kernel of 8 experts"):
        moe_routing.check_group_sizes(sizes, 6, n_experts=8)
    with pytest.raises(TypeError, match=r"1-D int array"):
        moe_routing.check_group_sizes(sizes.astype(jnp.float32), 6)

    def layer(w, x, s):
        return lax.ragged_dot(x, w, moe_routing.check_group_sizes(s, x.shape[0]))

    w, x = jnp.ones((4, 3, 2)), jnp.ones((6, 3))
    checked = checkify.checkify(jax.jit(layer))
    err, _ = checked(w, x, sizes)
    err.throw()  # no error
    err, _ = checked(w, x, jnp.array([3, 0, 2, 2], jnp.int32))
    with pytest.raises(checkify.JaxRuntimeError, match=r"sum to 7 but the ragged_dot input has 6 rows"):
        err.throw()
    order, got = moe_routing.group_tokens(jnp.array([1, 3, 1, 0]), 4)
    assert got.tolist() == [1, 2, 0, 1] and order.tolist() == [3, 0, 2, 1]


_TRAIN = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, sys.argv[1])
    import jax
    assert jax.device_count() == 8, jax.devices()
    from examples import moe_train
    small = moe_train.M.MoEConfig(vocab=16, d=16, hidden=16, experts=8, top_k=2, layers=1)
    one = moe_train.train(steps=4, devices=1, cfg=small)
    eight = moe_train.train(steps=4, devices=8, cfg=small)
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
    assert res["specs"]["params/layer_0/moe/w_in/A"] == "P('expert', None, None)"
    assert res["specs"]["params/layer_0/moe/w_out/B"] == "P('expert', None, None)"


# --- PEFT target_parameters on transformers' Qwen3-MoE --------------------------------------------

QWEN_MAP = [(r"experts/(gate_up_proj|down_proj)", r"model.layers.0.mlp.experts.\1")]
RAGGED_NT = lax.RaggedDotDimensionNumbers((((1,), (2,)), ((), ())), (0,), (0,))  # kernel (E, out, in)


def qwen3_moe_block(p, x, top_k):
    """A JAX port of transformers' ``Qwen3MoeSparseMoeBlock`` on tokens (T, H) (norm_topk_prob=True),
    experts as stored by transformers, ``(E, out, in)``, run with ``ragged_dot_general``."""
    probs = jax.nn.softmax(x @ p["gate"]["weight"].T, axis=-1)
    top, ids = lax.top_k(probs, top_k)
    top = top / top.sum(-1, keepdims=True)
    e = p["experts"]["gate_up_proj"].shape[0]
    order, sizes = moe_routing.group_tokens(ids.reshape(-1), e)
    xs = x[order // top_k]
    gate, up = jnp.split(lax.ragged_dot_general(xs, p["experts"]["gate_up_proj"], sizes, RAGGED_NT), 2, axis=-1)
    ys = lax.ragged_dot_general(jax.nn.silu(gate) * up, p["experts"]["down_proj"], sizes, RAGGED_NT)
    return jnp.einsum("tkh,tk->th", ys[jnp.argsort(order)].reshape(x.shape[0], top_k, -1), top)


@pytest.fixture(scope="module")
def qwen():
    import torch  # installed by the test extra
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[])

    def model():
        torch.manual_seed(0)
        return Qwen3MoeForCausalLM(cfg).eval()

    mlp = model().model.layers[0].mlp
    params = {"experts": {n: jnp.asarray(getattr(mlp.experts, n).detach().numpy()) for n in ("gate_up_proj",
                                                                                          "down_proj")},
              "gate": {"weight": jnp.asarray(mlp.gate.weight.detach().numpy())}}
    x = _x(10, 16, seed=4)
    return torch, model, params, x, (lambda p, xx: qwen3_moe_block(p, xx, 2))


def _torch_block(torch, peft_model, x):
    with torch.no_grad():
        mlp = peft_model.base_model.model.model.layers[0].mlp
        return mlp(torch.from_numpy(np.array(x))[None]).numpy()[0]  # a writable copy for torch


# PEFT 0.21 checks rank_pattern keys against target_modules only and warns that the expert key is ignored, yet
# applies it to target_parameters (the rank-3 down_proj below loads and matches): its warning, not a jlora fault
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match any targeted module")
def test_peft_target_parameters_export(qwen, tmp_path):
    torch, model, params, x, block = qwen
    from peft import PeftModel

    lc = jlora.LoraConfig(rank=2, alpha=5.0, targets=r"experts/.*", rank_pattern={r".*down_proj": 3})
    frozen, lora = jlora.init(KEY, params, lc, apply_fn=block, args=(x,))
    assert lora["experts"]["gate_up_proj"].layout.roles == "soi"
    assert lora["experts"]["down_proj"]["A"].shape == (4, 8, 3)
    lora = _randomise(lora)
    out = jlora.peft.save(tmp_path, lora, lc, QWEN_MAP)
    body = json.loads((out / "adapter_config.json").read_text())
    assert sorted(body["target_parameters"]) == ["model.layers.0.mlp.experts.down_proj",
                                                 "model.layers.0.mlp.experts.gate_up_proj"]
    assert body["rank_pattern"] == {r"model\.layers\.0\.mlp\.experts\.down_proj": 3}
    pm = PeftModel.from_pretrained(model(), str(out))
    got = jax.jit(jlora.lora_apply(block, lc, "lazy", strict=True))(frozen, lora, x)
    want = _torch_block(torch, pm, x)
    assert np.abs(want - np.asarray(block(frozen, x))).max() > 1e-2  # the adapter changes the output
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
    # and back: the exported file reads into the same factors
    with pytest.raises(ValueError, match=r"cannot tell which axis of the expert kernel 'experts/gate_up_proj' "
                                         r"\(4, 16, 16\) is the input.*fix: pass apply_fn/args"):
        jlora.peft.load(out, params, QWEN_MAP)  # (E, 2I, H) with 2I == H: the sizes do not tell
    back, cfg = jlora.peft.load(out, params, QWEN_MAP, layouts=jlora.kernel_layouts(lora))
    for name in ("gate_up_proj", "down_proj"):
        for part in "AB":
            np.testing.assert_array_equal(np.asarray(back["experts"][name][part]),
                                          np.asarray(lora["experts"][name][part]))
    assert cfg.scale_for("experts/down_proj") == 5.0 / 3


def test_peft_target_parameters_import_and_bad_ranks(qwen, tmp_path):
    torch, model, params, x, block = qwen
    import peft

    pcfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=[], init_lora_weights=False,
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm = peft.get_peft_model(model(), pcfg)
    pm.save_pretrained(str(tmp_path / "a"))
    lora, lc = jlora.peft.load(tmp_path / "a", params, QWEN_MAP, apply_fn=block, args=(x,))
    node = lora["experts"]["gate_up_proj"]
    assert node.layout.roles == "soi" and node["A"].shape == (4, 16, 2)
    got = jlora.lora_apply(block, lc, "lazy", strict=True)(params, lora, x)
    np.testing.assert_allclose(np.asarray(got), _torch_block(torch, pm, x), atol=1e-4)
    # a config whose r does not match the stored r·E sizes, and sizes that are no multiple of E
    body = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(body, r=3)))
    with pytest.raises(ValueError, match=r"lora_A rows = 8, but PEFT stores rank r per expert as r·E = 3·4 = 12.*"
                                         r"fits rank 2"):
        jlora.peft.load(tmp_path / "a", params, QWEN_MAP, apply_fn=block, args=(x,))
    from safetensors.numpy import load_file, save_file
    t = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    t = {k: (v[:7] if k.endswith("base_layer.lora_A.weight") else v) for k, v in t.items()}
    save_file(t, str(tmp_path / "a" / "adapter_model.safetensors"))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(body))
    with pytest.raises(ValueError, match=r"lora_A rows = 7.*not a multiple of 4 experts"):
        jlora.peft.load(tmp_path / "a", params, QWEN_MAP, layouts=jlora.kernel_layouts(lora))


# --- tunix Qwen3-MoE (Flax NNX; experts indexed W[i] on its CPU path) -------------------------------

def _tunix(name):
    """``tunix.<name>`` without tunix's package ``__init__`` (it imports trainers needing metrax)."""
    import importlib
    import importlib.machinery
    import importlib.util

    if "tunix" not in sys.modules:
        spec = importlib.util.find_spec("tunix")
        if spec is None:
            raise ImportError("No module named 'tunix'")
        bare = importlib.machinery.ModuleSpec("tunix", None, origin=spec.origin, is_package=True)
        bare.submodule_search_locations = list(spec.submodule_search_locations)
        sys.modules["tunix"] = importlib.util.module_from_spec(bare)
    return importlib.import_module(f"tunix.{name}")


def test_tunix_qwen3_moe_lazy_strict():
    q3 = _tunix("models.qwen3.model")  # google-tunix is installed by scripts/setup.sh
    from flax import nnx

    cfg = q3.ModelConfig(num_layers=1, vocab_size=32, embed_dim=16, hidden_dim=8, num_heads=2, head_dim=8,
                         num_kv_heads=1, rope_theta=10_000, norm_eps=1e-6, num_experts=4, num_experts_per_tok=2)
    graphdef, state = nnx.split(q3.Qwen3(cfg, rngs=nnx.Rngs(0)))
    b, t = 2, 6
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 32, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))

    def apply(state, tokens):
        return nnx.merge(graphdef, state)(tokens, pos, None, mask)[0]

    lc = jlora.LoraConfig(rank=2, targets=(r"layers/0/mlp/(gate|up|down)_proj", r"layers/0/attn/(q|o)_proj/w"))
    frozen, lora = jlora.init(KEY, state, lc, apply_fn=apply, args=(tokens,))
    node = jlora.kernel_layouts(lora)["layers/0/mlp/down_proj"]
    shapes = {p: x.shape for p, x in jlora.paths.flatten(lora).items()}
    assert node.roles == "sio", node
    assert shapes["layers/0/mlp/down_proj/A"] == (4, 8, 2) and shapes["layers/0/mlp/down_proj/B"] == (4, 2, 16)
    lora = _randomise(lora, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", DeprecationWarning)  # tunix reads Variable.value
        got = jax.jit(jlora.lora_apply(apply, lc, "lazy", strict=True))(frozen, lora, tokens)
    want = jax.jit(apply)(jlora.merge(frozen, lora, lc), tokens)
    assert np.abs(np.asarray(want) - np.asarray(jax.jit(apply)(frozen, tokens))).max() > 1e-2
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
