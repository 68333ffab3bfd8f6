"""LoRA variants and trainable extras: DoRA, PiSSA/OLoRA inits, LoRA+, bias modes, heads, trainable rows.

References: PEFT 0.21 on PyTorch (same weights copied across: jlora's A is ``lora_A.weight.T``, B is
``lora_B.weight.T``) and float64 NumPy. Tolerances: float32 outputs 1e-5 (relative to the output
scale), gradients 1e-4, residual bases 1e-4.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import jlora
from jlora import dora
from jlora.core import _extras as extras
from jlora.core import _inits as inits

KEY = jax.random.key(0)


def _randn(seed, shape):
    """Normal samples from NumPy (jax.random would compile once per shape on the shared CPU)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _np(t):
    return t.detach().numpy().astype(np.float32)


def _close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=0)


class _TorchMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 6)
        self.conv = nn.Conv2d(3, 5, 3)
        self.emb = nn.Embedding(10, 4)
        self.other = nn.Linear(6, 2)


def _peft(target, seed=0, **kw):
    torch.manual_seed(seed)
    base = _TorchMLP()
    orig = {k: v.detach().clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=[target], **kw))
    return model.base_model.model, orig


def dense(p, x):
    return x @ p["lin"]["kernel"] + p["lin"]["bias"]


def conv(p, x):
    y = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["conv"]["bias"]


def mlp(p, x):
    h = jnp.tanh(x @ p["params"]["l1"]["kernel"] + p["params"]["l1"]["bias"])
    return h @ p["params"]["l2"]["kernel"] + p["params"]["l2"]["bias"]


def _mlp_params(seed=0, d=8, h=12, o=5):
    return {"params": {"l1": {"kernel": _randn(seed, (d, h)) / 3, "bias": _randn(seed + 1, (h,))},
                       "l2": {"kernel": _randn(seed + 2, (h, o)) / 3, "bias": _randn(seed + 3, (o,))}}}


def _init(params, cfg, **kw):
    """jlora.init under one jit (fewer eager compiles on the shared CPU)."""
    return jax.jit(lambda p: jlora.init(KEY, p, cfg, **kw))(params)


def _merge(frozen, lora, cfg):
    return jax.jit(lambda f, l: jlora.merge(f, l, cfg))(frozen, lora)


def _apply(fn, cfg, mode):
    """lora_apply; lazy mode strict (the factored path, no merged fallback) with warnings as errors."""
    if mode == "merged":
        return jlora.lora_apply(fn, cfg, mode)
    lazy_fn = jlora.lora_apply(fn, cfg, mode, strict=True)

    def strict(*args, **kw):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return lazy_fn(*args, **kw)

    return strict


def _perturb(lora, seed=1, size=0.3):
    rng = np.random.default_rng(seed)  # NumPy: no per-shape compiles
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + size * rng.normal(size=x.shape).astype(x.dtype)), lora)


# --- DoRA ---------------------------------------------------------------------------------------

def test_dora_dense_matches_peft_outputs_and_gradients():
    mod, _ = _peft("lin", r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)
    lin = mod.lin
    w0, b0 = _np(lin.base_layer.weight), _np(lin.base_layer.bias)
    a_t, b_t = lin.lora_A["default"].weight, lin.lora_B["default"].weight
    mag_t = lin.lora_magnitude_vector["default"].weight
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=r"lin/kernel", use_dora=True)
    frozen = {"lin": {"kernel": jnp.asarray(w0.T), "bias": jnp.asarray(b0)}}
    A, B = jnp.asarray(_np(a_t).T), jnp.asarray(_np(b_t).T)
    f = jlora.adapted(frozen, {"lin": {"kernel": {"A": A, "B": B}}}, cfg)["lin/kernel"]
    # PEFT's initial magnitude (B random here) is ||W0 + s B A|| over the input axis
    _close(dora.magnitude(frozen["lin"]["kernel"], A, B, f), _np(mag_t), 1e-6)
    with torch.no_grad():  # a trained, non-trivial magnitude
        mag_t.copy_(torch.rand(6) + 0.5)
    lora = {"lin": {"kernel": {"A": A, "B": B, "m": jnp.asarray(_np(mag_t))}}}
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    g = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    xt = torch.tensor(x)
    y_t = lin(xt)
    (y_t * torch.tensor(g)).sum().backward()
    for mode in ("merged", "lazy"):
        fn = _apply(dense, cfg, mode)
        _close(fn(frozen, lora, jnp.asarray(x)), _np(y_t), 1e-5)
        grads = jax.grad(lambda l: jnp.sum(fn(frozen, l, jnp.asarray(x)) * g))(lora)["lin"]["kernel"]
        _close(grads["A"], _np(a_t.grad).T, 1e-4)
        _close(grads["B"], _np(b_t.grad).T, 1e-4)
        _close(grads["m"], _np(mag_t.grad), 1e-4)


