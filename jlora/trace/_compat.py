"""The jaxpr equation parameters that changed between JAX releases, read in one place.

jlora's walker (:mod:`jlora.trace._walker`, whose modes read roles, rewrite lazily and run per-row
adapters) opens the sub-jaxprs of higher-order equations (``scan``, ``cond``, ``while``,
``jit``/``pjit``/``closed_call``, ``custom_jvp_call``/``custom_vjp_call``, ``remat``, ``shard_map``) and
splits their operands. It reads those parameters only through this module, so a JAX release that
changes them is one edit here, not version checks scattered over the walker. What changed (jax 0.10.2 and 0.12.1
tested; the 0.11.2 source has the 0.12 forms):

- Sub-jaxpr parameters (``scan``'s ``jaxpr``, ``cond``'s ``branches``, ``while``'s ``cond_jaxpr``/
  ``body_jaxpr``, ``jit``'s ``jaxpr``, ``custom_*``'s ``call_jaxpr``): in jax 0.10 a ``ClosedJaxpr``
  (``.jaxpr`` open, ``.consts``); from 0.11 a ``Jaxpr`` that carries its consts (``.consts`` bound to the
  leading ``.constvars``; ``ClosedJaxpr`` is an alias of ``Jaxpr`` and ``.jaxpr`` returns itself).
  ``remat``'s ``jaxpr`` is an open ``Jaxpr`` in both. :func:`body` opens all of them.
- ``scan``'s operand split: in 0.10 the ints ``num_consts`` and ``num_carry``; from 0.11 ``ft_in``, a
  flat tree packing (consts, carry, xs) (and ``ft_out`` packing (carry, ys)). :func:`scan_split`.
- ``shard_map``'s parameters (``mesh``, ``in_specs``, ``out_specs``, ``check_vma`` — ``check_rep`` before —
  and the manual axes, ``newly_manual_axes`` — ``auto``, their complement, before): :func:`shard_map`.
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

import jax

__all__ = ["Body", "ShardMap", "body", "call_body", "cond_branches", "scan_split", "shard_map", "sharding_constraint_params",
           "varying", "while_split"]


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
                        "jlora/trace/_compat.py")
    consts = list(getattr(value, "consts", ()))
    if len(consts) != len(jaxpr.constvars):
        raise TypeError(f"sub-jaxpr has {len(jaxpr.constvars)} constvars but {len(consts)} consts attached; "
                        "fix: this JAX release changed its jaxpr form — update jlora/trace/_compat.py")
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
                    "fix: this JAX release renamed it — update jlora/trace/_compat.py")


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
                    f"{sorted(params)}); fix: this JAX release changed scan — update jlora/trace/_compat.py")


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


class ShardMap(NamedTuple):
    """A ``shard_map`` equation's parameters, as ``jax.shard_map`` takes them, and its opened body."""

    body: Body
    mesh: Any
    in_specs: tuple[Any, ...]
    out_specs: tuple[Any, ...]
    check_vma: bool
    axis_names: frozenset[Any]


def shard_map(params: Mapping[str, Any]) -> ShardMap:
    """The parameters of a ``shard_map`` equation (its body sees each operand's local shard).

    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("m",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> f = jax.shard_map(lambda x: 2 * x, mesh=mesh, in_specs=P("m"), out_specs=P("m"))
    >>> sm = shard_map(jax.make_jaxpr(f)(jnp.ones(2)).jaxpr.eqns[0].params)
    >>> sm.in_specs, sorted(sm.axis_names), sm.body.jaxpr.eqns[-1].primitive.name
    ((P('m',),), ['m'], 'mul')
    """
    mesh = params["mesh"]
    if "newly_manual_axes" in params:
        axes = frozenset(params["newly_manual_axes"])
    else:  # older releases: the mesh axes not left automatic
        axes = frozenset(mesh.axis_names) - frozenset(params.get("auto", ()))
    check = params["check_vma"] if "check_vma" in params else params.get("check_rep", True)
    return ShardMap(body(params["jaxpr"]), mesh, tuple(params["in_specs"]), tuple(params["out_specs"]),
                    bool(check), axes)


def varying(x: Any, axes: frozenset[Any]) -> Any:
    """``x`` (inside a ``shard_map`` body) cast to vary over the manual ``axes`` it does not vary over yet,
    so its cotangent is summed over them (jax >= 0.10: ``pcast``, the axes in ``manual_axis_type``;
    before: ``pvary`` and ``vma``); as it is where the release tracks neither."""
    aval = jax.typeof(x)
    if hasattr(aval, "manual_axis_type"):
        missing = tuple(sorted(set(axes) - set(aval.manual_axis_type.varying), key=str))
        return jax.lax.pcast(x, missing, to="varying") if missing else x
    if hasattr(aval, "vma") and hasattr(jax.lax, "pvary"):
        missing = tuple(sorted(set(axes) - set(aval.vma), key=str))
        return jax.lax.pvary(x, missing) if missing else x
    return x


def sharding_constraint_params(params: Mapping[str, Any], sharding: Any) -> dict[str, Any]:
    """The parameters that make a ``sharding_constraint`` equation (``params``) constrain to ``sharding``
    with every dimension constrained and no layout: jax 0.10 has ``unconstrained_dims`` and ``layout``,
    later releases only some of them.

    >>> sharding_constraint_params({"sharding": None, "layout": 1, "context_mesh": 2}, "s")
    {'sharding': 's', 'layout': None}
    """
    fresh = {"unconstrained_dims": frozenset(), "layout": None}
    return {"sharding": sharding, **{k: v for k, v in fresh.items() if k in params}}
