"""Per-kind shapes, inits and delta maths: one rule, ``kernel = stack + in + out``.

A kernel is a linear map from its input axes to its output axes. LoRA factors it through
rank r: ``A`` has shape ``stack + in + (r,)``, ``B`` has ``stack + (r,) + out`` and the update
``delta = s * tensordot(A, B)`` has the kernel's shape. Only the split point (how many leading
axes are stacked layers, how many are inputs) differs between kinds, and :func:`read_splits`
reads it from how the model uses each kernel in a jaxpr.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

KINDS = ("dense", "embed", "conv")


@dataclasses.dataclass(frozen=True)
class Split:
    """How a kernel factors: ``kind`` and the counts of stacked and input axes.

    >>> Split("dense", n_stack=0, n_in=2).out_axes((4, 2, 16, 8))
    (2, 3)
    """

    kind: str
    n_stack: int
    n_in: int

    def out_axes(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The positions of the output axes in a kernel of ``shape``."""
        return tuple(range(self.n_stack + self.n_in, len(shape)))


@dataclasses.dataclass(frozen=True)
class Factored:
    """The static description of one adapted kernel, read from the shapes of its factors.

    Attributes:
      path: the kernel's canonical path.
      n_stack: leading stacked (layer) axes, shared by kernel, A and B.
      n_in: input axes of the kernel (after the stack axes); the rest are output axes.
      rank: r.
      scale: s (alpha/r or alpha/sqrt(r)).
      groups: enabled groups of a fused kernel's last axis, or None.
      kernel_shape: the frozen kernel's shape.
      dora: the lora tree also holds a DoRA magnitude ``'m'`` (shape ``stack + out``) for it.

    >>> Factored("params/o/kernel", 0, 2, 8, 2.0, None, (8, 64, 512)).n_out
    1
    """

    path: str
    n_stack: int
    n_in: int
    rank: int
    scale: float
    groups: tuple[bool, ...] | None
    kernel_shape: tuple[int, ...]
    dora: bool = False

    @property
    def n_out(self) -> int:
        """The number of output axes."""
        return len(self.kernel_shape) - self.n_stack - self.n_in