def test_dora_conv_matches_peft():
    mod, _ = _peft("conv", r=2, lora_alpha=4, use_dora=True, init_lora_weights=False)
    c = mod.conv
    with torch.no_grad():
        c.lora_magnitude_vector["default"].weight.mul_(torch.rand(1, 5, 1, 1) + 0.5)
    x = np.random.default_rng(0).normal(size=(2, 3, 7, 7)).astype(np.float32)
    y_t = _np(c(torch.tensor(x))).transpose(0, 2, 3, 1)
    frozen = {"conv": {"kernel": jnp.asarray(_np(c.base_layer.weight).transpose(2, 3, 1, 0)),
                       "bias": jnp.asarray(_np(c.base_layer.bias))}}
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=r"conv/kernel", use_dora=True)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    _, lora = jlora.init(KEY, frozen, cfg, apply_fn=conv, args=(xj,))
    assert lora["conv"]["kernel"]["A"].shape == (3, 3, 3, 2) and lora["conv"]["kernel"]["m"].shape == (5,)
    # init: m = ||W0|| over (kh, kw, cin)
    norm = np.linalg.norm(np.asarray(frozen["conv"]["kernel"], np.float64).reshape(27, 5), axis=0)
    _close(lora["conv"]["kernel"]["m"], norm, 1e-6)
    lora = {"conv": {"kernel": {"A": jnp.asarray(_np(c.lora_A["default"].weight).transpose(2, 3, 1, 0)),
                                "B": jnp.asarray(_np(c.lora_B["default"].weight)[:, :, 0, 0].T),
                                "m": jnp.asarray(_np(c.lora_magnitude_vector["default"].weight).reshape(5))}}}
    g = np.random.default_rng(1).normal(size=y_t.shape).astype(np.float32)
    y_c = c(torch.tensor(x))
    (y_c * torch.tensor(g.transpose(0, 3, 1, 2))).sum().backward()
    want = {"A": _np(c.lora_A["default"].weight.grad).transpose(2, 3, 1, 0),
            "B": _np(c.lora_B["default"].weight.grad)[:, :, 0, 0].T,
            "m": _np(c.lora_magnitude_vector["default"].weight.grad).reshape(5)}
    for mode in ("merged", "lazy"):
        fn = _apply(conv, cfg, mode)
        _close(fn(frozen, lora, xj), y_t, 1e-5)
        grads = jax.grad(lambda l: jnp.sum(fn(frozen, l, xj) * g))(lora)["conv"]["kernel"]
        for k in ("A", "B", "m"):
            _close(grads[k], want[k], 1e-4)


def test_dora_embedding_matches_peft():
    mod, _ = _peft("emb", r=2, lora_alpha=4, use_dora=True, init_lora_weights=False)
    e = mod.emb
    with torch.no_grad():
        e.lora_magnitude_vector["default"].weight.mul_(torch.rand(4) + 0.5)
    ids = np.array([[1, 3, 9], [0, 0, 5]])
    y_t = _np(e(torch.tensor(ids)))
    frozen = {"emb": {"embedding": jnp.asarray(_np(e.base_layer.weight))}}
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=r"emb/embedding", use_dora=True)
    lora = {"emb": {"embedding": {"A": jnp.asarray(_np(e.lora_embedding_A["default"]).T),
                                  "B": jnp.asarray(_np(e.lora_embedding_B["default"]).T),
                                  "m": jnp.asarray(_np(e.lora_magnitude_vector["default"].weight))}}}
    fn = lambda p, i: p["emb"]["embedding"][i]  # noqa: E731
    for mode in ("merged", "lazy"):
        _close(_apply(fn, cfg, mode)(frozen, lora, jnp.asarray(ids)), y_t, 1e-5)


