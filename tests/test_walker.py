"""The one jaxpr walker (jlora.trace._walker) and the primitives added as one rule per mode.

Each primitive is checked in every mode: the roles reader (``jlora.init`` reads the layout through it,
no refusal), the lazy rewrite (``strict=True`` and warnings as errors: no merged fallback) against a
float64 NumPy reference (outputs; gradients of A and B against the merged mode), and where it
applies the per-row adapters. Tolerances: float32 against float64, rtol 1e-5 on outputs, 1e-4 on
gradients.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxpr_walk import eqns as _eqns
import jlora
from jlora.trace import _walker as walker

RNG = np.random.default_rng(0)


def normal(*shape, scale=0.5):
    return jnp.asarray(scale * RNG.standard_normal(shape), jnp.float32)


def randomized(lora):
    return jax.tree.map(lambda x: normal(*x.shape, scale=0.3), lora)


def merged64(w0, a, b, scale):
    """``W0 + s * A ⊗ B`` in float64 (A: in-axes + (r,), B: (r,) + out-axes, in the stored order)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.asarray(w0, np.float64) + scale * np.tensordot(a64, b64, axes=[[a64.ndim - 1], [0]])


def lazy_strict(fn, cfg):
    lazy = jlora.lora_apply(fn, cfg, "lazy", strict=True)

    def run(*args):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning either
            return lazy(*args)
    return run


def check_grads(fn, cfg, frozen, lora, *args):
    def loss(mode):
        apply = jlora.lora_apply(fn, cfg, mode, **({"strict": True} if mode == "lazy" else {}))
        return jax.grad(lambda lo: jnp.sum(jnp.sin(apply(frozen, lo, *args))))(lora)
    jax.tree.map(lambda g, h: np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-5),
                 loss("lazy"), loss("merged"))


# --- the walker itself ---------------------------------------------------------------------------

def test_base_mode_evaluates_calls_scan_cond_while_remat():
    def f(w, x):
        y = jax.jit(lambda a: a @ w)(x)
        y, _ = lax.scan(lambda c, r: (jnp.tanh(c + r), None), y, jnp.stack([x @ w, 2 * x @ w]))
        y = lax.cond(y.sum() > 0, jnp.sin, jnp.cos, y)
        y = lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 1.5), (0, y))[1]
        return jax.checkpoint(lambda v: jnp.exp(v) @ w.T)(y)

    w, x = normal(3, 4), normal(2, 3)
    jp = jax.make_jaxpr(f)(w, x)
    (got,) = walker.run(walker.Mode(), jp.jaxpr, jp.consts, [w, x])
    np.testing.assert_allclose(np.asarray(got), np.asarray(f(w, x)), rtol=1e-6)


def test_trace_apply_maps_leaves_to_paths_and_traces_shape_structs():
    params = {"b": {"kernel": jnp.ones((2, 3))}, "a": jnp.ones(3)}
    t = walker.trace_apply(lambda p, x, n=1: (x @ p["b"]["kernel"] + p["a"]) * n, params,
                           (jax.ShapeDtypeStruct((5, 2), jnp.float32),), {"n": 3}, "test")
    assert t.leaf_paths == ["a", "b/kernel"] and len(t.dyn) == 1
    assert [v.aval.shape for v in t.closed.jaxpr.invars] == [(3,), (2, 3), (5, 2)]


# --- sharding_constraint: a view in every mode ---------------------------------------------------

def _mesh():
    return jax.make_mesh((1,), ("m",), axis_types=(AxisType.Auto,))


def _constrained(spec):
    mesh = _mesh()
    return lambda p, x: jnp.einsum("td,dhk->thk", x, lax.with_sharding_constraint(p["w"], NamedSharding(mesh, spec)))


