"""LoRA on model code nobody here wrote (issue 18): gemma, tunix (NNX), equinox, keras 3 (JAX backend),
and stock JAX/Flax reproductions of each kernel layout (tests/real_models.py builds them).

Per family, with every factor set random so the delta is non-zero:
- the factor shapes by axis role, written out below per kernel;
- ``jlora.merge`` == W + delta, with delta computed here in float64 from A and B through an einsum
  whose axis letters state the expected roles;
- merged mode, and lazy mode with ``strict=True`` and warnings as errors, == ``apply`` on those
  reference parameters; lazy gradients == merged mode's;
- XLA FLOPs of the jitted lazy ``value_and_grad`` clearly below merged mode's, for the dense and
  einsum families.
Only a missing optional package (gemma, tunix, equinox, keras) skips a family.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import re
import warnings
import zlib
from typing import Any

import real_models as rm  # first: sets KERAS_BACKEND before anything imports keras

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

R, ALPHA = 4, 8.0
SCALE = ALPHA / R  # alpha / r: the tests state the scale, they do not ask jlora for it
D, N, K, H, F, E = rm.D, rm.N, rm.K, rm.H, rm.F, rm.E


@dataclasses.dataclass(frozen=True)
class Expect:
    """A (stack + in + (r,)) and B (stack + (r,) + out) shapes, and ``spec``: the einsum 'A,B->W' that
    gives the delta in the stored order (its output is reshaped to the kernel's shape: grouped convs).
    ``None`` (depthwise convs): any factorisation, checked only through lazy == merged."""

    a: tuple[int, ...] | None
    b: tuple[int, ...] | None
    spec: str | None


ANY = Expect(None, None, None)
G = 2  # groups of the grouped convs: PEFT's convention, r is the total rank, r / G per group
Q_NDH = Expect((D, R), (R, N, H), "dr,rnh->ndh")  # gemma 'BTD,NDH->BTNH': heads are output axes
Q_DNH = Expect((D, R), (R, N, H), "dr,rnh->dnh")  # tunix/keras 'BTD,DNH->BTNH'
KV_DKH = Expect((D, R), (R, K, H), "dr,rkh->dkh")
O_NHD = Expect((N, H, R), (R, D), "nhr,rd->nhd")  # 'BTNH,NHD->BTD': contracts (1, 0) on the kernel
OUT_IN = "ir,ro->oi"  # (out, in) storage: A (in, r), B (r, out)
IN_OUT = "ir,ro->io"
OIHW = Expect((4, 3, 3, R), (R, 8), "ihwr,ro->oihw")
GROUPED = "gijcr,gro->ijcgo"  # (k, k, cin/G, cout) with group-major output channels
EXPERTS = "edr,erf->edf"  # (E, in, out): the expert axis is a stack axis

EXPECT: dict[str, dict[str, Expect]] = {
    "gemma_block": {
        "params/attn/q_einsum/w": Q_NDH,
        "params/attn/kv_einsum/w": Expect((D, R), (R, 2, K, H), "dr,rckh->ckdh"),
        "params/attn/attn_vec_einsum/w": O_NHD,
        "params/mlp/gating_einsum": Expect((D, R), (R, 2, F), "dr,rcf->cdf"),
        "params/mlp/linear": Expect((F, R), (R, D), "fr,rd->fd"),
    },
    "gemma_attention_mha": {
        "params/qkv_einsum/w": Expect((D, R), (R, 3, N, H), "dr,rsnh->sndh"),
        "params/attn_vec_einsum/w": O_NHD,
    },
    "tunix_qwen3": {
        "layers/0/attn/q_proj/w": Q_DNH,
        "layers/0/attn/k_proj/w": KV_DKH,
        "layers/0/attn/v_proj/w": KV_DKH,
        "layers/0/attn/o_proj/w": O_NHD,
        "layers/0/mlp/gate_proj/kernel": Expect((D, R), (R, F), IN_OUT),
        "layers/0/mlp/up_proj/kernel": Expect((D, R), (R, F), IN_OUT),
        "layers/0/mlp/down_proj/kernel": Expect((F, R), (R, D), IN_OUT),
    },
    "tunix_qwen3_moe": {
        "gate_proj": Expect((E, D, R), (E, R, 128), EXPERTS),
        "up_proj": Expect((E, D, R), (E, R, 128), EXPERTS),
        "down_proj": Expect((E, 128, R), (E, R, D), EXPERTS),
    },
    "equinox_attention": {
        "embed/weight": Expect((128, R), (R, D), OUT_IN),
        **{f"attn/{n}_proj/weight": Expect((D, R), (R, D), OUT_IN) for n in ("query", "key", "value", "output")},
    },
    "equinox_conv": {
        "conv/weight": OIHW,
        "convt/weight": Expect((8, 3, 3, R), (R, 6), "ihwr,ro->oihw"),  # lhs-dilated conv, OIHW
    },
    "keras_dense": {
        "dense/kernel": Expect((128, R), (R, D), IN_OUT),
        "q_proj/kernel": Q_DNH,
        "o_proj/kernel": O_NHD,
    },
    "keras_conv": {
        "depthwise/kernel": ANY,
        "grouped/kernel": Expect((G, 3, 3, 4, R // G), (G, R // G, 4), GROUPED),
        "transposed/kernel": Expect((3, 3, 8, R), (R, 6), "ijcr,ro->ijoc"),  # (k, k, out, in), used through rev
    },
    "stock_einsum": {
        "params/q/kernel": Q_NDH,
        "params/kv": Expect((D, R), (R, 2, N, H), "dr,rckh->ckdh"),
        "params/o/kernel": O_NHD,
    },
    "stock_dense_out_in": {
        "w1": Expect((128, R), (R, D), OUT_IN),
        "w2": Expect((D, R), (R, 128), OUT_IN),
    },
    "stock_conv_oihw": {"conv/w": OIHW},
    "stock_conv_grouped": {"params/kernel": Expect((G, 3, 3, 2, R // G), (G, R // G, 4), GROUPED)},
    "stock_conv_depthwise": {"params/kernel": ANY},
    "stock_conv_transpose": {
        "params/convt/kernel": Expect((3, 3, 4, R), (R, 8), "ijcr,ro->ijco"),
        "params/convt_flip/kernel": Expect((3, 3, 8, R), (R, 6), "ijcr,ro->ijoc"),  # transpose_kernel: rev, (k, k, out, in)
    },
    "stock_experts": {
        "w_index": Expect((E, D, R), (E, R, 128), EXPERTS),
        "w_take": Expect((E, D, R), (E, R, 128), EXPERTS),
        "w_dyn": Expect((E, 128, R), (E, R, D), EXPERTS),
    },
    "stock_views": {
        "w_merge": Q_DNH,  # used as reshape(D, N*H)
        "w_perm": Expect((N, H, R), (R, D), "nhr,rd->dnh"),  # used as transpose(1, 2, 0) in 'btnh,nhd->btd'
        "w_split": Expect((D, R), (R, N * H), IN_OUT),  # used as reshape(D, N, H)
        "w_rev": Expect((N * H, R), (R, D), IN_OUT),  # used as flip(w, 0)
    },
}
FLOPS = ("gemma_block", "gemma_attention_mha", "tunix_qwen3", "tunix_qwen3_moe", "equinox_attention",
         "keras_dense", "stock_einsum", "stock_dense_out_in", "stock_experts", "stock_views")
PACKAGE = {"gemma": "gemma", "tunix": "tunix", "equinox": "equinox", "keras": "keras"}
NAMES = list(rm.BUILDERS)
assert set(EXPECT) == set(NAMES)


@contextlib.contextmanager
def _no_warnings() -> Any:
    """Every warning is an error (a lazy fallback warns), except the packages' own DeprecationWarnings
    (tunix reads nnx ``Variable.value``), which pyproject's filterwarnings ignores anyway."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def _rel(got: Any, want: Any) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _family(name: str) -> rm.Family:
    package = PACKAGE.get(name.split("_")[0])
    assert package is None or importlib.util.find_spec(package) is not None, (
        f"{name}: package {package!r} is not installed; scripts/setup.sh installs it (run bash scripts/test.sh)")
    return rm.build(name)


def _last_key(keypath: tuple[Any, ...]) -> Any:
    k = keypath[-1]
    return getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))