def _dora_ref(w0, a, b, m, s):
    """float64 DoRA on a stacked (L, in, out...) kernel."""
    w0, a, b, m = (np.asarray(t, np.float64) for t in (w0, a, b, m))
    v = w0 + s * np.einsum("lir,lr...->li...", a, b)
    norm = np.sqrt((v * v).sum(axis=1))
    return m[:, None] * v / norm[:, None], norm


def test_dora_stacked_dense_general_float64_and_lazy_terms():
    shape = (2, 6, 3, 4)  # 2 layers, in 6, out (heads 3, head_dim 4)
    w = _randn(0, shape)
    cfg = jlora.LoraConfig(rank=2, alpha=3, targets="w", use_dora=True, stack={"w": 1}, axes={"w": 1})
    frozen, lora = _init({"w": w}, cfg)
    assert lora["w"]["m"].shape == (2, 3, 4)
    _close(_merge(frozen, lora, cfg)["w"], w, 1e-6)  # output unchanged at init
    lora = _perturb(lora)
    s = 3 / 2
    ref, norm = _dora_ref(w, lora["w"]["A"], lora["w"]["B"], lora["w"]["m"], s)
    _close(_merge(frozen, lora, cfg)["w"], ref, 1e-5)
    f = jlora.adapted(frozen, lora, cfg)["w"]
    assert f.dora
    x = _randn(3, (2, 5, 6))

    @jax.jit
    def lazy_terms(w, a, b, m):
        factor = dora.dora_lazy_terms(w, a, b, m, f, w0_sq=dora.kernel_sq_norm(w, f))
        # the lazy identity: factor * (x W0 + s (x A) B) == x W'
        y = factor[:, None] * (jnp.einsum("lti,liho->ltho", x, w)
                               + s * jnp.einsum("ltr,lrho->ltho", jnp.einsum("lti,lir->ltr", x, a), b))
        # the norm is detached: A and B get no gradient through the factor
        ga = jax.grad(lambda a: dora.dora_lazy_terms(w, a, b, m, f).sum())(a)
        return factor, y, ga

    factor, lazy, ga = lazy_terms(w, lora["w"]["A"], lora["w"]["B"], lora["w"]["m"])
    _close(factor, np.asarray(lora["w"]["m"], np.float64) / norm, 1e-5)
    _close(lazy, np.einsum("lti,liho->ltho", np.asarray(x, np.float64), ref), 1e-5)
    assert float(jnp.abs(ga).max()) == 0


def test_dora_unmerge_needs_norms():
    params = _mlp_params()
    cfg = jlora.LoraConfig(rank=3, targets=r".*/kernel", use_dora=True)
    frozen, lora = _init(params, cfg)
    lora = _perturb(lora)
    merged = _merge(frozen, lora, cfg)
    with pytest.raises(ValueError, match="jlora.dora.unmerge"):
        jlora.unmerge(merged, lora, cfg)
    back = jax.jit(lambda m, f, l: dora.unmerge(m, l, cfg, dora.norms(f, l, cfg)))(merged, frozen, lora)
    same = jlora.unmerge(merged, lora, cfg, norms=dora.norms(frozen, lora, cfg))  # the one entry point
    for p in ("l1", "l2"):
        _close(back["params"][p]["kernel"], params["params"][p]["kernel"], 1e-5)
        _close(same["params"][p]["kernel"], params["params"][p]["kernel"], 1e-5)
    with pytest.raises(ValueError, match="no norm for the DoRA kernel"):
        dora.unmerge(merged, lora, cfg, {})
    with pytest.raises(TypeError, match=r"jlora.unmerge: norms must be a dict .*got list; fix: norms=jlora.dora.norms"):
        jlora.unmerge(merged, lora, cfg, norms=[1.0])


