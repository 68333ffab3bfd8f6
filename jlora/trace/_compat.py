"""The jaxpr equation parameters that changed between JAX releases, read in one place.

jlora's walkers (:mod:`jlora.trace._analysis` reads roles, :mod:`jlora.trace._lazy` rewrites, :mod:`jlora.trace._rows`
runs per-row adapters) open the sub-jaxprs of higher-order equations (``scan``, ``cond``, ``while``,
``jit``/``pjit``/``closed_call``, ``custom_jvp_call``/``custom_vjp_call``, ``remat``) and split their
operands. They read those parameters only through this module, so a JAX release that changes them
is one edit here, not version checks scattered over the walkers. What changed (jax 0.10.2 and 0.12.1
tested; the 0.11.2 source has the 0.12 forms):

- Sub-jaxpr parameters (``scan``'s ``jaxpr``, ``cond``'s ``branches``, ``while``'s ``cond_jaxpr``/
  ``body_jaxpr``, ``jit``'s ``jaxpr``, ``custom_*``'s ``call_jaxpr``): in jax 0.10 a ``ClosedJaxpr``
  (``.jaxpr`` open, ``.consts``); from 0.11 a ``Jaxpr`` that carries its consts (``.consts`` bound to the
  leading ``.constvars``; ``ClosedJaxpr`` is an alias of ``Jaxpr`` and ``.jaxpr`` returns itself).
  ``remat``'s ``jaxpr`` is an open ``Jaxpr`` in both. :func:`body` opens all of them.
- ``scan``'s operand split: in 0.10 the ints ``num_consts`` and ``num_carry``; from 0.11 ``ft_in``, a
  flat tree packing (consts, carry, xs) (and ``ft_out`` packing (carry, ys)). :func:`scan_split`.
- ``while``'s ``cond_nconsts``/``body_nconsts`` and the call parameter names (``jaxpr`` for
  ``jit``/``pjit``/``remat``, ``call_jaxpr`` for ``custom_jvp_call``/``custom_vjp_call``) are unchanged;
  they are read here too, so every higher-order parameter read has one home.

>>> import jax, jax.numpy as jnp
>>> jp = jax.make_jaxpr(lambda w, c, xs: jax.lax.scan(lambda c, x: (c @ w, x), c, xs))(
...     jnp.eye(2), jnp.ones(2), jnp.ones((3, 2)))
>>> eqn = jp.jaxpr.eqns[0]
>>> scan_split(eqn.params), len(body(eqn.params["jaxpr"]).jaxpr.invars)
((1, 1), 3)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["Body", "body", "call_body", "cond_branches", "scan_split", "while_split"]


class Body(NamedTuple):
    """An opened sub-jaxpr: ``jaxpr`` (``.constvars``, ``.invars``, ``.eqns``, ``.outvars``) and the
    values of its constvars, ``consts``."""

    jaxpr: Any
    consts: list[Any]


def body(value: Any) -> Body:
    """Opens one sub-jaxpr parameter value, in any of the forms above.

    >>> import jax, jax.numpy as jnp
    >>> jp = jax.make_jaxpr(lambda x: jax.lax.cond(x[0] > 0, jnp.sin, jnp.cos, x))(jnp.ones(2))
    >>> [len(body(b).jaxpr.eqns) for b in jp.jaxpr.eqns[-1].params["branches"]]
    [1, 1]
    """
    jaxpr = getattr(value, "jaxpr", value)  # ClosedJaxpr -> Jaxpr; jax 0.12's Jaxpr.jaxpr is itself
    if not (hasattr(jaxpr, "eqns") and hasattr(jaxpr, "invars") and hasattr(jaxpr, "constvars")):
        raise TypeError(f"expected a jaxpr (ClosedJaxpr or Jaxpr) as a sub-jaxpr parameter, got "
                        f"{type(value).__name__}; fix: this JAX release changed its jaxpr form — update "
                        "jlora/jaxpr_compat.py")
    consts = list(getattr(value, "consts", ()))
    if len(consts) != len(jaxpr.constvars):
        raise TypeError(f"sub-jaxpr has {len(jaxpr.constvars)} constvars but {len(consts)} consts attached; "
                        "fix: this JAX release changed its jaxpr form — update jlora/jaxpr_compat.py")
    return Body(jaxpr, consts)


def call_body(params: Mapping[str, Any]) -> Body:
    """The inner jaxpr of a call-like equation: ``jit``/``pjit``/``closed_call``/``core_call``
    (``jaxpr``), ``custom_jvp_call``/``custom_vjp_call`` (``call_jaxpr``), ``remat`` (``jaxpr``).

    >>> import jax, jax.numpy as jnp
    >>> jp = jax.make_jaxpr(lambda x: jax.jit(jnp.sin)(x))(jnp.ones(2))
    >>> call_body(jp.jaxpr.eqns[0].params).jaxpr.eqns[0].primitive.name
    'sin'
    """
    for key in ("jaxpr", "call_jaxpr"):
        if key in params:
            return body(params[key])
    raise TypeError(f"call-like equation without a 'jaxpr' or 'call_jaxpr' parameter (got {sorted(params)}); "
                    "fix: this JAX release renamed it — update jlora/jaxpr_compat.py")


def cond_branches(params: Mapping[str, Any]) -> list[Body]:
    """The opened branches of a ``cond`` equation (its operands are the index, then the branches' inputs).

    >>> import jax, jax.numpy as jnp
    >>> jp = jax.make_jaxpr(lambda x: jax.lax.cond(x[0] > 0, jnp.sin, jnp.cos, x))(jnp.ones(2))
    >>> len(cond_branches(jp.jaxpr.eqns[-1].params))
    2
    """
    return [body(b) for b in params["branches"]]


def scan_split(params: Mapping[str, Any]) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a ``scan`` equation: its operands are consts, then carry, then xs;
    its body's outputs are the carry, then the ys.

    >>> import jax, jax.numpy as jnp
    >>> jp = jax.make_jaxpr(lambda c, xs: jax.lax.scan(lambda c, x: (c + x, c), c, xs))(
    ...     jnp.ones(2), jnp.ones((3, 2)))
    >>> scan_split(jp.jaxpr.eqns[0].params)
    (0, 1)
    """
    if "num_consts" in params and "num_carry" in params:  # jax 0.10
        return int(params["num_consts"]), int(params["num_carry"])
    if "ft_in" in params:  # jax >= 0.11: a flat tree packing (consts, carry, xs)
        parts = params["ft_in"].unpack()
        if len(parts) == 3:
            return len(parts[0]), len(parts[1])
    raise TypeError(f"scan equation without num_consts/num_carry or a 3-part ft_in (got parameters "
                    f"{sorted(params)}); fix: this JAX release changed scan — update jlora/jaxpr_compat.py")


def while_split(params: Mapping[str, Any]) -> tuple[int, int]:
    """``(cond_nconsts, body_nconsts)`` of a ``while`` equation: its operands are the cond's consts,
    the body's consts, then the carry.

    >>> import jax, jax.numpy as jnp
    >>> jp = jax.make_jaxpr(lambda n, x: jax.lax.while_loop(lambda c: c[0] < n, lambda c: c * 2, x))(
    ...     3.0, jnp.ones(2))
    >>> while_split(jp.jaxpr.eqns[0].params)
    (1, 0)
    """
    return int(params["cond_nconsts"]), int(params["body_nconsts"])
