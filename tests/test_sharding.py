"""Tests for jlora.sharding: factor shardings from base shardings, and 8-device training.

The 8-device checks run in a subprocess (XLA_FLAGS must be set before jax is imported,
and pytest may already have imported jax with one device).
"""

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
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jlora
from jlora import sharding

ROOT = Path(__file__).resolve().parents[1]


def _model_params():
    return {
        "stack": {"kernel": jnp.ones((3, 8, 12))},          # nn.scan layers: (L, in, out)
        "qkv": {"kernel": jnp.ones((8, 24)), "bias": jnp.zeros(24)},  # fused q|k|v
        "att": {"kernel": jnp.ones((8, 2, 4))},             # DenseGeneral (d, heads, hd)
        "out": {"kernel": jnp.ones((2, 4, 8))},             # (heads, hd, d): 2 input axes
    }


CFG = jlora.LoraConfig(rank=2, targets=r".*kernel", stack={"stack/kernel": 1},
                       fused={"qkv/kernel": (True, False, True)},
                       axes={"att/kernel": 1, "out/kernel": 2}, trainable="qkv/bias")
SPECS = {
    "stack": {"kernel": P("layers", "data", "model")},
    "qkv": {"kernel": P(None, "model"), "bias": P("model")},
    "att": {"kernel": P("data", "model")},  # trailing None omitted on purpose
    "out": {"kernel": P("model", None, "data")},
}
EXPECTED = {
    "stack/kernel/A": P("layers", "data", None), "stack/kernel/B": P("layers", None, "model"),
    "qkv/kernel/A": P(None, None), "qkv/kernel/B": P(None, None, "model"),
    "qkv/bias": P("model"),
    "att/kernel/A": P("data", None), "att/kernel/B": P(None, "model", None),
    "out/kernel/A": P("model", None, None), "out/kernel/B": P(None, "data"),
}


def _norm(spec):
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return tuple(parts)


def _check(specs):
    flat = {p: s for p, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, (P, NamedSharding)))[0]}
    got = {jlora.paths.path_str(k): (s.spec if isinstance(s, NamedSharding) else s)
           for k, s in flat.items()}
    assert set(got) == set(EXPECTED)
    for p, want in EXPECTED.items():
        assert _norm(got[p]) == _norm(want), (p, got[p], want)


@pytest.fixture(scope="module")
def lora():
    return jlora.init(jax.random.key(0), _model_params(), CFG)[1]


def test_rule_on_every_kind(lora):
    # Stacked, fused, DenseGeneral (1 and 2 input axes), trained-whole leaf, short specs.
    _check(sharding.lora_specs(SPECS, lora, CFG))
    # With frozen (shapes read through jlora.adapted) and on abstract shapes.
    abstract = jax.eval_shape(lambda: lora)
    _check(sharding.lora_specs(SPECS, abstract, CFG, frozen=jax.eval_shape(_model_params)))
    # Each factor spec has exactly the factor's rank (no padding past its ndim).
    specs = sharding.lora_specs(SPECS, lora, CFG)
    for (k, s), x in zip(jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda v: isinstance(v, P))[0], jax.tree.leaves(lora)):
        assert len(s) <= x.ndim, (k, s, x.shape)


def _mesh():
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("layers", "data", "model"))


def test_named_shardings_and_sharded_arrays(lora):
    mesh = _mesh()
    named = jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS, is_leaf=lambda x: isinstance(x, P))
    out = sharding.lora_shardings(named, lora, CFG)
    _check(out)
    assert all(s.mesh is mesh for s in jax.tree.leaves(out))
    # The base params themselves (sharded arrays) as the source.
    params = jax.tree.map(jax.device_put, _model_params(), named)
    _check(sharding.lora_shardings(params, lora, CFG))


