"""The one jaxpr walker: an environment, calls, ``scan``/``cond``/``while`` and the leaf <-> path map.

Every reading of a model's jaxpr in jlora is a :class:`Mode` run by :func:`run`: the roles reader
(:mod:`jlora.trace._analysis`, abstract: it walks each body once), the lazy LoRA rewrite
(:mod:`jlora.trace._lazy`) and the per-row adapters (:mod:`jlora.trace._rows`), both concrete: they
rebuild control flow with ``lax.scan``/``lax.switch``/``lax.while_loop``/``jax.checkpoint``.

A mode marks some values as *tracked* (a kernel it follows). An equation with no tracked input goes
to :meth:`Mode.plain`; one with a tracked input to the mode's rule for its primitive
(``{name: rule}``, ``rule(eqn, invals, mode) -> outputs | None``), and to :meth:`Mode.fallback`
when there is none or it returns None. Adding a primitive is one rule in one table. The
higher-order rules here (:data:`CALLS`, :data:`CONTROL`, :func:`shard_map`) serve every mode through
its hooks: how a tracked value is split into per-step ``xs`` of a scan (:meth:`Mode.scan_xs`), what
a tracked value in a loop carry means (:meth:`Mode.carried`), what a body may return
(:meth:`Mode.loop_out`), how a tracked value is sharded into a ``shard_map`` (:meth:`Mode.shard_specs`).

Which rule lives where: views that keep every axis (casts, copies, ``sharding_constraint``) are one
name in :data:`SAME_AXES`, read by every mode; the other views of a kernel (reshapes, transposes,
``rev``, slices, stack picks) in :mod:`jlora.trace._value` (lazy), :mod:`jlora.trace._analysis`
(roles) and :mod:`jlora.trace._rows`; the lazy consumers (``dot_general``, ``conv_general_dilated``,
``ragged_dot_general``, lookups) in :mod:`jlora.trace._rules`, the roles they imply in
:mod:`jlora.trace._uses`.

>>> jp = jax.make_jaxpr(lambda x: jax.jit(jnp.sin)(x) * 2)(jnp.ones(2))
>>> run(Mode(), jp.jaxpr, jp.consts, [jnp.zeros(2)])[0].tolist()
[0.0, 0.0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp  # noqa: F401  (the doctests)
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jlora.core import paths as jpaths
from jlora.trace import _compat as jaxpr_compat

__all__ = ["CALLS", "CONTROL", "SAME_AXES", "Mode", "Traced", "bind", "leaf_paths", "run", "shard_map", "trace_apply"]

Rule = Callable[[Any, list[Any], "Mode"], "list[Any] | None"]

#: Primitives that return their one input with every axis kept (dtype casts, copies, a sharding
#: annotation). Every mode reads them as a view that changes no axis role: a new primitive of this
#: kind is one name here. (The lazy mode also keeps the sharding on the factors: its own rule for
#: ``sharding_constraint`` in :mod:`jlora.trace._value`.)
SAME_AXES = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint"})


def bind(eqn: Any, invals: Sequence[Any], **overrides: Any) -> list[Any]:
    """Binds ``eqn``'s primitive on plain arrays ``invals`` with its params (``overrides`` replace some)."""
    params = eqn.primitive.get_bind_params(dict(eqn.params, **overrides))
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


