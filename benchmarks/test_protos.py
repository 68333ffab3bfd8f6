"""The issue-17 prototypes compute what jlora's merged mode computes (losses, gradients), and scale.py runs.

Tiny shapes; no timing assertions. References: ``jlora.lora_apply(mode="merged")`` autodiff (the merged
kernel W0 + s·A⊗B formed explicitly), float32, relative tolerance 1e-5 on gradients.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from benchmarks import conv_forms as C
from benchmarks import llama_shapes as L
from benchmarks import scale as S
from benchmarks import variants as V
from benchmarks import workloads as W


def _rel(ga, gb) -> float:
    return max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
               for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)))


def test_conv_forms_and_rule_match_merged_gradients() -> None:
    wl = V.conv_workload(W.ConvConfig(channels=(8, 16), image=8, batch=4), W.LoraSpec(rank=4, alpha=8.0))
    ref = V.jlora_merged(wl)
    l0, g0 = jax.jit(jax.value_and_grad(ref.loss_fn))(ref.trainable, ref.frozen, wl.batch)
    for name, build in C.FORMS.items():
        if not name.startswith(("jlora", "e one")):  # the recommended forms only (compile time)
            continue
        v = build(wl)
        loss, g = jax.jit(jax.value_and_grad(v.loss_fn))(v.trainable, v.frozen, wl.batch)
        assert abs(float(loss) - float(l0)) <= 1e-5 * abs(float(l0)), name
        assert _rel(g, g0) < 1e-5, name


def test_flat_interpreter_matches_merged_on_llama_and_gpt() -> None:
    from benchmarks.proto_flat import flat_lazy

    cfg = dataclasses.replace(L.SMOLLM2_135M, vocab=64, d_model=48, layers=2, heads=6, kv_heads=2, ffn=64,
                              seq=8, batch=2)
    m = L.Llama(cfg)
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
    params = m.init(jax.random.PRNGKey(0), tok)
    lc = jlora.LoraConfig(rank=4, alpha=8.0, targets=L.TARGET_REGEX)
    frozen, lora = jlora.init(jax.random.PRNGKey(1), params, lc)
    lora = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape), lora)
    merged = jlora.lora_apply(m.apply, lc, mode="merged")
    lazy = jlora.lora_apply(m.apply, lc, mode="lazy")
    g0 = jax.jit(jax.grad(lambda lo: L.lm_loss(merged(frozen, lo, tok), tok)))(lora)
    with flat_lazy():
        g = jax.jit(jax.grad(lambda lo: L.lm_loss(lazy(frozen, lo, tok), tok)))(lora)
    assert _rel(g, g0) < 1e-5
    wl = V.gpt_workload(W.GPTConfig(vocab=256, d_model=64, layers=2, heads=4, mlp=128, seq=16, batch=2),
                        W.LoraSpec())
    v, r = V.jlora_lazy(wl), V.jlora_merged(wl)
    with flat_lazy():
        g = jax.jit(jax.grad(v.loss_fn))(v.trainable, v.frozen, wl.batch)
    assert _rel(g, jax.jit(jax.grad(r.loss_fn))(r.trainable, r.frozen, wl.batch)) < 1e-5


def test_scale_smoke_one_layer() -> None:
    cfg = dataclasses.replace(L.SMOLLM2_135M, layers=1, seq=64)
    res = S.run(cfg, ("full FT", "jlora lazy", "probe"), lambda s: None)
    rows = res["rows"]
    assert rows["jlora lazy"]["peak"] < rows["full FT"]["peak"]
    assert rows["probe"]["temp"] < res["floor_temp"]
    assert res["adapted_input_bytes"] == 4 * 64 * (3 * 576 + 1536)