def test_dora_lazy_equals_merged_with_gradients_on_mlp():
    params = _mlp_params()
    cfg = jlora.LoraConfig(rank=3, targets=r".*/kernel", use_dora=True, trainable=jlora.core._extras.bias_rules("all"))
    frozen, lora = _init(params, cfg)
    x = _randn(5, (4, 8))
    _close(jlora.lora_apply(mlp, cfg, "lazy")(frozen, lora, x), mlp(params, x), 1e-5)  # unchanged at init
    lora = _perturb(lora)
    outs, grads = [], []
    for mode in ("lazy", "merged"):
        fn = jax.jit(_apply(mlp, cfg, mode))
        outs.append(fn(frozen, lora, x))
        grads.append(jax.grad(lambda l: jnp.sum(fn(frozen, l, x) ** 2))(lora))
    _close(outs[0], outs[1], 1e-5)
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        _close(a, b, 1e-4)
    assert jlora.summary(frozen, lora).trainable == (8 * 3 + 3 * 12 + 12) + (12 * 3 + 3 * 5 + 5) + 12 + 5
    # dropout (PEFT: base(x) + (factor - 1)·base(drop(x)) + factor·s·B(A(drop(x))))
    drop = _apply(mlp, cfg.replace(dropout=0.5), "lazy")
    init_lora = _init(params, cfg)[1]  # B = 0, m = ||W0||: factor 1, so the output is the base model's
    _close(drop(frozen, init_lora, x, lora_rng=KEY), mlp(params, x), 1e-5)
    y1, y2 = drop(frozen, lora, x, lora_rng=KEY), drop(frozen, lora, x, lora_rng=jax.random.key(1))
    assert float(jnp.abs(y1 - y2).max()) > 1e-3 and float(jnp.abs(y1 - outs[0]).max()) > 1e-3
    g = jax.grad(lambda l: jnp.sum(drop(frozen, l, x, lora_rng=KEY) ** 2))(lora)
    assert all(np.isfinite(np.asarray(t)).all() for t in jax.tree.leaves(g))


# --- PiSSA / OLoRA --------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_changing_init_matches_peft_residual(init):
    mod, orig = _peft("lin", r=3, lora_alpha=6, init_lora_weights=init)
    residual_t = _np(mod.lin.base_layer.weight)
    delta_t = 2.0 * _np(mod.lin.lora_B["default"].weight @ mod.lin.lora_A["default"].weight)
    params = {"lin": {"kernel": jnp.asarray(_np(orig["lin.weight"]).T), "bias": jnp.asarray(_np(orig["lin.bias"]))}}
    cfg = jlora.LoraConfig(rank=3, alpha=6, targets=r"lin/kernel", init=init)
    frozen, lora = jlora.init(KEY, params, cfg)
    _close(frozen["lin"]["kernel"], residual_t.T, 1e-4)
    _close(jlora.delta(frozen, lora, cfg)["lin/kernel"], delta_t.T, 1e-4)
    assert params["lin"]["kernel"] is not frozen["lin"]["kernel"]
    x = _randn(0, (4, 8))
    for mode in ("lazy", "merged"):  # output unchanged at init
        _close(jlora.lora_apply(dense, cfg, mode)(frozen, lora, x), dense(params, x), 1e-5)
    lora = _perturb(lora)
    lazy, merged = (jlora.lora_apply(dense, cfg, mode)(frozen, lora, x) for mode in ("lazy", "merged"))
    _close(lazy, merged, 1e-5)


def test_pissa_niter_approximates_exact_pissa():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    v, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    s = np.array([9.0, 7.0, 5.0, 0.1, 0.05, 0.02, 0.01, 0.01, 0.0, 0.0])
    w = jnp.asarray((u[:, :10] * s) @ v.T, jnp.float32)
    top = (u[:, :3] * s[:3]) @ v[:, :3].T
    cfg = jlora.LoraConfig(rank=3, alpha=6, targets="w", init="pissa_niter_4")
    frozen, lora = jlora.init(KEY, {"w": w}, cfg)
    _close(jlora.delta(frozen, lora, cfg)["w"], top, 1e-3)
    _close(jlora.merge(frozen, lora, cfg)["w"], w, 1e-5)