class Mode:
    """What one walk does. The base mode tracks nothing and binds every equation (an evaluator)."""

    rules: Mapping[str, Rule] = {}
    abstract = False  # walks bodies once on values standing for arrays (no lax control flow is built)

    def tracked(self, x: Any) -> bool:
        """Whether ``x`` is a value this mode follows (a kernel)."""
        return False

    def prepare(self, jaxpr: Any, env: Mapping[Any, Any]) -> None:
        """Called once per jaxpr run, its inputs bound."""

    def plain(self, eqn: Any, invals: list[Any]) -> list[Any]:
        """An equation with no tracked input."""
        if self.abstract:
            return [None] * len(eqn.outvars)
        return bind(eqn, invals)

    def enter(self, eqn: Any, invals: list[Any], env: Mapping[Any, Any], jaxpr: Any) -> list[Any]:
        """The inputs an equation with a tracked input hands to its rule."""
        return invals

    def fallback(self, eqn: Any, invals: list[Any]) -> list[Any]:
        """A tracked input with no rule (or a rule that declined)."""
        raise NotImplementedError(eqn.primitive.name)

    def after(self, eqn: Any, outs: list[Any]) -> None:
        """Called with the outputs of every equation that had a tracked input."""

    def output(self, x: Any, keep: bool) -> Any:
        """A jaxpr output (``keep``: the jaxpr is an inlined call, its caller reads the value)."""
        return x

    # --- loops -------------------------------------------------------------------------------------

    def carried(self, eqn: Any, x: Any) -> Any:
        """A tracked value in a ``scan``/``while`` carry: concrete modes return None (the whole loop
        falls back) or raise; the abstract mode records it (the body sees an untracked value)."""
        return None

    def scan_xs(self, x: Any, length: int) -> Any:
        """A tracked ``xs`` of a scan. Concrete: ``(packed, rebuild)`` (``packed`` a pytree with a
        leading ``length`` axis, ``rebuild(one step of it)`` the body's value) or None (fall back);
        abstract: the body's value."""
        return None

    def loop_out(self, eqn: Any, x: Any) -> Any:
        """A value a scan body or cond branch returns."""
        return x

    def loop_keys(self, length: int) -> Any:
        """Per-iteration data of a scan (dropout keys), or None."""
        return None

    def child(self, key: Any) -> Mode:
        """The mode for one scan iteration given its :meth:`loop_keys` entry."""
        return self

    def shard_specs(self, x: Any, spec: Any) -> Any:
        """The ``shard_map`` in_specs of a tracked operand sharded by ``spec`` (a pytree of specs like
        ``x``), or None (fall back)."""
        return None


def _read(env: Mapping[Any, Any], v: Any) -> Any:
    return v.val if isinstance(v, jcore.Literal) else env.get(v)


def run(mode: Mode, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], keep: bool = False) -> list[Any]:
    """Evaluates ``jaxpr`` on ``args`` under ``mode``; returns its outputs (:meth:`Mode.output`)."""
    env: dict[Any, Any] = {}
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    mode.prepare(jaxpr, env)
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        if any(mode.tracked(x) for x in invals):
            invals = mode.enter(eqn, invals, env, jaxpr)
            rule = mode.rules.get(eqn.primitive.name)
            outs = rule(eqn, invals, mode) if rule is not None else None
            if outs is None:
                outs = mode.fallback(eqn, invals)
            mode.after(eqn, outs)
        else:
            outs = mode.plain(eqn, invals)
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [mode.output(_read(env, v), keep) for v in jaxpr.outvars]


# --- calls ---------------------------------------------------------------------------------------

def call(eqn: Any, invals: list[Any], mode: Mode) -> list[Any]:
    """``jit``/``pjit``/``closed_call``/``core_call``: the inner jaxpr, inlined."""
    inner = jaxpr_compat.call_body(eqn.params)
    return run(mode, inner.jaxpr, inner.consts, invals, keep=True)


def custom(eqn: Any, invals: list[Any], mode: Mode) -> list[Any]:
    """``custom_jvp_call``/``custom_vjp_call``: the primal jaxpr (the custom rule is lost where a
    tracked value enters; an equation without one is bound as it is)."""
    inner = jaxpr_compat.call_body(eqn.params)
    return run(mode, inner.jaxpr, inner.consts, invals)


def remat(eqn: Any, invals: list[Any], mode: Mode) -> list[Any]:
    """``remat``/``checkpoint``: re-wrapped with ``jax.checkpoint`` (same policy and ``prevent_cse``)."""
    inner, consts = jaxpr_compat.call_body(eqn.params)
    if mode.abstract:
        return run(mode, inner, consts, invals)

    def body(*vals: Any) -> list[Any]:
        return run(mode, inner, consts, vals)

    return list(jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True),
                               policy=eqn.params.get("policy"))(*invals))


CALLS: dict[str, Rule] = {"jit": call, "pjit": call, "closed_call": call, "core_call": call,
                          "custom_jvp_call": custom, "custom_vjp_call": custom, "custom_vjp_call_jaxpr": custom,
                          "remat2": remat, "remat": remat, "checkpoint": remat}


# --- control flow --------------------------------------------------------------------------------