def test_sharding_constraint_roles_lazy_and_factor_specs():
    fn = _constrained(P(None, "m", None))
    frozen, x = {"w": normal(4, 2, 3)}, normal(5, 4)
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets="w")
    _, lora = jlora.init(jax.random.key(0), frozen, cfg, apply_fn=fn, args=(x,))  # used to refuse
    assert lora["w"]["A"].shape == (4, 2) and lora["w"]["B"].shape == (2, 2, 3)  # roles 'ioo' read through it
    lora = randomized(lora)
    y = lazy_strict(fn, cfg)(frozen, lora, x)
    want = np.einsum("td,dhk->thk", np.asarray(x, np.float64), merged64(frozen["w"], lora["w"]["A"], lora["w"]["B"], 2.0))
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
    check_grads(fn, cfg, frozen, lora, x)
    # the factors carry the kernel's sharding on their matching axes; the rank axis is unsharded
    jp = jax.make_jaxpr(jlora.lora_apply(fn, cfg, "lazy", strict=True))(frozen, lora, x)
    specs = {tuple(e.invars[0].aval.shape): tuple(e.params["sharding"].spec)
             for e in _eqns(jp.jaxpr) if e.primitive.name == "sharding_constraint"}
    assert specs[(4, 2, 3)] == (None, "m", None)
    assert specs[(4, 2)] == (None, None) and specs[(2, 2, 3)] == (None, "m", None)


def test_sharding_constraint_row_parallel_shards_a():
    fn = lambda p, x: x @ lax.with_sharding_constraint(p["w"], NamedSharding(_mesh(), P("m", None)))  # noqa: E731
    frozen, x = {"w": normal(6, 3)}, normal(4, 6)
    cfg = jlora.LoraConfig(rank=2, targets="w")
    _, lora = jlora.init(jax.random.key(0), frozen, cfg, apply_fn=fn, args=(x,))
    lora = randomized(lora)
    jp = jax.make_jaxpr(lazy_strict(fn, cfg))(frozen, lora, x)
    specs = {tuple(e.invars[0].aval.shape): tuple(e.params["sharding"].spec)
             for e in _eqns(jp.jaxpr) if e.primitive.name == "sharding_constraint"}
    assert specs[(6, 2)] == ("m", None) and specs[(2, 3)] == (None, None)
    want = np.asarray(x, np.float64) @ merged64(frozen["w"], lora["w"]["A"], lora["w"]["B"], cfg.alpha / cfg.rank)
    np.testing.assert_allclose(np.asarray(lazy_strict(fn, cfg)(frozen, lora, x)), want, rtol=1e-5, atol=1e-6)


def test_sharding_constraint_in_rows_mode():
    from jlora.multi._stack import stack
    from jlora.trace import rows_call

    fn = lambda p, x: x @ lax.with_sharding_constraint(p["w"], NamedSharding(_mesh(), P(None, "m")))  # noqa: E731
    cfg = jlora.LoraConfig(rank=1, alpha=1, targets="w")
    frozen = {"w": normal(3, 2)}
    a, b = normal(3, 1), normal(1, 2)
    s = stack(frozen, {"a": ({"w": {"A": a, "B": b}}, cfg)})
    x = normal(2, 3)
    y = rows_call(fn, frozen, s.lora, jnp.array([0, 1]), (x,), {})
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(np.asarray(y[0]), x64[0] @ merged64(frozen["w"], a, b, 1.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y[1]), x64[1] @ np.asarray(frozen["w"], np.float64), rtol=1e-5, atol=1e-6)


def test_rows_mode_reads_a_cast_kernel_and_a_remat_body():
    """The per-row adapters through a dtype cast (a view in every mode; it used to refuse) inside a
    ``jax.checkpoint`` (re-wrapped by the walker)."""
    from jlora.multi._stack import stack
    from jlora.trace import rows_call

    fn = lambda p, x: jax.checkpoint(lambda w, x: x @ w.astype(jnp.float32))(p["w"], x)  # noqa: E731
    cfg = jlora.LoraConfig(rank=1, alpha=2, targets="w")
    frozen = {"w": normal(3, 2).astype(jnp.bfloat16)}
    a, b = normal(3, 1), normal(1, 2)
    s = stack(frozen, {"a": ({"w": {"A": a, "B": b}}, cfg)})
    x = normal(2, 3)
    y = rows_call(fn, frozen, s.lora, jnp.array([1, 0]), (x,), {})
    x64, w64 = np.asarray(x, np.float64), np.asarray(frozen["w"].astype(jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(y[0]), x64[0] @ w64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y[1]), x64[1] @ merged64(w64, a, b, 2.0), rtol=1e-5, atol=1e-6)