def factor_shapes(shape: Sequence[int], split: Split, rank: int, groups: tuple[bool, ...] | None = None):
    """The shapes of A and B for a kernel of ``shape``.

    >>> factor_shapes((10, 384, 384), Split("dense", 1, 1), 8)
    ((10, 384, 8), (10, 8, 384))
    >>> factor_shapes((64, 96), Split("dense", 0, 1), 4, groups=(True, False, True))
    ((64, 8), (2, 4, 32))
    """
    shape = tuple(shape)
    stack, rest = shape[: split.n_stack], shape[split.n_stack :]
    ins, outs = rest[: split.n_in], rest[split.n_in :]
    if groups is None:
        return stack + ins + (rank,), stack + (rank,) + outs
    n_groups, enabled = len(groups), sum(groups)
    return stack + ins + (enabled * rank,), stack + (enabled, rank) + outs[:-1] + (outs[-1] // n_groups,)


def max_rank(shape: Sequence[int], split: Split, groups: tuple[bool, ...] | None = None) -> int:
    """The largest meaningful rank: min(prod(in), prod(out)) (per group for fused kernels)."""
    rest = tuple(shape)[split.n_stack :]
    n_in = math.prod(rest[: split.n_in])
    n_out = math.prod(rest[split.n_in :])
    if groups is not None:
        n_out //= len(groups)
    return min(n_in, n_out)


def init_factors(key: jax.Array, shape: Sequence[int], split: Split, rank: int, init: str, dtype: Any,
                 groups: tuple[bool, ...] | None = None) -> tuple[jax.Array, jax.Array]:
    """A and B at init, so that ``tensordot(A, B) == 0`` and the model output is unchanged.

    Dense and conv: A kaiming-uniform (PEFT's ``a=sqrt(5)``: bound ``1/sqrt(fan_in)``) or gaussian
    (std ``1/r``), B zero. Embedding: A zero, B standard normal (PEFT and loralib).

    >>> A, B = init_factors(jax.random.key(0), (6, 4), Split("dense", 0, 1), 2, "kaiming", jnp.float32)
    >>> A.shape, B.shape, float(abs(B).sum())
    ((6, 2), (2, 4), 0.0)
    """
    a_shape, b_shape = factor_shapes(shape, split, rank, groups)
    if split.kind == "embed":
        return jnp.zeros(a_shape, dtype), jax.random.normal(key, b_shape, dtype)
    fan_in = math.prod(tuple(shape)[split.n_stack : split.n_stack + split.n_in])
    if init == "gaussian":
        a = jax.random.normal(key, a_shape, dtype) * (1.0 / rank)
    else:
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    return a.astype(dtype), jnp.zeros(b_shape, dtype)


def factors_delta(A: jax.Array, B: jax.Array, f: Factored) -> jax.Array:
    """The full-size update ``s * A ⊗ B`` in float32, with the kernel's shape.

    >>> f = Factored("k", 0, 1, 2, 0.5, None, (3, 4))
    >>> factors_delta(jnp.ones((3, 2)), jnp.ones((2, 4)), f)[0, 0]
    Array(1., dtype=float32)
    """
    shape = f.kernel_shape
    stack = shape[: f.n_stack]
    n_in = math.prod(shape[f.n_stack : f.n_stack + f.n_in])
    s = len(stack)
    a = A.astype(jnp.float32).reshape(stack + (n_in, A.shape[-1]))
    hi = jax.lax.Precision.HIGHEST
    if f.groups is None:
        b = B.astype(jnp.float32).reshape(stack + (f.rank, -1))
        d = jnp.matmul(a, b, precision=hi)
        return (f.scale * d).reshape(shape)
    n_groups = len(f.groups)
    enabled = sum(f.groups)
    a = a.reshape(stack + (n_in, enabled, f.rank))
    b = B.astype(jnp.float32).reshape(stack + (enabled, f.rank, -1, shape[-1] // n_groups))
    sub = "".join(chr(ord("m") + i) for i in range(s))
    d = jnp.einsum(f"{sub}ier,{sub}erog->{sub}ioeg", a, b, precision=hi)
    zeros = jnp.zeros_like(d[..., 0, :])
    parts, e = [], 0
    for on in f.groups:
        parts.append(d[..., e, :] if on else zeros)
        e += on
    full = jnp.stack(parts, axis=-2)  # stack + (in, out_rest, G, out_g)
    return (f.scale * full).reshape(shape)


# --- reading the split from a trace -------------------------------------------------------------

_PASS_THROUGH = {"convert_element_type", "copy", "copy_p", "optimization_barrier", "reduce_precision"}


def _sub_jaxprs(eqn: Any) -> list[Any]:
    out = []
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            j = getattr(v, "jaxpr", v)
            if hasattr(j, "eqns") and hasattr(j, "invars"):
                out.append(j)
    return out


def _uses(jaxpr: Any, var: Any, n_stack: int, found: list[tuple[Split | str, int]]) -> None:
    """Collects how ``var`` is consumed: a Split per recognised use, or the primitive name."""
    for eqn in jaxpr.eqns:
        positions = [i for i, v in enumerate(eqn.invars) if v is var]
        if not positions:
            continue
        name = eqn.primitive.name
        ndim = len(var.aval.shape)
        if name in _PASS_THROUGH:
            for out in eqn.outvars:
                _uses(jaxpr, out, n_stack, found)
        elif name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            for pos in positions:
                contract, batch = (lc, lb) if pos == 0 else (rc, rb)
                nb = len(batch)
                if tuple(batch) == tuple(range(nb)) and tuple(contract) == tuple(range(nb, nb + len(contract))):
                    found.append((Split("dense", n_stack + nb, len(contract)), 0))
                elif tuple(batch) == tuple(range(nb)) and tuple(contract) == tuple(range(ndim - len(contract), ndim)):
                    # contracts the trailing axes (x @ W.T, a tied embedding's attend): the
                    # leading axes are the inputs of the factorisation.
                    found.append((Split("dense", n_stack + nb, ndim - nb - len(contract)), 1))
                else:
                    found.append((f"dot_general contracting axes {tuple(contract)} batch {tuple(batch)}", 0))
        elif name == "conv_general_dilated" and positions == [1]:
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
            if spec[0] == ndim - 1 and spec[1] == ndim - 2 and tuple(spec[2:]) == tuple(range(ndim - 2)):
                found.append((Split("conv", n_stack, ndim - 1), 0))
            else:
                found.append((f"conv_general_dilated with kernel layout {spec}", 0))
        elif name == "gather" and positions == [0]:
            dn = eqn.params["dimension_numbers"]
            if tuple(dn.collapsed_slice_dims) == (0,) and tuple(dn.start_index_map) == (0,):
                found.append((Split("embed", n_stack, 1), 0))
            else:
                found.append(("gather", 0))
        elif name == "scan":
            body = eqn.params["jaxpr"].jaxpr
            n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
            for pos in positions:
                extra = 1 if pos >= n_consts + n_carry else 0
                _uses(body, body.invars[pos], n_stack + extra, found)
        elif name == "cond":
            for branch in eqn.params["branches"]:
                for pos in positions:
                    if pos > 0:
                        _uses(branch.jaxpr, branch.jaxpr.invars[pos - 1], n_stack, found)
        elif name == "while":
            cn = eqn.params["cond_nconsts"]
            body = eqn.params["body_jaxpr"].jaxpr
            for pos in positions:
                if pos >= cn:
                    _uses(body, body.invars[pos - cn], n_stack, found)
        else:
            subs = [j for j in _sub_jaxprs(eqn) if len(j.invars) == len(eqn.invars)]
            if subs:
                for pos in positions:
                    _uses(subs[0], subs[0].invars[pos], n_stack, found)
            else:
                found.append((name, 0))


def read_splits(apply_fn: Callable[..., Any], params: Any, args: Sequence[Any],
                paths: Sequence[str], flat_paths: Sequence[str]) -> dict[str, Split | str]:
    """Traces ``apply_fn(params, *args)`` abstractly (no FLOPs) and reads each target's split.

    Returns, per path in ``paths``, the :class:`Split` its uses agree on, or a string describing
    why none could be read (no use, an unknown use, uses that disagree).
    """
    closed = jax.make_jaxpr(apply_fn)(params, *args)
    jaxpr = closed.jaxpr
    index = {p: i for i, p in enumerate(flat_paths)}
    out: dict[str, Split | str] = {}
    for path in paths:
        var = jaxpr.invars[index[path]]
        found: list[tuple[Split | str, int]] = []
        _uses(jaxpr, var, 0, found)
        splits = {s for s, _ in found if isinstance(s, Split)}
        unknown = [s for s, _ in found if isinstance(s, str)]
        kinds = {s.kind for s in splits}
        if "embed" in kinds:  # a table both gathered and attended (tied head) is an embedding
            splits = {s for s in splits if s.kind == "embed"}
        if not found:
            out[path] = "the model never uses it"
        elif unknown:
            out[path] = f"it is used by {unknown[0]}"
        elif len(splits) > 1:
            out[path] = f"its uses disagree on the split: {sorted(map(str, splits))}"
        else:
            out[path] = splits.pop()
    return out


def split_without_trace(path: str, shape: Sequence[int], n_stack: int | None, n_in: int | None) -> Split | str:
    """The split of a kernel that is unambiguous without a trace, or why it is ambiguous."""
    name = path.rsplit("/", 1)[-1]
    stack = n_stack or 0
    kind = "embed" if name == "embedding" else "dense"
    if n_in is not None:
        return Split(kind, stack, n_in)
    if len(shape) - stack == 2:
        return Split(kind, stack, 1)
    return (f"a {len(shape)}-D kernel (shape {tuple(shape)}) has no unambiguous input/output split "
            "without a trace")


def check_split(path: str, shape: Sequence[int], split: Split) -> None:
    """Raises if the split does not leave at least one input and one output axis."""
    if split.n_in < 1 or split.n_stack + split.n_in >= len(shape):
        raise ValueError(
            f"kernel {path!r} of shape {tuple(shape)}: split with {split.n_stack} stacked and {split.n_in} "
            "input axes leaves no input or no output axis; fix the LoraConfig.axes/stack rule for it"
        )
