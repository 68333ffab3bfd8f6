"""One adapted kernel's description (:class:`Factored`), its factors at init and its delta maths.

A kernel is a linear map from its input axes to its output axes (its :class:`~jlora.layout.Layout`
says which stored axis is which, and the factors' shapes: :meth:`~jlora.layout.Layout.factor_shapes`).
LoRA factors it through rank r: ``A`` has shape ``stack + in + (r,)``, ``B`` has ``stack + (r,) + out``
and ``delta = s * tensordot(A, B)`` is permuted back to the kernel's stored order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core.layout import Layout

__all__ = ["Factored", "canonical_delta", "factors_delta", "init_factors"]


@dataclasses.dataclass(frozen=True)
class Factored:
    """The static description of one adapted kernel.

    Attributes:
      path: the kernel's canonical path.
      layout: its :class:`~jlora.layout.Layout` (axis roles, stored shape).
      rank: r of A and B (per group for a grouped conv, per enabled group of a fused kernel).
      scale: s (alpha/r or alpha/sqrt(r), r the configured rank).
      dora: the lora tree also holds a DoRA magnitude ``'m'`` (shape ``stack + out``) for it.

    A fused kernel's enabled groups are its layout's (:attr:`fused`).

    >>> f = Factored("params/o/kernel", Layout((8, 64, 512), "iio"), 8, 2.0, None)
    >>> f.n_in, f.n_out, f.canonical_shape
    (2, 1, (8, 64, 512))
    """

    path: str
    layout: Layout
    rank: int
    scale: float
    dora: bool = False

    @property
    def fused(self) -> tuple[bool, ...] | None:
        """A fused kernel's enabled groups (``layout.fused``), or None."""
        return self.layout.fused

    @property
    def n_stack(self) -> int:
        """The number of stack axes."""
        return self.layout.n_stack

    @property
    def n_in(self) -> int:
        """The number of input axes."""
        return self.layout.n_in

    @property
    def n_out(self) -> int:
        """The number of output axes."""
        return self.layout.n_out

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The frozen kernel's stored shape."""
        return self.layout.shape

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        """``stack + in + out``."""
        return self.layout.canonical_shape


def init_factors(key: jax.Array, layout: Layout, rank: int, init: str, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """A and B at init, so that ``tensordot(A, B) == 0`` and the model output is unchanged.

    Dense and conv: A kaiming-uniform (PEFT's ``a=sqrt(5)``: bound ``1/sqrt(fan_in)``, fan-in from
    the input axes) or gaussian (std ``1/r``), B zero. Embedding: A zero, B standard normal (PEFT
    and loralib).

    >>> A, B = init_factors(jax.random.key(0), Layout((4, 6), "oi"), 2, "kaiming", jnp.float32)
    >>> A.shape, B.shape, float(abs(B).sum())
    ((6, 2), (2, 4), 0.0)
    """
    a_shape, b_shape = layout.factor_shapes(rank)
    if layout.kind == "embed":
        return jnp.zeros(a_shape, dtype), jax.random.normal(key, b_shape, dtype)
    if init == "gaussian":
        a = jax.random.normal(key, a_shape, dtype) * (1.0 / rank)
    else:
        bound = 1.0 / math.sqrt(layout.fan_in)
        a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    return a.astype(dtype), jnp.zeros(b_shape, dtype)


def canonical_delta(A: jax.Array, B: jax.Array, f: Factored) -> jax.Array:
    """``s * A ⊗ B`` in float32, in the canonical order ``stack + in + out``.

    >>> f = Factored("k", Layout((3, 4), "io"), 2, 0.5)
    >>> canonical_delta(jnp.ones((3, 2)), jnp.ones((2, 4)), f)[0, 0]
    Array(1., dtype=float32)
    """
    shape = f.canonical_shape
    ns = f.n_stack
    stack = shape[:ns]
    n_in = math.prod(shape[ns : ns + f.n_in])
    a = A.astype(jnp.float32).reshape(stack + (n_in, A.shape[-1]))
    hi = jax.lax.Precision.HIGHEST
    if f.fused is None:
        b = B.astype(jnp.float32).reshape(stack + (A.shape[-1], -1))
        d = jnp.matmul(a, b, precision=hi)
        return (f.scale * d).reshape(shape)
    n_groups = len(f.fused)
    enabled = sum(f.fused)
    a = a.reshape(stack + (n_in, enabled, f.rank))
    b = B.astype(jnp.float32).reshape(stack + (enabled, f.rank, -1, shape[-1] // n_groups))
    sub = "".join(chr(ord("m") + i) for i in range(ns))
    d = jnp.einsum(f"{sub}ier,{sub}erog->{sub}ioeg", a, b, precision=hi)
    zeros = jnp.zeros_like(d[..., 0, :])
    parts, e = [], 0
    for on in f.fused:
        parts.append(d[..., e, :] if on else zeros)
        e += on
    full = jnp.stack(parts, axis=-2)  # stack + (in, out_rest, G, out_g)
    return (f.scale * full).reshape(shape)


def factors_delta(A: jax.Array, B: jax.Array, f: Factored) -> jax.Array:
    """The full-size update ``s * A ⊗ B`` in float32, in the kernel's stored order and shape.

    >>> f = Factored("k", Layout((4, 3), "oi"), 1, 1.0)
    >>> factors_delta(jnp.arange(3.0)[:, None], jnp.ones((1, 4)), f)[0].tolist()
    [0.0, 1.0, 2.0]
    """
    return f.layout.from_canonical(canonical_delta(A, B, f))
