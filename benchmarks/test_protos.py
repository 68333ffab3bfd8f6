"""The issue-17 prototypes compute what jlora's merged mode computes (losses, gradients), and scale.py runs.

Tiny shapes; no timing assertions. References: ``jlora.lora_apply(mode="merged")`` autodiff (the merged
kernel W0 + s·A⊗B formed explicitly), float32, relative tolerance 1e-5 on gradients.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

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


def test_scale_smoke_one_layer() -> None:
    cfg = dataclasses.replace(L.SMOLLM2_135M, layers=1, seq=64)
    res = S.run(cfg, ("full FT", "jlora lazy", "probe"), lambda s: None)
    rows = res["rows"]
    assert rows["jlora lazy"]["peak"] < rows["full FT"]["peak"]
    assert rows["probe"]["temp"] < res["floor_temp"]
    assert res["adapted_input_bytes"] == 4 * 64 * (3 * 576 + 1536)