def _carry(eqn: Any, carry: list[Any], mode: Mode) -> list[Any] | None:
    """A loop's carry after :meth:`Mode.carried` saw its tracked values: the abstract mode's values in
    their place; None in a concrete mode (the loop falls back, unless ``carried`` raised)."""
    out = list(carry)
    for k, c in enumerate(carry):
        if mode.tracked(c):
            out[k] = mode.carried(eqn, c)
            if not mode.abstract:
                return None
    return out


def scan(eqn: Any, invals: list[Any], mode: Mode) -> list[Any] | None:
    """``scan``: a tracked ``xs`` is split per step by :meth:`Mode.scan_xs`."""
    p = eqn.params
    nc, ncar = jaxpr_compat.scan_split(p)
    consts, carry, xs = invals[:nc], invals[nc : nc + ncar], invals[nc + ncar :]
    closed = jaxpr_compat.body(p["jaxpr"])
    carry = _carry(eqn, carry, mode)
    if carry is None:
        return None
    if mode.abstract:
        steps = [mode.scan_xs(x, p["length"]) if mode.tracked(x) else None for x in xs]
        outs = run(mode, closed.jaxpr, closed.consts, list(consts) + carry + steps)
        return [mode.loop_out(eqn, o) for o in outs]
    split = [mode.scan_xs(x, p["length"]) if mode.tracked(x) else (x, None) for x in xs]
    if any(s is None for s in split):
        return None
    keys = mode.loop_keys(p["length"])

    def body(c: list[Any], step: tuple[list[Any], Any]) -> tuple[list[Any], list[Any]]:
        packed, key = step
        xs_in = [x if s[1] is None else s[1](x) for x, s in zip(packed, split)]
        sub = mode.child(key) if key is not None else mode
        outs = [mode.loop_out(eqn, o) for o in run(sub, closed.jaxpr, closed.consts, list(consts) + list(c) + xs_in)]
        return outs[:ncar], outs[ncar:]

    c, ys = lax.scan(body, carry, ([s[0] for s in split], keys), length=p["length"], reverse=p["reverse"],
                     unroll=p["unroll"])
    return list(c) + list(ys)


def cond(eqn: Any, invals: list[Any], mode: Mode) -> list[Any]:
    """``cond``/``switch``: each branch run on the operands (abstract: once; concrete: ``lax.switch``)."""
    index, ops = invals[0], invals[1:]
    branches = jaxpr_compat.cond_branches(eqn.params)
    if mode.abstract:
        for br in branches:
            for o in run(mode, br.jaxpr, br.consts, ops):
                mode.loop_out(eqn, o)
        return [None] * len(eqn.outvars)
    fns = [lambda *o, br=br: [mode.loop_out(eqn, x) for x in run(mode, br.jaxpr, br.consts, o)] for br in branches]
    return list(lax.switch(index, fns, *ops))


def while_(eqn: Any, invals: list[Any], mode: Mode) -> list[Any] | None:
    """``while``: abstract: the body once (the cond is not read); concrete: ``lax.while_loop``."""
    p = eqn.params
    cn, bn = jaxpr_compat.while_split(p)
    cconsts, bconsts, carry = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    cj, bj = jaxpr_compat.body(p["cond_jaxpr"]), jaxpr_compat.body(p["body_jaxpr"])
    carry = _carry(eqn, carry, mode)
    if carry is None:
        return None
    if mode.abstract:
        run(mode, bj.jaxpr, bj.consts, list(bconsts) + carry)
        return [None] * len(eqn.outvars)

    def cond_fun(c: tuple[Any, ...]) -> Any:
        return run(mode, cj.jaxpr, cj.consts, list(cconsts) + list(c))[0]

    def body_fun(c: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(run(mode, bj.jaxpr, bj.consts, list(bconsts) + list(c)))

    return list(lax.while_loop(cond_fun, body_fun, tuple(carry)))


def shard_map(eqn: Any, invals: list[Any], mode: Mode) -> list[Any] | None:
    """``shard_map``: rebuilt with ``jax.shard_map`` on the same mesh, specs and manual axes; a tracked
    operand is passed whole, its arrays sharded as :meth:`Mode.shard_specs` says (concrete modes)."""
    sm = jaxpr_compat.shard_map(eqn.params)
    specs = [mode.shard_specs(x, s) if mode.tracked(x) else s for x, s in zip(invals, sm.in_specs)]
    if mode.abstract or any(s is None for s in specs):
        return None

    def body(*vals: Any) -> tuple[Any, ...]:
        if sm.check_vma:  # a tracked value's arrays vary over every manual axis: their cotangents are summed
            vals = [jax.tree.map(lambda a: jaxpr_compat.varying(a, sm.axis_names), v) if mode.tracked(v) else v
                    for v in vals]
        return tuple(mode.loop_out(eqn, o) for o in run(mode, sm.body.jaxpr, sm.body.consts, vals))

    return list(jax.shard_map(body, mesh=sm.mesh, in_specs=tuple(specs), out_specs=sm.out_specs,
                              axis_names=sm.axis_names, check_vma=sm.check_vma)(*invals))


CONTROL: dict[str, Rule] = {"scan": scan, "cond": cond, "while": while_}


# --- the traced model: leaves and their paths ----------------------------------------------------

def leaf_paths(params: Any) -> list[str]:
    """The canonical path of every jax leaf of ``params``, in ``tree_flatten`` order.

    >>> leaf_paths({"b": {"w": 1, "v": 2}, "a": 3})
    ['a', 'b/v', 'b/w']
    """
    out: list[str] = []
    for keypath, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=jpaths.is_variable)[0]:
        n = len(jax.tree_util.tree_leaves(node)) if jpaths.is_variable(node) else 1
        out += [jpaths.path_str(keypath)] * n
    return out