def test_pissa_with_dora_and_stacked_kernels():
    w = _randn(0, (3, 6, 5))
    cfg = jlora.LoraConfig(rank=2, targets="w", init="pissa", use_dora=True, stack={"w": 1})
    frozen, lora = jlora.init(KEY, {"w": w}, cfg)
    for i in range(3):  # per layer: the residual has W0's top-2 singular values removed
        sv = np.linalg.svd(np.asarray(w[i], np.float64), compute_uv=False)
        _close(np.linalg.svd(np.asarray(frozen["w"][i], np.float64), compute_uv=False)[:3], sv[2:], 1e-4)
    _close(lora["w"]["m"], np.linalg.norm(np.asarray(w), axis=1), 1e-5)  # m = ||W0|| (not of the residual)
    _close(jlora.merge(frozen, lora, cfg)["w"], w, 1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_to_plain_adapter_applies_to_the_original_base(rslora):
    params = _mlp_params()
    cfg = jlora.LoraConfig(rank=3, alpha=5, targets=r".*/kernel", init="pissa", rslora=rslora,
                           rank_pattern={r".*/l2/.*": 2}, alpha_pattern={r".*/l2/.*": 3.0},
                           trainable=r".*/l2/bias")
    residual, lora = jlora.init(KEY, params, cfg)
    trained = _perturb(lora)
    plain, cfg2 = inits.to_plain_adapter(params, residual, trained, cfg)
    assert (cfg2.rank, cfg2.init, cfg2.rank_pattern) == (6, "kaiming", ((r".*/l2/.*", 4),))
    assert plain["params"]["l2"]["kernel"]["A"].shape == (12, 4)
    want = jlora.merge(residual, trained, cfg)
    got = jlora.merge(params, plain, cfg2)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        _close(a, b, 1e-5)
    assert cfg2.scale_for("params/l2/kernel") == pytest.approx(cfg.scale_for("params/l2/kernel"))


def test_base_changing_init_errors():
    cfg = jlora.LoraConfig(rank=2, targets="w", init="pissa")
    with pytest.raises(ValueError, match="ShapeDtypeStruct"):
        jlora.init(KEY, {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}, cfg)
    # under eval_shape the values are abstract tracers: fine
    frozen, lora = jax.eval_shape(lambda p: jlora.init(KEY, p, cfg.replace(use_dora=True)), {"w": jnp.ones((4, 4))})
    assert lora["w"]["m"].shape == (4,) and frozen["w"].shape == (4, 4)
    with pytest.raises(ValueError, match="fused"):
        jlora.init(KEY, {"w": jnp.ones((4, 6))}, cfg.replace(fused={"w": (True, False)}))
    with pytest.raises(ValueError, match="not linear"):
        inits.to_plain_adapter({"w": jnp.ones((4, 4))}, {"w": jnp.ones((4, 4))}, {}, cfg.replace(use_dora=True))
    with pytest.raises(ValueError, match="pissa_niter_K"):
        jlora.LoraConfig(targets="w", init="pissa_niter_x")


# --- fused kernels --------------------------------------------------------------------------------

def test_fused_dora_is_a_clear_error_and_fused_plain_still_works():
    w = {"qkv": _randn(0, (4, 9))}
    cfg = jlora.LoraConfig(rank=1, targets="qkv", fused={"qkv": (True, False, True)}, use_dora=True)
    with pytest.raises(ValueError, match="DoRA on the fused kernel 'qkv'"):
        jlora.init(KEY, w, cfg)
    frozen, lora = jlora.init(KEY, w, cfg.replace(use_dora=False))
    assert jax.tree.map(jnp.shape, lora) == {"qkv": {"A": (4, 2), "B": (2, 1, 3)}}


# --- LoRA+ ------------------------------------------------------------------------------------------

def test_lora_plus_matches_peft_loraplus_adam():
    from peft.optimizers import create_loraplus_optimizer

    mod, _ = _peft("lin", r=2, lora_alpha=4, init_lora_weights=False)
    lin = mod.lin
    a_t, b_t = lin.lora_A["default"].weight, lin.lora_B["default"].weight
    lora = {"lin": {"kernel": {"A": jnp.asarray(_np(a_t).T), "B": jnp.asarray(_np(b_t).T)}}}
    opt_t = create_loraplus_optimizer(mod, optimizer_cls=torch.optim.Adam, lr=1e-2, loraplus_lr_ratio=16)
    tx = jlora.optimizer(optax.adam(1e-2), lora, b_lr_ratio=16)
    state = tx.init(lora)
    rng = np.random.default_rng(0)
    for _ in range(3):
        ga, gb = rng.normal(size=a_t.shape).astype(np.float32), rng.normal(size=b_t.shape).astype(np.float32)
        a_t.grad, b_t.grad = torch.tensor(ga), torch.tensor(gb)
        opt_t.step()
        grads = {"lin": {"kernel": {"A": jnp.asarray(ga.T), "B": jnp.asarray(gb.T)}}}
        upd, state = tx.update(grads, state, lora)
        lora = optax.apply_updates(lora, upd)
    _close(lora["lin"]["kernel"]["A"], _np(a_t).T, 1e-5)
    _close(lora["lin"]["kernel"]["B"], _np(b_t).T, 1e-5)


# --- trainable extras -------------------------------------------------------------------------------

def test_bias_rules_match_peft_bias_modes():
    names = {"lin": "params/lin", "conv": "params/conv", "other": "params/other", "emb": "params/emb"}
    params = {"params": {"lin": {"kernel": jnp.ones((8, 6)), "bias": jnp.ones(6)},
                         "conv": {"kernel": jnp.ones((3, 3, 3, 5)), "bias": jnp.ones(5)},
                         "other": {"kernel": jnp.ones((6, 2)), "bias": jnp.ones(2)},
                         "emb": {"embedding": jnp.ones((10, 4))}}}
    targets = r"params/(lin|other)/kernel"
    for mode in ("none", "all", "lora_only"):
        torch.manual_seed(0)
        model = peft.get_peft_model(_TorchMLP(), peft.LoraConfig(target_modules=["lin", "other"], bias=mode))
        want = {names[n.split(".")[2]] + "/bias" for n, p in model.named_parameters()
                if p.requires_grad and n.endswith("bias")}
        for rules in {bias_rules_variant for bias_rules_variant in
                      (extras.bias_rules(mode, targets), extras.bias_rules(mode, targets, params))}:
            cfg = jlora.LoraConfig(rank=2, targets=targets, trainable=rules, axes={".*": 1})
            _, lora = jlora.init(KEY, params, cfg)
            got = {p for p in jlora.paths.flatten(lora) if p.endswith("bias")}
            assert got == want, (mode, rules)
    with pytest.raises(ValueError, match="mode must be one of"):
        extras.bias_rules("some")
    with pytest.raises(ValueError, match="does not end in 'kernel'"):
        extras.bias_rules("lora_only", r".*/(q|v)")


def test_new_head_trained_whole_end_to_end():
    params = _mlp_params(o=3)
    cfg = jlora.LoraConfig(rank=2, targets=r".*/l1/kernel", trainable=r"params/l2/.*")
    frozen, lora = jlora.init(KEY, params, cfg)
    assert set(jlora.paths.flatten(lora)) == {"params/l1/kernel/A", "params/l1/kernel/B", "params/l2/bias",
                                             "params/l2/kernel"}
    x = _randn(0, (32, 8))
    y = jnp.sin(x[:, :3])
    tx = jlora.optimizer(optax.adam(3e-2), lora)
    fn = jlora.lora_apply(mlp, cfg, "lazy")

    @jax.jit
    def step(lora, state):
        loss, g = jax.value_and_grad(lambda l: jnp.mean((fn(frozen, l, x) - y) ** 2))(lora)
        upd, state = tx.update(g, state, lora)
        return optax.apply_updates(lora, upd), state, loss

    state, losses = tx.init(lora), []
    for _ in range(30):
        lora, state, loss = step(lora, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    merged = jlora.merge(frozen, lora, cfg)
    np.testing.assert_array_equal(merged["params"]["l2"]["kernel"], lora["params"]["l2"]["kernel"])
    np.testing.assert_array_equal(frozen["params"]["l2"]["kernel"], params["params"]["l2"]["kernel"])
    _close(mlp(merged, x), fn(frozen, lora, x), 1e-5)


def _embed_model(p, ids):
    h = p["emb"]["embedding"][ids].mean(axis=1)
    return h @ p["out"]["kernel"]


def test_embedding_rows_train_only_new_tokens():
    params = {"emb": {"embedding": _randn(0, (10, 4))}, "out": {"kernel": _randn(1, (4, 3))}}
    cfg = jlora.LoraConfig(rank=2, targets=r"(out/kernel|emb/embedding)", embedding_rows={"emb/embedding": (8, 9)})
    frozen, lora = _init(params, cfg)
    assert lora["emb"]["embedding"]["rows"].shape == (2, 4)
    np.testing.assert_array_equal(lora["emb"]["embedding"]["rows"], params["emb"]["embedding"][8:])
    ids = jnp.array([[1, 8, 9], [2, 3, 9]])
    _close(jlora.lora_apply(_embed_model, cfg, "lazy")(frozen, lora, ids), _embed_model(params, ids), 1e-6)
    lora = _perturb(lora)
    # merged: rows scattered into the table, then the LoRA delta of the table added (float64 reference)
    e = np.asarray(params["emb"]["embedding"], np.float64).copy()
    e[[8, 9]] = np.asarray(lora["emb"]["embedding"]["rows"])
    s = 16 / 2  # default alpha / rank
    a64, b64 = (np.asarray(lora["emb"]["embedding"][k], np.float64) for k in ("A", "B"))
    e += s * a64 @ b64
    _close(_merge(frozen, lora, cfg)["emb"]["embedding"], e, 1e-5)
    outs, grads = [], []
    for mode in ("lazy", "merged"):
        fn = jlora.lora_apply(_embed_model, cfg, mode)
        outs.append(jax.jit(fn)(frozen, lora, ids))
        grads.append(jax.jit(jax.grad(lambda l: jnp.sum(fn(frozen, l, ids) ** 2)))(lora))
    _close(outs[0], outs[1], 1e-5)
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        _close(a, b, 1e-4)
    assert float(jnp.abs(grads[0]["emb"]["embedding"]["rows"]).min()) > 0
    # an update of the rows leaf moves only rows 8 and 9 of the merged table (LoRA off here)
    cfg2 = cfg.replace(targets=r"out/kernel")
    frozen2, lora2 = _init(params, cfg2)
    lora2 = jax.tree.map(lambda a, g: a - g, lora2, jax.jit(jax.grad(
        lambda l: jnp.sum(jlora.lora_apply(_embed_model, cfg2)(frozen2, l, ids) ** 2)))(lora2))
    table = _merge(frozen2, lora2, cfg2)["emb"]["embedding"]
    np.testing.assert_array_equal(table[:8], params["emb"]["embedding"][:8])
    assert float(jnp.abs(table[8:] - params["emb"]["embedding"][8:]).min()) > 0


def test_embedding_rows_errors():
    params = {"emb": {"embedding": jnp.ones((5, 4))}, "k": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match="out of range"):
        jlora.init(KEY, params, jlora.LoraConfig(targets="k", rank=1, embedding_rows={"emb/embedding": (7,)}))
    with pytest.raises(ValueError, match="matched no parameter"):
        jlora.init(KEY, params, jlora.LoraConfig(targets="k", rank=1, embedding_rows={"emb/emb": (1,)}))
    with pytest.raises(ValueError, match="distinct"):
        jlora.LoraConfig(targets="k", embedding_rows={"emb/embedding": (1, 1)})
    cfg = jlora.LoraConfig(targets="k", rank=1, embedding_rows={"emb/embedding": (1, 2)})
    frozen, lora = jlora.init(KEY, params, cfg)
    bad = {**lora, "emb": {"embedding": {"rows": jnp.ones((3, 4))}}}
    with pytest.raises(ValueError, match=r"'emb/embedding/rows': expected shape \(2, 4\)"):
        jlora.merge(frozen, bad, cfg)
    with pytest.raises(ValueError, match="expected shape None"):
        jlora.merge(frozen, lora, cfg.replace(embedding_rows=()))


def test_dora_magnitude_shape_errors_and_config_round_trip():
    params = _mlp_params()
    cfg = jlora.LoraConfig(rank=2, targets=r".*/kernel", use_dora=True, init="pissa_niter_2",
                           embedding_rows={r".*/l1/bias": (0,)})
    assert jlora.LoraConfig.from_json(cfg.to_json()) == cfg
    frozen, lora = jlora.init(KEY, params, cfg.replace(init="kaiming", embedding_rows=()))
    bad = jax.tree.map(lambda x: x, lora)
    bad["params"]["l1"]["kernel"]["m"] = jnp.ones(3)
    with pytest.raises(ValueError, match=r"expected the DoRA magnitude shape \(12,\)"):
        jlora.merge(frozen, bad, cfg)
    del bad["params"]["l1"]["kernel"]["A"], bad["params"]["l1"]["kernel"]["B"]
    with pytest.raises(ValueError, match="needs the factors|no partner"):
        jlora.merge(frozen, bad, cfg)


def test_variant_adapters_round_trip_through_orbax(tmp_path):
    from jlora import checkpoint

    params = {"emb": {"embedding": _randn(0, (10, 4))}, "out": {"kernel": _randn(1, (4, 3))}}
    cfg = jlora.LoraConfig(rank=2, targets=r"out/kernel", use_dora=True, init="olora",
                           embedding_rows={"emb/embedding": (8, 9)})
    frozen, lora = _init(params, cfg)
    lora = _perturb(lora)
    checkpoint.save_adapter(tmp_path / "a", lora, cfg)
    back, cfg2, _ = checkpoint.restore_adapter(tmp_path / "a", frozen=frozen)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lora)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jlora.merge(frozen, back, cfg2)["out"]["kernel"],
                                  jlora.merge(frozen, lora, cfg)["out"]["kernel"])


