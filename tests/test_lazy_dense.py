"""jlora.trace._dense: the dense op for k kernels reading one input, in each of its forms.

Forms: training with the fused forward ``[x | low]·[W0; Bs]`` (in + r < T) or the two-product
forward (in + r ≥ T); kernels stored (in, out) or (out, in); inference merging the kernel
(T·(in + out) ≥ in·out) or staying low-rank. Values against a float64 NumPy reference of
``x·(W0 + s·A@B)``; gradients (x, A, B, and W0 when it is differentiated) against autodiff of that
merged formula in float32 (no custom VJP).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpr_walk import eqns as _eqns
from jlora.trace._dense import dense_rows, fuse_is_cheaper, merge_is_cheaper

IN, OUT, R = 8, 6, 2
SCALES = (2.0, 0.5)


def _case(t: int, contracts: tuple[int, ...], seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(t, IN)).astype(np.float32)
    ws = [rng.normal(size=(IN, OUT) if c == 0 else (OUT, IN)).astype(np.float32) for c in contracts]
    as_ = [rng.normal(size=(IN, R)).astype(np.float32) for _ in contracts]
    bs = [rng.normal(size=(R, OUT)).astype(np.float32) for _ in contracts]
    eqns = tuple(jax.make_jaxpr(lambda xx, w, c=c: jax.lax.dot_general(xx, w, (((1,), (c,)), ((), ()))))(
        x, w).eqns[0] for w, c in zip(ws, contracts))
    return x, ws, as_, bs, eqns


def _merged(x, ws, as_, bs, contracts):
    outs = []
    for w, a, b, c, s in zip(ws, as_, bs, contracts, SCALES):
        w_in_out = w if c == 0 else w.T
        outs.append(x @ (w_in_out + s * (a @ b)))
    return outs


@pytest.mark.parametrize("t", [4, 64])          # 64: in + r < T, the fused forward; 4: two products
@pytest.mark.parametrize("contracts", [(0,), (1,), (0, 1)])
def test_training_forms_match_the_merged_formula(t, contracts):
    x, ws, as_, bs, eqns = _case(t, contracts)
    assert fuse_is_cheaper(t, IN, R * len(contracts)) == (t == 64)
    op = dense_rows(eqns, SCALES[: len(contracts)])

    def loss_op(x, as_, bs):
        return sum(jnp.sum(jnp.sin(base + low)) for base, low in op(x, tuple(ws), tuple(as_), tuple(bs)))

    def loss_ref(x, as_, bs):
        return sum(jnp.sum(jnp.sin(y)) for y in _merged(x, ws, as_, bs, contracts))

    want = _merged(*(np.float64(v) if isinstance(v, np.ndarray) else [np.float64(u) for u in v]
                     for v in (x, ws, as_, bs)), contracts)
    got = jax.jit(lambda x, as_, bs: [b + l for b, l in op(x, tuple(ws), tuple(as_), tuple(bs))])(x, as_, bs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5)
    g_op = jax.jit(jax.grad(loss_op, argnums=(0, 1, 2)))(x, as_, bs)
    g_ref = jax.grad(loss_ref, argnums=(0, 1, 2))(x, as_, bs)
    for a, b in zip(jax.tree.leaves(g_op), jax.tree.leaves(g_ref)):  # f32 sums of O(10) terms: 1e-5 of the largest
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))


@pytest.mark.parametrize("t", [4, 64])
def test_w0_gets_its_gradient_only_when_differentiated(t):
    x, ws, as_, bs, eqns = _case(t, (1,))
    op = dense_rows(eqns, SCALES[:1])
    loss = lambda w: jnp.sum(jnp.tanh(sum(op(x, (w,), tuple(as_), tuple(bs))[0])))  # noqa: E731
    ref = lambda w: jnp.sum(jnp.tanh(_merged(x, [w], as_, bs, (1,))[0]))  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss)(ws[0]), jax.grad(ref)(ws[0]), rtol=2e-5, atol=2e-5)


def _dot_shapes(fn, *args):
    return [tuple(e.outvars[0].aval.shape) for e in _eqns(jax.make_jaxpr(fn)(*args).jaxpr)
            if e.primitive.name == "dot_general"]


def test_inference_merges_only_when_cheaper():
    for t, merged in ((64, True), (1, False)):
        x, ws, as_, bs, eqns = _case(t, (0, 1))
        assert merge_is_cheaper(t, IN, OUT) == merged
        op = dense_rows(eqns, SCALES)
        fn = lambda x: [b + lo for b, lo in op(x, tuple(ws), tuple(as_), tuple(bs))]  # noqa: E731
        shapes = _dot_shapes(fn, x)
        assert ((IN, OUT) in shapes) == merged and ((t, 2 * R) in shapes) == (not merged), shapes
        for g, w in zip(jax.jit(fn)(x), _merged(x, ws, as_, bs, (0, 1))):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_training_never_forms_a_kernel_sized_product():
    x, ws, as_, bs, eqns = _case(64, (0, 1))
    op = dense_rows(eqns, SCALES)
    step = jax.grad(lambda as_: sum(jnp.sum(b + lo) for b, lo in op(x, tuple(ws), tuple(as_), tuple(bs))))
    shapes = _dot_shapes(step, tuple(as_))
    assert (IN, OUT) not in shapes and (OUT, IN) not in shapes, shapes