# --- gather: any dimension numbers that look up rows or columns of a table ------------------------

def _penzai_lookup(p, ids):
    """penzai's embedding lookup: a gather on the transposed table (embed, vocab), no collapsed
    dims, the index on axis 1, then a squeeze of the size-1 vocab slice."""
    t = p["table"].T
    dn = lax.GatherDimensionNumbers(offset_dims=(2, 3), collapsed_slice_dims=(), start_index_map=(1,))
    out = lax.gather(t, ids[..., None], dn, slice_sizes=(t.shape[0], 1), mode="promise_in_bounds")
    return jnp.squeeze(out, -1)  # (batch, seq, embed)


def _column_lookup(p, ids):
    return p["table"].T[:, ids]  # gather of columns: collapsed (1,), start (1,), offset (0,)


def test_gather_lookup_any_dimension_numbers():
    vocab, emb = 11, 4
    frozen = {"table": normal(vocab, emb)}
    ids = jnp.array([[1, 3, 10], [0, 0, 7]])
    cfg = jlora.LoraConfig(rank=2, alpha=2.0, targets="table")
    for fn, layout in ((_penzai_lookup, lambda m: m[np.asarray(ids)]), (_column_lookup, lambda m: m.T[:, np.asarray(ids)])):
        _, lora = jlora.init(jax.random.key(0), frozen, cfg, apply_fn=fn, args=(ids,))  # used to refuse
        assert lora["table"]["A"].shape == (vocab, 2) and lora["table"]["B"].shape == (2, emb)  # vocab is the input
        lora = randomized(lora)
        y = lazy_strict(fn, cfg)(frozen, lora, ids)
        want = layout(merged64(frozen["table"], lora["table"]["A"], lora["table"]["B"], 1.0))
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
        check_grads(fn, cfg, frozen, lora, ids)
        jp = jax.make_jaxpr(jlora.lora_apply(fn, cfg, "lazy", strict=True))(frozen, lora, ids)
        assert not any(e.primitive.name == "dot_general" and tuple(e.outvars[0].aval.shape) == (vocab, emb)
                       for e in _eqns(jp.jaxpr)), "no (vocab, emb) delta is formed"


def test_gather_lookup_dora():
    frozen = {"table": normal(9, 4)}
    ids = jnp.array([[2, 8], [5, 5]])
    cfg = jlora.LoraConfig(rank=2, targets="table", use_dora=True)
    frozen, lora = jlora.init(jax.random.key(0), frozen, cfg, apply_fn=_penzai_lookup, args=(ids,))
    lora = {"table": {**randomized(lora)["table"], "m": lora["table"]["m"] * 1.5}}
    y = lazy_strict(_penzai_lookup, cfg)(frozen, lora, ids)
    np.testing.assert_allclose(np.asarray(y), np.asarray(jlora.lora_apply(_penzai_lookup, cfg, "merged")(frozen, lora, ids)),
                               rtol=1e-5, atol=1e-6)


# --- shard_map: a call the walker enters, the factors sharded like the kernel's axes ---------------