@settings(max_examples=6, deadline=None, derandomize=True)
@given(n_stack=st.integers(0, 1), ins=st.lists(st.integers(1, 4), min_size=1, max_size=2),
       outs=st.lists(st.integers(1, 4), min_size=1, max_size=2), rank=st.integers(1, 3), seed=st.integers(0, 99))
def test_property_dora_merge_and_lazy_terms_match_float64(n_stack, ins, outs, rank, seed):
    """Tolerances follow the conditioning: W0 + s·A@B is formed in float32, so its error is ~eps·(|W0| +
    |s·A@B|), and DoRA multiplies it by m/||W0 + s·A@B|| (large where the column nearly cancels)."""
    shape = (2,) * n_stack + tuple(ins) + tuple(outs)
    n_in, n_out = int(np.prod(ins)), int(np.prod(outs))
    w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    a = _randn(seed + 1, (2,) * n_stack + tuple(ins) + (rank,))
    b = _randn(seed + 2, (2,) * n_stack + (rank,) + tuple(outs))
    m = jnp.abs(_randn(seed + 3, (2,) * n_stack + tuple(outs))) + 0.1
    cfg = jlora.LoraConfig(rank=rank, alpha=2.0, targets="w", use_dora=True)
    frozen, lora = {"w": jnp.asarray(w)}, {"w": {"A": a, "B": b, "m": m}}
    f = jlora.adapted(frozen, lora, cfg)["w"]
    assert (f.n_stack, f.n_in, f.dora) == (n_stack, len(ins), True)
    lead = (2,) * n_stack
    w64 = w.astype(np.float64).reshape(lead + (n_in, n_out))
    v = w64 + (2.0 / rank) * np.asarray(a, np.float64).reshape(lead + (n_in, rank)) @ np.asarray(
        b, np.float64).reshape(lead + (rank, n_out))
    norm = np.sqrt((v * v).sum(axis=-2))
    m64 = np.asarray(m, np.float64).reshape(lead + (n_out,))
    ref = (v * (m64 / norm)[..., None, :]).reshape(shape)
    size = np.abs(w64) + np.abs(v - w64)  # what f32 rounds when it forms W0 + s·A@B
    cond = float((size * (m64 / norm)[..., None, :]).max())
    np.testing.assert_allclose(dora.dora_kernel(frozen["w"], jlora.delta(frozen, lora, cfg)["w"], m, f), ref,
                               atol=1e-5 * max(1.0, cond), rtol=0)
    # the lazy terms form ||W0 + s·A@B||² from ||W0||², cross terms and ||s·A@B||²: relative error ~eps·|size|²/norm²
    cond2 = float(((size * size).sum(axis=-2) / norm**2).max())
    np.testing.assert_allclose(dora.dora_lazy_terms(frozen["w"], a, b, m, f).reshape(lead + (n_out,)), m64 / norm,
                               rtol=1e-5 * max(1.0, cond2), atol=0)


def test_dora_lazy_scan_and_shared_input_match_merged():
    """Stacked DoRA kernels sliced per layer inside lax.scan (A, B and the factor), and q/k sharing x·[A_q|A_k]."""
    cfg = jlora.LoraConfig(rank=2, alpha=3, targets="(w|q|k)", use_dora=True, stack={"w": 1})
    params = {"w": _randn(0, (3, 6, 6)) / 3, "q": _randn(1, (6, 4)), "k": _randn(2, (6, 4))}

    def net(p, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])
        return h @ p["q"] + jnp.sin(h @ p["k"])

    frozen, lora = _init(params, cfg)
    lora = _perturb(lora)
    x = _randn(4, (5, 6))
    outs, grads = [], []
    for mode in ("lazy", "merged"):
        fn = jax.jit(_apply(net, cfg, mode))
        outs.append(fn(frozen, lora, x))
        grads.append(jax.grad(lambda l: jnp.sum(fn(frozen, l, x) ** 2))(lora))
    _close(outs[0], outs[1], 1e-5)
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        _close(a, b, 1e-4)