def _randomize(lora: Any) -> Any:
    """Every factor drawn with NumPy (A: std 1/sqrt(fan), B: std 0.1), so every delta is non-zero; the
    lora tree's structure (and its per-kernel node type) is kept."""

    def one(keypath: tuple[Any, ...], x: Any) -> Any:
        role = _last_key(keypath)
        assert role in ("A", "B"), (rm.path_str(keypath), "a lora leaf that is not a factor")
        rng = np.random.default_rng(zlib.crc32(rm.path_str(keypath).encode()))
        std = 0.1 if role == "B" else float(np.prod(x.shape[:-1])) ** -0.5
        return jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(one, lora)


def _factors(lora: Any) -> dict[str, dict[str, Any]]:
    """``{kernel path: {'A': A, 'B': B}}`` from the lora tree."""
    out: dict[str, dict[str, Any]] = {}
    for p, x in rm.flat(lora).items():
        kernel, _, role = p.rpartition("/")
        if role in ("A", "B"):
            out.setdefault(kernel, {})[role] = x
    return out


def _config(name: str, fam: rm.Family) -> jlora.LoraConfig:
    """The adapter of every check: rank R, alpha ALPHA, the family's targets; roles come from the trace."""
    return jlora.LoraConfig(rank=R, alpha=ALPHA, targets=fam.targets)


