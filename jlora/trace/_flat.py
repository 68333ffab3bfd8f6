"""Row-major values of the lazy rewrite: a dense LoRA output kept as a 2-D ``(tokens, features)`` array.

Why. A plain dense use ``y = dot(x, W0) + (x·A)·(s·B)`` on a ``(batch, seq, in)`` input is two 2-D
products whose outputs are reshaped back to ``(batch, seq, out)`` and added. XLA's ReshapeMover sinks
both reshapes below the add, the add is left with one user and is fused into *every* consumer of
``y`` (including the backward-pass fusions of silu/GELU), so the two product outputs stay alive
until the backward pass instead of their sum: at Llama-2-7B scale 1.2 GiB more scratch than the
floor (benchmarks/results/scale_analysis.md). A chain that stays 2-D has no reshape to sink.

So the lazy mode of the walker (:mod:`jlora.trace._lazy`) keeps the output of a plain dense LoRA use as a :class:`Flat`
value (the 2-D array plus the shape the model expects); elementwise equations whose array inputs
are Flat values of one shape, scalars, or arrays of that shape (or broadcasts along the tokens or
the features) run on the 2-D arrays, as does a plain dense ``dot_general`` reading a Flat input;
every other use reads ``reshape(rows, shape)``.

>>> import jax.numpy as jnp
>>> f = Flat(jnp.ones((6, 2)), (2, 3, 2), low=jnp.ones((6, 2)))
>>> f.full().shape, float(f.full()[1, 2, 0])
((2, 3, 2), 2.0)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jlora.trace._value import bind

__all__ = ["Flat", "add", "dense", "elementwise", "full", "is_flat", "on_rows", "rows"]

ELEMENTWISE = frozenset({  # lax's elementwise primitives (same-shape operands, one output element per input element)
    "add", "add_any", "sub", "mul", "div", "rem", "pow", "integer_pow", "max", "min", "neg", "sign", "abs", "square",
    "floor", "ceil", "round", "is_finite", "nextafter", "clamp", "select_n", "convert_element_type", "reduce_precision",
    "exp", "exp2", "log", "log1p", "expm1", "logistic", "tanh", "sqrt", "rsqrt", "cbrt",
    "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh",
    "erf", "erfc", "erf_inv", "lgamma", "digamma",
    "ge", "gt", "le", "lt", "eq", "ne", "and", "or", "xor", "not", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "stop_gradient", "copy", "copy_p"})


def add(base: jax.Array, low: jax.Array) -> jax.Array:
    """``base + low`` in the promoted dtype, cast once to the base output's dtype (PEFT's policy).

    >>> add(jnp.ones(2, jnp.bfloat16), jnp.full(2, 0.5)).dtype
    dtype(bfloat16)
    """
    if base.dtype == low.dtype:
        return base + low
    acc = jnp.promote_types(base.dtype, low.dtype)
    return (base.astype(acc) + low.astype(acc)).astype(base.dtype)


@dataclasses.dataclass(frozen=True)
class Flat:
    """A ``(tokens, n)`` array standing for ``add(v2, low).reshape(shape)`` (``shape[:-1]`` -> tokens).

    ``low`` (or None) is a LoRA branch output not yet added: a following bias add goes to ``v2``
    first, so the program reads ``(x·W0 + b) + low`` (XLA fuses the bias into the dot's output;
    the LoRA add then materialises once).

    >>> Flat(jnp.zeros((4, 3)), (2, 2, 3)).full().shape
    (2, 2, 3)
    """

    v2: Any
    shape: tuple[int, ...]
    low: Any = None

    def resolved(self) -> jax.Array:
        """The 2-D value ``(tokens, n)``."""
        return self.v2 if self.low is None else add(self.v2, self.low)

    def full(self) -> jax.Array:
        """The value in the model's shape."""
        return self.resolved().reshape(self.shape)


def is_flat(x: Any) -> bool:
    """True for a :class:`Flat` value.

    >>> is_flat(Flat(jnp.zeros((2, 3)), (2, 3))), is_flat(jnp.zeros((2, 3)))
    (True, False)
    """
    return isinstance(x, Flat)


def full(x: Any) -> Any:
    """``x`` in the model's shape (a Flat value reshaped; anything else as is).

    >>> full(3)
    3
    """
    return x.full() if isinstance(x, Flat) else x


def rows(x: Any) -> jax.Array:
    """``x`` as ``(tokens, features)``: a Flat value's 2-D array, or ``x`` reshaped.

    >>> rows(jnp.zeros((2, 3, 4))).shape
    (6, 4)
    """
    return x.resolved() if isinstance(x, Flat) else jnp.reshape(x, (-1, jnp.shape(x)[-1]))