def test_flax_partitioned_and_logical_rules():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(16, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")),
                         name="up")(x)
            return nn.Dense(8, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                        ("mlp", "embed")), name="down")(x)

    boxed = jax.eval_shape(Net().init, jax.random.key(0), jnp.ones((1, 8)))
    cfg = jlora.LoraConfig(rank=2, targets=r".*/kernel")
    params = nn.meta.unbox(boxed)
    abstract = jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, cfg)[1], params)
    rules = (("mlp", "model"), ("embed", None))
    with nn.logical_axis_rules(rules):
        specs = sharding.lora_specs(boxed, abstract, cfg, rules=rules)
    assert _norm(specs["params"]["up"]["kernel"]["A"]) == ()
    assert _norm(specs["params"]["up"]["kernel"]["B"]) == (None, "model")
    assert _norm(specs["params"]["down"]["kernel"]["A"]) == ("model",)
    assert _norm(specs["params"]["down"]["kernel"]["B"]) == ()
    # nn.get_partition_spec output + logical rules on a plain PartitionSpec tree gives the same.
    logical = nn.get_partition_spec(boxed)
    specs = sharding.lora_specs(logical, abstract, cfg, rules=rules)
    assert _norm(specs["params"]["down"]["kernel"]["A"]) == ("model",)


def test_flax_nnx_partition_specs():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            init = nnx.initializers.lecun_normal()
            self.up = nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(init, (None, "model")), rngs=rngs)
            self.down = nnx.Linear(16, 8, kernel_init=nnx.with_partitioning(init, ("model", None)), rngs=rngs)

    with jax.set_mesh(Mesh(np.array(jax.devices()[:1]), ("model",))):
        _, state = nnx.split(nnx.eval_shape(lambda: Net(nnx.Rngs(0))))
    cfg = jlora.LoraConfig(rank=2, targets=r".*kernel")
    abstract = jax.eval_shape(lambda s: jlora.init(jax.random.key(0), s, cfg)[1], state)
    for base in (nnx.get_partition_spec(state), state):  # Variables of specs, or the sharded state
        specs = sharding.lora_specs(base, abstract, cfg)
        assert _norm(specs["up"]["kernel"]["B"]) == (None, "model") and _norm(specs["up"]["kernel"]["A"]) == ()
        assert _norm(specs["down"]["kernel"]["A"]) == ("model",) and _norm(specs["down"]["kernel"]["B"]) == ()


def test_jit_init_directly_sharded(lora):
    mesh = _mesh()
    params = _model_params()
    abstract = jax.eval_shape(lambda k, p: jlora.init(k, p, CFG)[1], jax.random.key(0), params)
    shard = sharding.lora_shardings(SPECS, abstract, CFG, mesh=mesh)
    made = jax.jit(lambda k, p: jlora.init(k, p, CFG)[1], out_shardings=shard)(jax.random.key(0), params)
    for (k, x), s in zip(jax.tree_util.tree_flatten_with_path(made)[0], jax.tree.leaves(shard)):
        assert x.sharding.spec == s.spec, k
        want = jlora.paths.flatten(lora)[jlora.paths.path_str(k)]
        np.testing.assert_array_equal(np.asarray(x), np.asarray(want))


def test_state_shardings(lora):
    import optax
    mesh = _mesh()
    shard = sharding.lora_shardings(SPECS, lora, CFG, mesh=mesh)
    state = sharding.state_shardings(jax.eval_shape(optax.adamw(1e-3).init, lora), lora, shard)
    assert state[0].mu["stack"]["kernel"]["B"].spec == P("layers", None, "model")
    assert state[0].count.spec == P()


def test_errors(lora):
    with pytest.raises(ValueError, match=r"'att/kernel/A' has no base spec.*att/kernel"):
        sharding.lora_specs({k: v for k, v in SPECS.items() if k != "att"}, lora, CFG)
    with pytest.raises(ValueError, match="needs a mesh"):
        sharding.lora_shardings(SPECS, lora, CFG)
    with pytest.raises(TypeError, match="'att/kernel'.*expected a PartitionSpec"):
        sharding.lora_specs({**SPECS, "att": {"kernel": "model"}}, lora, CFG)
    with pytest.raises(ValueError, match=r"base spec at 'att/kernel' is .*\(4 axes\) but the kernel has 3"):
        sharding.lora_specs({**SPECS, "att": {"kernel": P(None, None, None, "model")}}, lora, CFG)