@functools.cache
def _setup(name: str) -> tuple[rm.Family, jlora.LoraConfig, Any, Any]:
    """``jlora.init`` runs under ``jax.eval_shape`` (its trace, roles and shapes are all the tests read: its
    kaiming draws would compile a PRNG program per kernel shape, ~25 s over the families); frozen is the
    params tree itself, which init must leave unchanged."""
    fam = _family(name)
    cfg = _config(name, fam)
    with _no_warnings():
        frozen, lora = jax.eval_shape(
            lambda p: jlora.init(jax.random.key(0), p, cfg, apply_fn=fam.apply, args=fam.args), fam.params)
    assert jax.tree.structure(frozen) == jax.tree.structure(fam.params)
    return fam, cfg, fam.params, _randomize(lora)


@functools.cache
def _merged(name: str) -> dict[str, Any]:
    """``jlora.merge(frozen, lora, cfg)``, flat, under jit (one compile), warnings as errors."""
    _, cfg, frozen, lora = _setup(name)
    with _no_warnings():
        return rm.flat(jax.jit(lambda f, l: jlora.merge(f, l, cfg))(frozen, lora))


def _delta(exp: Expect, a: Any, b: Any, shape: tuple[int, ...]) -> np.ndarray:
    """float64 ``s * einsum(spec, A, B)`` in the stored order of a kernel of ``shape``."""
    return (SCALE * np.einsum(exp.spec, np.asarray(a, np.float64), np.asarray(b, np.float64))).reshape(shape)


@functools.cache
def _reference_kernels(name: str) -> dict[str, np.ndarray]:
    """float64 W + delta per target kernel (for a depthwise kernel, ``ANY``: jlora.merge's own kernel)."""
    fam, cfg, frozen, lora = _setup(name)
    w0, factors = rm.flat(fam.params), _factors(lora)
    out = {}
    for p, exp in EXPECT[name].items():
        got = tuple(factors[p]["A"].shape), tuple(factors[p]["B"].shape)
        if exp.spec is not None and got != (exp.a, exp.b):
            raise AssertionError(f"{p}: jlora gave A, B {got}, expected {(exp.a, exp.b)}: the float64 "
                                 "reference needs the expected roles (see test_factor_shapes_by_role)")
        if exp.spec is None:
            out[p] = np.asarray(_merged(name)[p], np.float64)
        else:
            out[p] = np.asarray(w0[p], np.float64) + _delta(exp, factors[p]["A"], factors[p]["B"], w0[p].shape)
    return out


def _cotangent(out: Any) -> jax.Array:
    return jnp.asarray(np.random.default_rng(42).standard_normal(out.shape), jnp.float32)


@functools.cache
def _jit_apply(name: str) -> Any:
    return jax.jit(_family(name).apply)  # one compile serves params and the reference params alike


@functools.cache
def _compiled(name: str, mode: str) -> Any:
    """``jit(value_and_grad)`` of ``<out, c>`` w.r.t. the lora tree through ``lora_apply(mode)`` (lazy: strict),
    compiled and run with warnings as errors; frozen and args are arguments (no constant folding of the base).
    Returns ``(compiled, out, grads)``."""
    fam, cfg, frozen, lora = _setup(name)
    run = jlora.lora_apply(fam.apply, cfg, mode, **({"strict": True} if mode == "lazy" else {}))
    c = _cotangent(np.asarray(fam.own))

    def loss(lora: Any, frozen: Any, *args: Any) -> tuple[jax.Array, Any]:
        out = run(frozen, lora, *args)
        return jnp.sum(out * c), out

    with _no_warnings():
        exe = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(lora, frozen, *fam.args).compile()
        (_, out), grads = exe(lora, frozen, *fam.args)
    return exe, out, grads