def _as_rows(x: Any, shape: tuple[int, ...], tokens: int) -> Any:
    """A non-Flat input of an elementwise equation on Flat values of ``shape``, in 2-D; None if it does not fit."""
    s = tuple(jnp.shape(x))
    if not s:
        return x
    if s == shape:
        return jnp.reshape(x, (tokens, shape[-1]))
    if len(s) == len(shape) and all(d == 1 for d in s[:-1]):  # (1, .., 1, n | 1): along the features
        return jnp.reshape(x, (1, s[-1]))
    if s == shape[:-1] + (1,):  # one value per token
        return jnp.reshape(x, (tokens, 1))
    return None


def elementwise(eqn: Any, invals: list[Any]) -> list[Any] | None:
    """An elementwise equation on 2-D arrays when every array input fits (Flat outputs); else None.

    A bias add on a Flat value with a pending ``low`` goes to its ``v2`` (the low-rank add stays
    pending).

    >>> eqn = jax.make_jaxpr(lambda a, b: a + b)(jnp.ones((2, 2, 3)), jnp.ones((1, 1, 3))).eqns[0]
    >>> (out,) = elementwise(eqn, [Flat(jnp.ones((4, 3)), (2, 2, 3), low=jnp.ones((4, 3))), jnp.ones((1, 1, 3))])
    >>> out.v2.shape, float(out.full()[1, 1, 2])
    ((4, 3), 3.0)
    """
    if eqn.primitive.name not in ELEMENTWISE:
        return None
    flats = [x for x in invals if isinstance(x, Flat)]
    shape = flats[0].shape
    if any(f.shape != shape for f in flats) or any(tuple(o.aval.shape) != shape for o in eqn.outvars):
        return None
    tokens = math.prod(shape[:-1])
    if eqn.primitive.name == "add" and len(flats) == 1 and flats[0].low is not None:
        f = flats[0]
        other = invals[1] if invals[0] is f else invals[0]
        s = tuple(jnp.shape(other))
        if len(s) == len(shape) and all(d == 1 for d in s[:-1]):  # a bias along the features
            v2 = bind(eqn, [f.v2, jnp.reshape(other, (1, s[-1]))] if invals[0] is f
                      else [jnp.reshape(other, (1, s[-1])), f.v2])[0]
            return [Flat(v2, shape, f.low)]
    args = [x.resolved() if isinstance(x, Flat) else _as_rows(x, shape, tokens) for x in invals]
    if any(a is None for a in args):
        return None
    return [Flat(o, shape) for o in bind(eqn, args)]


def dense(eqn: Any, invals: list[Any]) -> list[Any] | None:
    """A ``dot_general`` of a Flat input contracting its last axis with one axis of a 2-D array
    (an un-adapted dense kernel): run on the rows, Flat output; else None.

    >>> eqn = jax.make_jaxpr(lambda x, w: x @ w)(jnp.ones((2, 2, 3)), jnp.ones((3, 5))).eqns[0]
    >>> (out,) = dense(eqn, [Flat(jnp.ones((4, 3)), (2, 2, 3)), jnp.ones((3, 5))])
    >>> out.v2.shape, out.shape
    ((4, 5), (2, 2, 5))
    """
    x, w = invals
    if eqn.primitive.name != "dot_general" or not isinstance(x, Flat) or isinstance(w, Flat) or jnp.ndim(w) != 2:
        return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb or tuple(lc) != (len(x.shape) - 1,) or len(rc) != 1:
        return None
    out = bind(eqn, [x.resolved(), w], dimension_numbers=(((1,), tuple(rc)), ((), ())))[0]
    return [Flat(out, tuple(eqn.outvars[0].aval.shape))]


def on_rows(eqn: Any, invals: list[Any]) -> list[Any] | None:
    """``eqn`` on Flat inputs by the first rule that fits: a reshape (one reshape from the rows, not
    two), an elementwise equation, an un-adapted dense use; None when none does.

    >>> eqn = jax.make_jaxpr(lambda a: a.reshape(6))(jnp.ones((2, 3))).eqns[0]
    >>> on_rows(eqn, [Flat(jnp.arange(6.0).reshape(3, 2), (1, 2, 3))])[0].tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    """
    if eqn.primitive.name == "reshape" and len(invals) == 1 and eqn.params.get("dimensions") is None:
        return bind(eqn, [invals[0].resolved()])
    return elementwise(eqn, invals) or (dense(eqn, invals) if eqn.primitive.name == "dot_general" else None)
