"""Axis roles of every kernel layout (jlora.layout, jlora.trace._analysis) against float64 NumPy references.

Each case is a stock JAX/Flax use of a kernel whose stored axis order is not ``stack + in + out``
(Gemma's einsums, ``(out, in)`` kernels, OIHW / grouped / depthwise / transposed convs, stacked
experts indexed per expert, kernels behind reshape / transpose / rev views). For each: the roles
``jlora.init`` reads from the trace, the factor shapes, the merged kernel against an independent
``np.einsum`` of A and B written with the expected roles, lazy (``strict=True``, no warning) ==
merged == the plain model on ``W0 + delta``, and gradients of lazy against merged.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import jlora
from jlora.layout import Layout, LoraKernel

KEY = jax.random.key(0)


def normal(key, *shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def conv(x, w, spec="HWIO", groups=1, **kw):
    return lax.conv_general_dilated(x, w, (1, 1), kw.pop("padding", "SAME"), dimension_numbers=("NHWC", spec, "NHWC"),
                                    feature_group_count=groups, **kw)


E_IDX = jnp.asarray(1)

# name: (apply(params, x), params, x, rank, roles, (A shape, B shape), einsum "A,B->W" (W may need a reshape))
CASES = {
    "gemma_q_einsum": (lambda p, x: jnp.einsum("btd,ndh->btnh", x, p["w"]), {"w": normal(1, 4, 16, 8)},
                       normal(2, 2, 5, 16), 2, "oio", ((16, 2), (2, 4, 8)), "dr,rnh->ndh"),
    "gemma_kv_einsum": (lambda p, x: jnp.einsum("bsd,ckdh->cbskh", x, p["w"]), {"w": normal(1, 2, 2, 16, 8)},
                        normal(2, 2, 5, 16), 2, "ooio", ((16, 2), (2, 2, 2, 8)), "dr,rckh->ckdh"),
    "gemma_attn_vec": (lambda p, x: jnp.einsum("btnh,nhd->btd", x, p["w"]), {"w": normal(1, 4, 8, 16)},
                       normal(2, 2, 5, 4, 8), 3, "iio", ((4, 8, 3), (3, 16)), "nhr,rd->nhd"),
    "flax_einsum_attn_vec": (lambda p, x: nn.Einsum((4, 8, 16), "btnh,nhd->btd", use_bias=False).apply(p, x),
                             {"params": {"kernel": normal(1, 4, 8, 16)}}, normal(2, 2, 5, 4, 8), 2, "iio",
                             ((4, 8, 2), (2, 16)), "nhr,rd->nhd"),
    "heads_as_batch": (lambda p, x: jnp.einsum("bnd,ndh->bnh", x, p["w"]), {"w": normal(1, 4, 16, 8)},
                       normal(2, 3, 4, 16), 2, "sio", ((4, 16, 2), (4, 2, 8)), "ndr,nrh->ndh"),
    "out_in_dense": (lambda p, x: x @ p["w"].T, {"w": normal(1, 32, 16)}, normal(2, 3, 16), 4, "oi",
                     ((16, 4), (4, 32)), "ir,ro->oi"),
    "out_in_dense_vmapped": (lambda p, x: jax.vmap(lambda v: p["w"] @ v)(x), {"w": normal(1, 24, 16)},
                             normal(2, 5, 16), 4, "oi", ((16, 4), (4, 24)), "ir,ro->oi"),
    "reshape_view": (lambda p, x: x @ p["w"].reshape(16, 8), {"w": normal(1, 16, 2, 4)}, normal(2, 3, 16), 2, "ioo",
                     ((16, 2), (2, 2, 4)), "ir,rab->iab"),
    "transpose_view": (lambda p, x: x @ jnp.transpose(p["w"]), {"w": normal(1, 8, 16)}, normal(2, 3, 16), 2, "oi",
                       ((16, 2), (2, 8)), "ir,ro->oi"),
    "rev_view": (lambda p, x: x @ p["w"][::-1], {"w": normal(1, 16, 8)}, normal(2, 3, 16), 2, "io",
                 ((16, 2), (2, 8)), "ir,ro->io"),
    "expert_static_index": (lambda p, x: x @ p["w"][1], {"w": normal(1, 3, 16, 8)}, normal(2, 5, 16), 2, "sio",
                            ((3, 16, 2), (3, 2, 8)), "eir,ero->eio"),
    "expert_take": (lambda p, x: x @ jnp.take(p["w"], E_IDX + 0 * x.shape[0], axis=0), {"w": normal(1, 3, 16, 8)},
                    normal(2, 5, 16), 2, "sio", ((3, 16, 2), (3, 2, 8)), "eir,ero->eio"),
    "expert_dynamic_index": (lambda p, x: x @ lax.dynamic_index_in_dim(p["w"], jnp.argmax(x[0, :3]), 0, False),
                             {"w": normal(1, 3, 16, 8)}, normal(2, 5, 16), 2, "sio", ((3, 16, 2), (3, 2, 8)),
                             "eir,ero->eio"),
    "experts_dense_dispatch": (lambda p, x: jnp.einsum("ted,edf->tf", jnp.broadcast_to(x, (3,) + x.shape)
                                                       .transpose(1, 0, 2) * jnp.arange(1.0, 4.0)[None, :, None], p["w"]),
                               {"w": normal(1, 3, 16, 8)}, normal(2, 5, 16), 2, "iio", ((3, 16, 2), (2, 8)),
                               "edr,rf->edf"),
    "experts_batched": (lambda p, x: jnp.einsum("etd,edf->etf", x, p["w"]), {"w": normal(1, 3, 16, 8)},
                        normal(2, 3, 5, 16), 2, "sio", ((3, 16, 2), (3, 2, 8)), "eir,ero->eio"),
    "scan_layers": (lambda p, x: lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, p["w"])[0],
                    {"w": normal(1, 3, 16, 16) * 0.3}, normal(2, 4, 16), 2, "sio", ((3, 16, 2), (3, 2, 16)),
                    "lir,lro->lio"),
    "conv_oihw": (lambda p, x: conv(x, p["w"], "OIHW"), {"w": normal(1, 6, 4, 3, 3)}, normal(2, 2, 8, 8, 4), 2,
                  "oiii", ((4, 3, 3, 2), (2, 6)), "ihwr,ro->oihw"),
    "conv_grouped": (lambda p, x: nn.Conv(6, (3, 3), feature_group_count=2, use_bias=False).apply(p, x),
                     {"params": {"kernel": normal(1, 3, 3, 2, 6)}}, normal(2, 2, 8, 8, 4), 4, "iiiso",
                     ((2, 3, 3, 2, 2), (2, 2, 3)), "ghwcr,gro->hwcgo"),
    "conv_depthwise": (lambda p, x: conv(x, p["w"].reshape(3, 3, 1, 8), groups=4), {"w": normal(1, 3, 3, 4, 2)},
                       normal(2, 2, 8, 8, 4), 4, "iiso", ((4, 3, 3, 1), (4, 1, 2)), "ghwr,gro->hwgo"),
    "conv_transpose": (lambda p, x: nn.ConvTranspose(6, (3, 3), strides=(2, 2), use_bias=False).apply(p, x),
                       {"params": {"kernel": normal(1, 3, 3, 4, 6)}}, normal(2, 2, 5, 5, 4), 2, "iiio",
                       ((3, 3, 4, 2), (2, 6)), "hwir,ro->hwio"),
    "conv_transpose_rev": (lambda p, x: conv(x, lax.rev(p["w"], (0, 1)), padding=((2, 2), (2, 2)), lhs_dilation=(2, 2)),
                           {"w": normal(1, 3, 3, 4, 6)}, normal(2, 2, 5, 5, 4), 2, "iiio", ((3, 3, 4, 2), (2, 6)),
                           "hwir,ro->hwio"),
}


def _kernel_path(params):
    return next(p for p in jlora.paths.flatten(params))


def _reference_delta(case, a, b, shape, scale):
    spec = CASES[case][6]
    d = np.einsum(spec, np.asarray(a, np.float64), np.asarray(b, np.float64)) * scale
    return d.reshape(shape)


def _with(params, path, value):
    return jlora.paths.map_with_path(lambda p, w: jnp.asarray(value, w.dtype) if p == path else w, params)


def _randomise(lora):
    def one(kp, x):
        name = jlora.paths.path_str(kp)
        return normal(7 + len(name) + (name.endswith("/B")), *x.shape) * 0.5
    return jax.tree_util.tree_map_with_path(one, lora)


@pytest.mark.parametrize("case", sorted(CASES))
def test_layout_case(case):
    apply, params, x, rank, roles, (a_shape, b_shape), _ = CASES[case]
    cfg = jlora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=".*")
    frozen, lora = jlora.init(KEY, params, cfg, apply_fn=apply, args=(x,))
    path = _kernel_path(params)
    node = lora
    for k in path.split("/"):
        node = node[k]
    assert isinstance(node, LoraKernel)
    assert node.layout.roles == roles, node.layout
    assert (tuple(node["A"].shape), tuple(node["B"].shape)) == (a_shape, b_shape)
    lora = _randomise(lora)
    flat = jlora.paths.flatten(lora)
    w0 = np.asarray(jlora.paths.flatten(params)[path], np.float64)
    delta = _reference_delta(case, flat[path + "/A"], flat[path + "/B"], w0.shape, 2.0)
    # merge against the float64 reference
    merged = jlora.paths.flatten(jlora.merge(frozen, lora, cfg))[path]
    np.testing.assert_allclose(np.asarray(merged), w0 + delta, rtol=1e-5, atol=1e-5)
    # outputs: lazy (strict, no warning) == merged mode == the plain model on W0 + delta
    want = np.asarray(apply(_with(params, path, w0 + delta), x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lazy = jlora.lora_apply(apply, cfg, "lazy", strict=True)
        got = np.asarray(jax.jit(lazy)(frozen, lora, x))
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got / scale, want / scale, atol=1e-5)
    mrg = jlora.lora_apply(apply, cfg, "merged")
    np.testing.assert_allclose(np.asarray(mrg(frozen, lora, x)) / scale, want / scale, atol=1e-5)
    # gradients reach the factors alike in both modes
    ct = normal(11, *want.shape)
    g_lazy = jax.grad(lambda l: jnp.sum(lazy(frozen, l, x) * ct))(lora)
    g_mrg = jax.grad(lambda l: jnp.sum(mrg(frozen, l, x) * ct))(lora)
    for p, g in jlora.paths.flatten(g_lazy).items():
        ref = np.asarray(jlora.paths.flatten(g_mrg)[p])
        np.testing.assert_allclose(np.asarray(g) / max(1.0, np.abs(ref).max()), ref / max(1.0, np.abs(ref).max()),
                                   atol=1e-4, err_msg=f"{case}: gradient of {p}")


def test_lazy_flops_below_merged_for_permuted_kernels():
    d, n, h = 256, 4, 64
    params = {"q": normal(1, n, d, h), "o": normal(2, n, h, d)}

    def apply(p, x):
        q = jnp.einsum("btd,ndh->btnh", x, p["q"])
        return jnp.einsum("btnh,nhd->btd", q, p["o"])

    x = normal(3, 2, 8, d)
    cfg = jlora.LoraConfig(rank=4, targets=".*")
    frozen, lora = jlora.init(KEY, params, cfg, apply_fn=apply, args=(x,))

    def flops(mode):
        fn = jlora.lora_apply(apply, cfg, mode, strict=mode == "lazy")
        step = jax.jit(jax.value_and_grad(lambda l: jnp.sum(fn(frozen, l, x) ** 2)))
        return step.lower(lora).compile().cost_analysis()["flops"]

    lazy, merged = flops("lazy"), flops("merged")
    assert lazy < 0.6 * merged, (lazy, merged)


def test_uses_that_disagree_name_both_and_the_fix():
    params = {"w": normal(1, 16, 16)}

    def apply(p, x):
        return x @ p["w"] + x @ p["w"].T

    with pytest.raises(ValueError, match=r"cannot tell the axis roles of 'w': the trace says its uses disagree.*'io'.*'oi'.*"
                                         r"LoraConfig\(layout="):
        jlora.init(KEY, params, jlora.LoraConfig(targets="w"), apply_fn=apply, args=(normal(2, 3, 16),))


def test_stated_layout_overrides_the_trace_and_without_trace():
    params = {"w": normal(1, 32, 16)}
    cfg = jlora.LoraConfig(rank=2, targets="w", layout={"w": "oi"})
    _, lora = jlora.init(KEY, params, cfg)
    assert lora["w"].layout.roles == "oi" and lora["w"]["A"].shape == (16, 2)
    with pytest.raises(ValueError, match=r"LoraConfig.layout.*'w'.*3 axes.*shape \(32, 16\)"):
        jlora.init(KEY, params, cfg.replace(layout={"w": "oio"}))
    with pytest.raises(ValueError, match=r"LoraConfig.layout\[.*expected one letter per kernel axis"):
        jlora.LoraConfig(targets="w", layout={"w": "ox"})


def test_grouped_conv_rank_is_total_over_groups():
    apply, params, x, *_ = CASES["conv_grouped"]
    with pytest.raises(ValueError, match=r"grouped conv with 2 feature groups.*multiple of 2, got 3.*rank_pattern"):
        jlora.init(KEY, params, jlora.LoraConfig(rank=3, targets=".*"), apply_fn=apply, args=(x,))


def test_layout_travels_through_jit_grad_optax_and_json():
    apply, params, x, *_ = CASES["gemma_q_einsum"]
    cfg = jlora.LoraConfig(rank=2, targets=".*")
    frozen, lora = jlora.init(KEY, params, cfg, apply_fn=apply, args=(x,))
    tx = jlora.optimizer(optax.adam(1e-2), lora)
    fn = jlora.lora_apply(apply, cfg)

    @jax.jit
    def step(lora, state):
        g = jax.grad(lambda l: jnp.sum(fn(frozen, l, x) ** 2))(lora)
        u, state = tx.update(g, state, lora)
        return optax.apply_updates(lora, u), state

    new, _ = step(lora, tx.init(lora))
    assert new["w"].layout == lora["w"].layout
    assert Layout.from_json(lora["w"].layout.to_json()) == lora["w"].layout
    info = jlora.adapted(frozen, new, cfg)["w"]
    assert info.layout.roles == "oio" and info.rank == 2


def _letters(n):
    return "abcdefghjklmnpqtuvwxyz"[:n]


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_property_any_role_order(data):
    """Random stored orders of stack/in/out axes: init reads them from an einsum, merge matches np.einsum."""
    n_stack = data.draw(st.integers(0, 1))
    n_in = data.draw(st.integers(1, 2))
    n_out = data.draw(st.integers(1, 2))
    roles = list("s" * n_stack + "i" * n_in + "o" * n_out)
    roles = data.draw(st.permutations(roles))
    sizes = [data.draw(st.integers(2, 4)) for _ in roles]
    rank = data.draw(st.integers(1, 2))
    letters = _letters(len(roles))
    w_spec = "".join(letters)
    stack = "".join(c for c, r in zip(letters, roles) if r == "s")
    ins = "".join(c for c, r in zip(letters, roles) if r == "i")
    outs = "".join(c for c, r in zip(letters, roles) if r == "o")
    x_spec = "z" + stack + ins
    y_spec = "z" + stack + outs
    params = {"w": normal(1, *sizes)}
    x = normal(2, 3, *[s for s, r in zip(sizes, roles) if r == "s"], *[s for s, r in zip(sizes, roles) if r == "i"])

    def apply(p, x):
        return jnp.einsum(f"{x_spec},{w_spec}->{y_spec}", x, p["w"])

    cfg = jlora.LoraConfig(rank=rank, alpha=1.0, targets="w")
    frozen, lora = jlora.init(KEY, params, cfg, apply_fn=apply, args=(x,))
    assert lora["w"].layout.roles == "".join(roles)
    lora = _randomise(lora)
    a, b = np.asarray(lora["w"]["A"], np.float64), np.asarray(lora["w"]["B"], np.float64)
    delta = np.einsum(f"{stack}{ins}r,{stack}r{outs}->{w_spec}", a, b) / rank
    merged = np.asarray(jlora.merge(frozen, lora, cfg)["w"])
    np.testing.assert_allclose(merged, np.asarray(params["w"], np.float64) + delta, rtol=1e-5, atol=1e-5)
    want = apply({"w": jnp.asarray(np.asarray(params["w"], np.float64) + delta, jnp.float32)}, x)
    got = jlora.lora_apply(apply, cfg, "lazy", strict=True)(frozen, lora, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


# --- the layout as the one source: stated roles, fused groups, leaf roles ----------------------------

def test_axes_and_stack_are_spellings_of_layout():
    params = {"w": normal(1, 3, 4, 5, 6)}
    spelled = jlora.LoraConfig(rank=2, targets="w", stack={"w": 1}, axes={"w": 2})
    stated = jlora.LoraConfig(rank=2, targets="w", layout={"w": "siio"})
    assert spelled.roles_for("w", (3, 4, 5, 6)) == "siio"
    one, two = jlora.init(KEY, params, spelled)[1]["w"], jlora.init(KEY, params, stated)[1]["w"]
    assert one.layout == two.layout == Layout((3, 4, 5, 6), "siio")
    assert (one["A"].shape, one["B"].shape) == ((3, 4, 5, 2), (3, 2, 6))
    with pytest.raises(ValueError, match=r"LoraConfig.axes/stack: a kernel of shape \(3, 4, 5, 6\) cannot have 1 "
                                         r"stacked and 3 input axes.*fix the LoraConfig.axes/stack rule for 'w'"):
        jlora.init(KEY, params, spelled.replace(axes={"w": 3}))


def test_fused_groups_live_in_the_layout():
    cfg = jlora.LoraConfig(rank=2, targets="qkv", fused={"qkv": (True, False, True)})
    frozen, lora = jlora.init(KEY, {"qkv": normal(2, 8, 12)}, cfg)
    lay = lora["qkv"].layout
    assert lay.fused == (True, False, True) and Layout.from_json(lay.to_json()) == lay
    assert lay.factor_shapes(2) == ((8, 4), (2, 2, 4)) and lay.max_rank() == 4
    lora = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape), lora)
    a, b = np.asarray(lora["qkv"]["A"], np.float64), np.asarray(lora["qkv"]["B"], np.float64)
    want = np.zeros((8, 12))  # independent reference: group g of the output gets A_e @ B_e for its enabled slot e
    for e, g in enumerate((0, 2)):
        want[:, 4 * g: 4 * g + 4] = cfg.scale_for("qkv") * a[:, 2 * e: 2 * e + 2] @ b[e]
    np.testing.assert_allclose(np.asarray(jlora.delta(frozen, lora, cfg)["qkv"]), want, rtol=1e-5, atol=1e-5)
    expanded = np.asarray(lay.expand_fused(lora["qkv"]["B"]), np.float64)  # the block-sparse B: (E·r, out)
    np.testing.assert_allclose(cfg.scale_for("qkv") * a @ expanded, want, rtol=1e-5, atol=1e-5)
    plain = {"qkv": {"A": lora["qkv"]["A"], "B": lora["qkv"]["B"]}}  # a plain dict node: groups from the config
    assert jlora.adapted(frozen, plain, cfg)["qkv"].fused == (True, False, True)
    with pytest.raises(ValueError, match=r"its layout has fused groups \(True, False, True\), the config None; fix"):
        jlora.adapted(frozen, lora, cfg.replace(fused=()))


def test_leaf_roles_come_from_the_nodes():
    from jlora.core._describe import leaf_roles

    lora = {"w": LoraKernel({"A": jnp.ones((3, 1)), "B": jnp.ones((1, 2)), "m": jnp.ones(2)}, Layout((3, 2), "io")),
            "plain": {"A": jnp.ones((3, 1)), "B": jnp.ones((1, 2)), "m": jnp.ones(2)},
            "emb": {"rows": jnp.ones((1, 2))}, "head": {"m": jnp.ones(2), "bias": jnp.ones(2)}}
    roles = {p: tuple(leaf) for p, leaf in leaf_roles(lora).items()}
    assert roles == {"w/A": ("w", "A"), "w/B": ("w", "B"), "w/m": ("w", "m"), "plain/A": ("plain", "A"),
                     "plain/B": ("plain", "B"), "plain/m": ("plain", "m"), "emb/rows": ("emb", "rows"),
                     "head/m": ("head/m", "whole"), "head/bias": ("head/bias", "whole")}
    assert leaf_roles(lora, {"plain/B"})["plain/B"] == ("plain/B", "whole")  # a frozen path is trained whole


def test_optimizer_labels_say_the_learning_rate():
    from jlora.core._optim import labels

    lora = {"k": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2)), "m": jnp.ones(2)}, "bias": jnp.ones(2),
            "head": jnp.ones((2, 2))}
    assert labels(lora, lora) == {"bias": "boosted_lr", "head": "base_lr",
                                  "k": {"A": "base_lr", "B": "boosted_lr", "m": "boosted_lr"}}