@pytest.mark.parametrize("name", NAMES)
def test_builder_is_the_package_forward(name: str) -> None:
    """``apply(params, *args)`` (what the reference runs) == the package's own forward pass."""
    fam = _family(name)
    assert _rel(_jit_apply(name)(fam.params, *fam.args), fam.own) < 1e-5
    for p in EXPECT[name]:
        assert any(re.fullmatch(t, p) for t in fam.targets), p
        assert p in rm.flat(fam.params), (p, list(rm.flat(fam.params)))


@pytest.mark.parametrize("name", NAMES)
def test_factor_shapes_by_role(name: str) -> None:
    """A = stack + in + (r,), B = stack + (r,) + out, as written in EXPECT (depthwise: any 2+-axis pair)."""
    fam, _, _, lora = _setup(name)
    factors = _factors(lora)
    assert sorted(factors) == sorted(EXPECT[name])
    for p, exp in EXPECT[name].items():
        got = (tuple(factors[p]["A"].shape), tuple(factors[p]["B"].shape))
        if exp.a is None:
            assert min(map(len, got)) >= 2, (p, got)
        else:
            assert got == (exp.a, exp.b), (p, "A, B", got, "expected", (exp.a, exp.b))


@pytest.mark.parametrize("name", NAMES)
def test_merge_is_w_plus_float64_delta(name: str) -> None:
    """``jlora.merge`` == W + the float64 delta of EXPECT's einsum; every other leaf untouched."""
    fam, merged = _setup(name)[0], _merged(name)
    w0, want = rm.flat(fam.params), _reference_kernels(name)
    for p, x in merged.items():
        if p not in want:
            assert np.array_equal(np.asarray(x), np.asarray(w0[p])), p  # non-targets untouched
        elif EXPECT[name][p].spec is None:
            assert _rel(np.asarray(x) - np.asarray(w0[p]), np.asarray(w0[p])) > 1e-3, p  # a real delta
        else:
            assert _rel(x, want[p]) < 1e-5, p
            assert _rel(want[p], w0[p]) > 1e-2, p  # the delta is not negligible


@functools.cache
def _reference_output(name: str) -> np.ndarray:
    fam = _setup(name)[0]
    return np.asarray(_jit_apply(name)(rm.replace(fam.params, _reference_kernels(name)), *fam.args))


@pytest.mark.parametrize("name", NAMES)
def test_merged_mode_matches_reference(name: str) -> None:
    """``lora_apply(mode='merged')`` == ``apply`` on the float64 W + delta kernels."""
    _, out, _ = _compiled(name, "merged")
    assert _rel(out, _reference_output(name)) < 1e-5
    assert _rel(out, _setup(name)[0].own) > 1e-3  # the adapter changes the output


@pytest.mark.parametrize("name", NAMES)
def test_lazy_strict_matches_reference(name: str) -> None:
    """Lazy output == the float64-delta reference; lazy gradients == merged mode's (whose forward pass the
    reference checks, test_merged_mode_matches_reference)."""
    _, out, grads = _compiled(name, "lazy")
    assert _rel(out, _reference_output(name)) < 1e-5
    got, want = _factors(grads), _factors(_compiled(name, "merged")[2])
    assert sorted(got) == sorted(want)
    errors = {f"{p}/{role}": _rel(got[p][role], want[p][role]) for p in got for role in ("A", "B")}
    bad = {p: e for p, e in errors.items() if not e < 1e-4}
    assert not bad, f"lazy gradients vs merged mode, relative error: {bad}"


def _flops(exe: Any) -> float:
    cost = exe.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.mark.parametrize("name", FLOPS)
def test_lazy_flops_below_merged(name: str) -> None:
    """XLA's FLOP count of the compiled lazy ``value_and_grad``: no full-size delta or kernel gradient."""
    lazy, merged = _flops(_compiled(name, "lazy")[0]), _flops(_compiled(name, "merged")[0])
    assert lazy < 0.75 * merged, f"lazy value_and_grad {lazy:.3g} FLOPs vs merged {merged:.3g}"