@dataclasses.dataclass(frozen=True)
class Traced:
    """``apply_fn(params, *args, **kwargs)`` as a jaxpr over ``leaves + dyn`` (the params' leaves, then the
    array leaves of the arguments; every other argument is static), with each param leaf's path.

    >>> t = trace_apply(lambda p: {"y": 2 * p["w"]}, {"w": jnp.ones(1)}, (), {}, "doc")
    >>> t.unflatten([jnp.zeros(1)])
    {'y': Array([0.], dtype=float32)}
    """

    closed: Any
    out_tree: Any
    leaves: list[Any]
    leaf_paths: list[str]
    dyn: list[Any]

    def unflatten(self, outs: Sequence[Any]) -> Any:
        """The jaxpr's outputs in the structure ``apply_fn`` returns."""
        return jax.tree_util.tree_unflatten(self.out_tree, list(outs))


_DYNAMIC = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)


def trace_apply(apply_fn: Callable[..., Any], params: Any, args: Sequence[Any], kwargs: Mapping[str, Any],
                caller: str) -> Traced:
    """Traces ``apply_fn(params, *args, **kwargs)`` once (``jax.make_jaxpr``) for a walk; array (and
    ``ShapeDtypeStruct``) leaves of the arguments are traced, the rest static. ``caller`` names the
    public function in the error for a params tree whose leaves have no paths.

    >>> t = trace_apply(lambda p, x, scale=2: x @ p["w"] * scale, {"w": jnp.eye(2)}, (jnp.ones(2),), {}, "doc")
    >>> t.leaf_paths, len(t.dyn), [e.primitive.name for e in t.closed.jaxpr.eqns]
    (['w'], 1, ['dot_general', 'mul'])
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    paths = leaf_paths(params)
    if len(paths) != len(leaves):
        raise ValueError(f"{caller}: the params tree has {len(leaves)} leaves but {len(paths)} paths; "
                         "fix: pass a plain params pytree (Linen dict, nnx.State or nested dicts)")
    arg_leaves, arg_def = jax.tree_util.tree_flatten((tuple(args), dict(kwargs)))
    dyn_pos = [i for i, x in enumerate(arg_leaves) if isinstance(x, _DYNAMIC)]

    def traced(param_leaves: list[Any], dyn: list[Any]) -> Any:
        full_args = list(arg_leaves)
        for i, x in zip(dyn_pos, dyn):
            full_args[i] = x
        a, k = jax.tree_util.tree_unflatten(arg_def, full_args)
        return apply_fn(jax.tree_util.tree_unflatten(treedef, param_leaves), *a, **k)

    dyn = [arg_leaves[i] for i in dyn_pos]
    closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(leaves, dyn)
    return Traced(closed, jax.tree_util.tree_structure(out_shape), leaves, paths, dyn)
