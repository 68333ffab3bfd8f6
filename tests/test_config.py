"""LoraConfig: hashable, static under jit, exact JSON round trip; property tests over shapes and kinds."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jlora

cfg_strategy = st.builds(
    jlora.LoraConfig,
    rank=st.integers(1, 64),
    alpha=st.floats(0.01, 1e3),
    targets=st.lists(st.sampled_from([r".*/q/kernel", r".*kernel", r"a|b"]), min_size=1, max_size=3).map(tuple),
    rank_pattern=st.dictionaries(st.sampled_from([r".*layer_0.*", r".*/v/.*"]), st.integers(1, 8)),
    alpha_pattern=st.dictionaries(st.sampled_from([r".*layer_1.*"]), st.floats(0.5, 64)),
    rslora=st.booleans(),
    dropout=st.floats(0, 0.9),
    init=st.sampled_from(jlora.core._config.INITS),
    fused=st.dictionaries(st.sampled_from([r".*qkv.*"]), st.lists(st.booleans(), min_size=2, max_size=4).filter(any).map(tuple)),
)


@settings(max_examples=60, deadline=None)
@given(cfg_strategy)
def test_json_round_trip_exact_and_hashable(cfg):
    back = jlora.LoraConfig.from_json(cfg.to_json())
    assert back == cfg and hash(back) == hash(cfg)


def test_config_is_a_static_jit_argument():
    traces = []

    def f(x, cfg):
        traces.append(1)
        return x * cfg.scale_for("params/q/kernel")

    jf = jax.jit(f, static_argnums=1)
    a = jlora.LoraConfig(rank=4, alpha=8, targets=".*")
    jf(1.0, a)
    jf(2.0, jlora.LoraConfig(rank=4, alpha=8, targets=".*"))  # equal config: no retrace
    assert len(traces) == 1
    assert float(jf(1.0, jlora.LoraConfig(rank=4, alpha=8, targets=".*", rslora=True))) == 4.0


def test_patterns_and_scaling():
    cfg = jlora.LoraConfig(rank=8, alpha=16, targets=".*", rank_pattern={r".*/v/.*": 4},
                           alpha_pattern={r".*layer_1/.*": 2.0}, rslora=True)
    assert cfg.rank_for("p/layer_0/v/kernel") == 4
    assert cfg.scale_for("p/layer_0/v/kernel") == 16 / 2.0
    assert cfg.scale_for("p/layer_1/q/kernel") == 2.0 / np.sqrt(8)


@settings(max_examples=10, deadline=None)
@given(
    n_stack=st.integers(0, 1),
    ins=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    outs=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    rank=st.integers(1, 4),
    kind=st.sampled_from(["dense", "embed"]),
)
def test_property_delta_factorises_every_shape(n_stack, ins, outs, rank, kind):
    shape = (3,) * n_stack + tuple(ins) + tuple(outs)
    layout = jlora.layout.Layout.plain(shape, n_stack, len(ins), kind)
    rank = min(rank, layout.max_rank())
    a, b = jlora.core._kinds.init_factors(jax.random.key(0), layout, rank, "kaiming", jnp.float32)
    # output unchanged at init for every kind
    assert float(jnp.abs(jnp.tensordot(a[(0,) * n_stack] if n_stack else a, b[(0,) * n_stack] if n_stack else b, 1)).max()) == 0
    a = jax.random.normal(jax.random.key(1), a.shape)
    b = jax.random.normal(jax.random.key(2), b.shape)
    cfg = jlora.LoraConfig(rank=rank, alpha=2.0, targets=".*")
    frozen = {"w": jnp.zeros(shape)}
    info = jlora.adapted(frozen, {"w": {"A": a, "B": b}}, cfg)["w"]
    assert (info.n_stack, info.n_in, info.rank) == (n_stack, len(ins), rank)
    got = np.asarray(jlora.delta(frozen, {"w": {"A": a, "B": b}}, cfg)["w"])
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    s = 2.0 / rank
    if n_stack:
        ref = np.stack([s * np.tensordot(a64[i], b64[i], 1) for i in range(3)])
    else:
        ref = s * np.tensordot(a64, b64, 1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # matrix rank of the delta is at most r
    assert np.linalg.matrix_rank(ref.reshape((3,) * n_stack + (int(np.prod(ins)), -1))[(0,) * n_stack]) <= rank


def test_every_public_name_has_a_doctest():
    import doctest

    finder = doctest.DocTestFinder()
    for name in jlora.__all__:
        obj = getattr(jlora, name)
        assert obj.__doc__, f"jlora.{name} has no docstring"
        tests = [t for t in finder.find(obj, name) if t.examples]
        assert tests, f"jlora.{name} has no doctest example"