_SHARD_MAP = r"""
import json, warnings
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, PartitionSpec as P
import jlora

mesh = jax.make_mesh((8,), ("m",), axis_types=(AxisType.Auto,))


def mlp(p, x):  # Megatron MLP: column-parallel w1, row-parallel w2, x replicated
    def local(w1, w2, x):
        return jax.lax.psum(jnp.tanh(x @ w1) @ w2, "m")
    return jax.shard_map(local, mesh=mesh, in_specs=(P(None, "m"), P("m", None), P()), out_specs=P())(
        p["w1"], p["w2"], x)


rng = np.random.default_rng(0)
frozen = {"w1": jnp.asarray(rng.standard_normal((6, 16)) * 0.5, jnp.float32),
          "w2": jnp.asarray(rng.standard_normal((16, 6)) * 0.5, jnp.float32)}
x = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets="w.")
_, lora = jlora.init(jax.random.key(0), frozen, cfg, apply_fn=mlp, args=(x,))
lora = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.3, jnp.float32), lora)
with warnings.catch_warnings():
    warnings.simplefilter("error")
    lazy = jlora.lora_apply(mlp, cfg, "lazy", strict=True)
    y = jax.jit(lazy)(frozen, lora, x)
    g = jax.grad(lambda lo: jnp.sum(jnp.sin(lazy(frozen, lo, x))))(lora)
merged = jlora.lora_apply(mlp, cfg, "merged")
g_merged = jax.grad(lambda lo: jnp.sum(jnp.sin(merged(frozen, lo, x))))(lora)
jp = jax.make_jaxpr(lazy)(frozen, lora, x)
(sm,) = [e for e in jp.jaxpr.eqns if e.primitive.name == "shard_map"]
specs = {str(v.aval.shape): str(s) for v, s in zip(sm.invars, sm.params["in_specs"])}
# with_sharding_constraint on a kernel, on 8 devices (column-parallel)
col = lambda p, x: x @ jax.lax.with_sharding_constraint(p["w3"], jax.NamedSharding(mesh, P(None, "m")))
f3 = {"w3": jnp.asarray(rng.standard_normal((6, 16)) * 0.5, jnp.float32)}
_, l3 = jlora.init(jax.random.key(1), f3, cfg3 := jlora.LoraConfig(rank=2, alpha=4.0, targets="w3"), apply_fn=col,
                   args=(x,))
l3 = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.3, jnp.float32), l3)
with warnings.catch_warnings():
    warnings.simplefilter("error")
    y3 = jax.jit(jlora.lora_apply(col, cfg3, "lazy", strict=True))(f3, l3, x)
print(json.dumps(dict(y=np.asarray(y).tolist(), specs=specs, devices=jax.device_count(), y3=np.asarray(y3).tolist(), w3=np.asarray(f3["w3"]).tolist(),
                      lora3={k: np.asarray(v).tolist() for k, v in jlora.paths.flatten(l3).items()},
                      shapes={k: list(v.shape) for k, v in jlora.paths.flatten(lora).items()},
                      grad_err=max(float(jnp.max(jnp.abs(a - b))) for a, b in
                                   zip(jax.tree.leaves(g), jax.tree.leaves(g_merged))),
                      lora={k: np.asarray(v).tolist() for k, v in jlora.paths.flatten(lora).items()})))
"""


def _on_eight_devices(script: str) -> dict:
    """Runs ``script`` in a fresh Python with 8 simulated CPU devices; the JSON its last line prints."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_shard_map_and_sharding_constraint_on_eight_devices():
    res = _on_eight_devices(_SHARD_MAP)
    assert res["devices"] == 8
    assert res["shapes"] == {"w1/A": [6, 2], "w1/B": [2, 16], "w2/A": [16, 2], "w2/B": [2, 6]}  # roles read inside
    lo = {k: np.asarray(v, np.float64) for k, v in res["lora"].items()}
    rng = np.random.default_rng(0)  # the same base as in the subprocess
    w1, w2 = rng.standard_normal((6, 16)) * 0.5, rng.standard_normal((16, 6)) * 0.5
    w1, w2 = (np.asarray(np.float32(w), np.float64) for w in (w1, w2))
    x = np.asarray(np.float32(rng.standard_normal((3, 6))), np.float64)
    m1, m2 = w1 + 2.0 * lo["w1/A"] @ lo["w1/B"], w2 + 2.0 * lo["w2/A"] @ lo["w2/B"]
    np.testing.assert_allclose(np.asarray(res["y"]), np.tanh(x @ m1) @ m2, rtol=1e-5, atol=1e-5)
    w3 = np.asarray(res["w3"], np.float64)
    l3 = {k: np.asarray(v, np.float64) for k, v in res["lora3"].items()}
    np.testing.assert_allclose(np.asarray(res["y3"]), x @ (w3 + 2.0 * l3["w3/A"] @ l3["w3/B"]), rtol=1e-5, atol=1e-5)
    assert res["grad_err"] < 1e-4
    # W0 keeps its spec; column-parallel: B split, A whole; row-parallel: A split, B whole; rank unsharded
    assert res["specs"]["(6, 16)"] == str(jax.sharding.PartitionSpec(None, "m"))
    assert res["specs"]["(6, 2)"] == str(jax.sharding.PartitionSpec(None, None))
    assert res["specs"]["(2, 16)"] == str(jax.sharding.PartitionSpec(None, "m"))
    assert res["specs"]["(16, 2)"] == str(jax.sharding.PartitionSpec("m", None))
    assert res["specs"]["(2, 6)"] == str(jax.sharding.PartitionSpec(None, None))


# --- MaxText's MoE form: expert kernels through sharding_constraint into a shard_map, then ragged_dot --------

_MOE = r"""
import json, warnings
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import jlora