_EIGHT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import importlib.util, jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    assert jax.device_count() == 8, jax.devices()
    spec = importlib.util.spec_from_file_location("sharded_train", sys.argv[1])
    ex = importlib.util.module_from_spec(spec); spec.loader.exec_module(ex)
    mesh = ex.make_mesh()
    out = {"single": ex.train(None, 3, sys.argv[2])[0]}  # the reference: one device
    for mode in sys.argv[2:]:
        losses, lora, st = ex.train(mesh, 3, mode)
        batch = jax.device_put(ex.make_batch(0), st["batch_sharding"])
        gathered = ex.gathered_kernels(st["step"], st["frozen"], lora, st["opt_state"], batch)
        flat = ex.jlora.paths.flatten(lora)
        out[mode] = dict(losses=losses, gathered=gathered,
            frozen_specs={p: str(x.sharding.spec) for p, x in ex.jlora.paths.flatten(st["frozen"]).items()},
            specs={p: str(x.sharding.spec) for p, x in flat.items()})
    # Negative control: a function that must all-gather a column-parallel kernel.
    w = st["frozen"]["params"]["block_0"]["q"]["kernel"]
    ctl = jax.jit(lambda w: w * 2, out_shardings=NamedSharding(mesh, P())).lower(w).compile().as_text()
    out["control"] = [list(s) for s in ex.all_gathered_shapes(ctl)]
    out["kernel"] = list(w.shape)
    print(json.dumps(out))
""")


def test_eight_devices_match_one():
    modes = ["lazy", "merged"]
    try:
        import jlora.trace._lazy  # noqa: F401  pylint: disable=unused-import
    except ImportError:  # the lazy rewrite is optional for this test
        modes = ["merged"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", _EIGHT, str(ROOT / "examples/sharded_train.py"), *modes],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    for mode in modes:
        got = res[mode]
        # 8 devices (2 data x 4 model) == 1 device, step by step
        np.testing.assert_allclose(got["losses"], res["single"], rtol=0, atol=1e-5, err_msg=mode)
        # The base really is Megatron-sharded, and the factors follow the rule.
        assert got["frozen_specs"]["params/block_0/q/kernel"] == str(P(None, "model"))
        assert got["frozen_specs"]["params/block_1/fc2/kernel"] == str(P("model", None))
        for layer in (0, 1):
            for name in ("q", "k", "v", "fc1"):  # column-parallel: B is split, A replicated
                assert got["specs"][f"params/block_{layer}/{name}/kernel/A"] == str(P(None, None))
                assert got["specs"][f"params/block_{layer}/{name}/kernel/B"] == str(P(None, "model"))
            for name in ("o", "fc2"):  # row-parallel: A is split, B replicated
                assert got["specs"][f"params/block_{layer}/{name}/kernel/A"] == str(P("model", None))
                assert got["specs"][f"params/block_{layer}/{name}/kernel/B"] == str(P(None, None))
        # No frozen kernel is all-gathered by the compiled step.
        assert got["gathered"] == [], (mode, got["gathered"])
    # ... and the detector does see one when a gather is forced.
    assert res["kernel"] in res["control"], res["control"]


def test_dora_magnitude_and_embedding_rows_specs():
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jlora

    params = {"emb": {"embedding": jnp.ones((16, 8))}, "q": {"kernel": jnp.ones((8, 2, 4))}}
    cfg = jlora.LoraConfig(rank=2, targets=r"q/kernel", use_dora=True, axes={"q/kernel": 1},
                           embedding_rows={"emb/embedding": (14, 15)})
    frozen, lora = jlora.init(jax.random.key(0), params, cfg)
    base = {"emb": {"embedding": P("model", "data")}, "q": {"kernel": P("data", "model", None)}}
    specs = jlora.lora_specs(base, lora, cfg, frozen=frozen)
    assert specs["q"]["kernel"]["m"] == P("model", None)  # the output axes (heads, head_dim)
    assert specs["q"]["kernel"]["A"] == P("data", None) and specs["q"]["kernel"]["B"] == P(None, "model", None)
    assert specs["emb"]["embedding"]["rows"] == P(None, "data")