mesh = jax.make_mesh((8,), ("expert",), axis_types=(AxisType.Auto,))
E, T, D, F = 8, 32, 6, 10  # experts, tokens (sorted by expert, T // E each), width, hidden


def moe(p, x):
    w_in = jax.lax.with_sharding_constraint(p["wi"], NamedSharding(mesh, P("expert", None, None)))
    w_out = jax.lax.with_sharding_constraint(p["wo"], NamedSharding(mesh, P("expert", None, None)))

    def local(x, wi, wo):  # this device's experts and their tokens
        sizes = jnp.full((wi.shape[0],), x.shape[0] // wi.shape[0], jnp.int32)
        return jax.lax.ragged_dot(jnp.tanh(jax.lax.ragged_dot(x, wi, sizes)), wo, sizes)
    return jax.shard_map(local, mesh=mesh, in_specs=(P("expert"), P("expert"), P("expert")),
                         out_specs=P("expert"))(x, w_in, w_out)


rng = np.random.default_rng(0)
frozen = {"wi": jnp.asarray(rng.standard_normal((E, D, F)) * 0.5, jnp.float32),
          "wo": jnp.asarray(rng.standard_normal((E, F, D)) * 0.5, jnp.float32)}
x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets="w.")
_, lora = jlora.init(jax.random.key(0), frozen, cfg, apply_fn=moe, args=(x,))
roles = {k: v.roles for k, v in jlora.kernel_layouts(lora).items()}
lora = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.3, jnp.float32), lora)
with warnings.catch_warnings():
    warnings.simplefilter("error")
    lazy = jlora.lora_apply(moe, cfg, "lazy", strict=True)
    y = jax.jit(lazy)(frozen, lora, x)
    g = jax.jit(jax.grad(lambda lo: jnp.sum(jnp.sin(lazy(frozen, lo, x)))))(lora)
merged = jlora.lora_apply(moe, cfg, "merged")
g_merged = jax.jit(jax.grad(lambda lo: jnp.sum(jnp.sin(merged(frozen, lo, x)))))(lora)
print(json.dumps(dict(y=np.asarray(y).tolist(), roles=roles,
                      lora={k: np.asarray(v).tolist() for k, v in jlora.paths.flatten(lora).items()},
                      grad_err=max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                                   for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_merged))))))
"""


def test_maxtext_moe_form_sharding_constraint_shard_map_ragged_dot():
    """MaxText's MoE block: expert kernels pass ``with_sharding_constraint`` and enter a ``shard_map``
    (expert parallel) before ``ragged_dot``: roles are read (expert axis = stack), lazy runs strictly (no
    merged fallback) and matches a float64 NumPy reference; gradients match merged mode's."""
    res = _on_eight_devices(_MOE)
    assert res["roles"] == {"wi": "sio", "wo": "sio"}
    rng = np.random.default_rng(0)  # the same base as in the subprocess
    wi, wo = (np.asarray(np.float32(rng.standard_normal(s) * 0.5), np.float64) for s in ((8, 6, 10), (8, 10, 6)))
    x = np.asarray(np.float32(rng.standard_normal((32, 6))), np.float64)
    lo = {k: np.asarray(v, np.float64) for k, v in res["lora"].items()}
    mi = wi + 2.0 * np.einsum("eir,ero->eio", lo["wi/A"], lo["wi/B"])
    mo = wo + 2.0 * np.einsum("eir,ero->eio", lo["wo/A"], lo["wo/B"])
    xe = x.reshape(8, 4, 6)  # 4 tokens per expert, in expert order
    want = np.einsum("etf,efo->eto", np.tanh(np.einsum("eti,eif->etf", xe, mi)), mo).reshape(32, 6)
    np.testing.assert_allclose(np.asarray(res["y"]), want, rtol=1e-5, atol=1e-5)
    assert res["grad_err"] < 1e-4
