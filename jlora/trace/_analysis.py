"""Reading each kernel's :class:`~jlora.layout.Layout` from how the model uses it.

:func:`read_layouts` traces ``apply_fn(params, *args)`` to a jaxpr (abstractly: no FLOPs) and
follows every target kernel through views — casts, sharding constraints, transposes, reshapes that split or merge axes,
``rev``, slices and indexing of an axis (which makes it a *stack* axis), ``scan`` over an axis
(stack), calls, ``remat``, ``cond``, ``while`` — to the operations that consume it:

- ``dot_general``: contracted axes are *input* axes, the kernel's batch axes *stack*, the rest
  *output* axes (in any order, with any dimension numbers);
- ``conv_general_dilated``: the input-feature and spatial axes are inputs, the output-feature axis
  the output; with ``feature_group_count = G > 1`` the output channels split into
  ``(G, out per group)``: G is a stack axis (PEFT's convention: the rank is the total over groups);
- ``ragged_dot_general`` (``jax.lax.ragged_dot``, MoE experts): the group (expert) axis is a stack
  axis, contracted axes inputs, the rest outputs;
- ``gather`` of rows (an embedding lookup): the looked-up axis is the input, the row the output;
- ``sharding_constraint`` is a view (the roles pass through).

The reader is the abstract mode of the walker (:mod:`jlora.trace._walker`): a kernel's value is its
:class:`~jlora.trace._uses.View` (the *atoms*, sub-axes of stored axes, each axis holds), every view
and consumer is one rule of :data:`_RULES`, and each body is walked once. Every use yields a role
per atom (:mod:`jlora.trace._uses`); the uses must agree (an embedding table that is also used
as a tied output head is an embedding). Anything else is reported as a reason string, never
guessed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from jlora.core.layout import Layout
from jlora.trace import _walker as walker
from jlora.trace._uses import Use, View, conv_use, dot_use, ragged_use, repartition, roles_layout


def _sub_jaxprs(eqn: Any) -> list[Any]:
    out = []
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            j = getattr(v, "jaxpr", v)
            if hasattr(j, "eqns") and hasattr(j, "invars"):
                out.append(j)
    return out


class _Roles(walker.Mode):
    """The roles reader as an abstract walker mode: follows every kernel read at once (its values
    :class:`View` objects naming it, every other value None), collecting per kernel :class:`Use`
    objects or reason strings in ``found``."""

    abstract = True

    def __init__(self, shapes: Sequence[tuple[int, ...]]):
        self.shapes = list(shapes)
        self.found: list[list[Use | str]] = [[] for _ in shapes]
        self.cuts = 0

    @property
    def rules(self) -> dict[str, walker.Rule]:  # type: ignore[override]
        return _RULES

    def tracked(self, x: Any) -> bool:
        return isinstance(x, View)

    def record(self, view: View, what: Use | str) -> None:
        """One use (or reason) of the kernel ``view`` is a view of."""
        self.found[view.kernel].append(what)

    def fallback(self, eqn: Any, invals: list[Any]) -> list[Any]:
        """Any other equation with a sub-jaxpr of the same arity is entered; else it is a use we do not know."""
        subs = [j for j in _sub_jaxprs(eqn) if len(j.invars) == len(eqn.invars)]
        n = len(eqn.outvars)
        if not subs:
            for k in sorted({x.kernel for x in invals if isinstance(x, View)}):
                self.found[k].append(eqn.primitive.name)
            return [None] * n
        outs = walker.run(self, subs[0], [None] * len(subs[0].constvars), invals)
        return (outs + [None] * n)[:n]

    def carried(self, eqn: Any, x: View) -> Any:
        self.record(x, "scan carry" if eqn.primitive.name == "scan" else "while_loop carry")
        return None

    def scan_xs(self, x: View, length: int) -> View:
        return x.fix(x.axes[0], "s").with_axes(x.axes[1:])

    def loop_out(self, eqn: Any, x: Any) -> Any:
        if self.tracked(x):
            self.record(x, f"a value returned from a {'scan body' if eqn.primitive.name == 'scan' else 'cond branch'}")
        return None

    def cut(self, view: View, axis: int, size: int) -> View:
        """Axis ``axis`` was sliced or indexed: its atoms are stack axes; the result axis (of
        ``size``) is a pseudo-atom that must stay a stack or free axis."""
        self.cuts += 1
        pseudo = (-self.cuts, 0)
        fixed = view.fix(view.axes[axis], "s")
        axes = list(view.axes)
        axes[axis] = (pseudo,) if size != 1 else ()
        return dataclasses.replace(fixed.with_axes(axes), pseudo=view.pseudo + ((pseudo, size),))


# --- rules: each returns the outputs' views (None: untracked), or None for the fallback -------------

def _each(rule: walker.Rule) -> walker.Rule:
    """``rule`` (written for one kernel) applied to each kernel among the inputs, the others' views
    hidden; the outputs' views merged."""
    def apply(eqn: Any, invals: list[Any], m: _Roles) -> list[Any]:
        outs: list[Any] = [None] * len(eqn.outvars)
        for k in sorted({x.kernel for x in invals if isinstance(x, View)}):
            mine = [None if isinstance(x, View) and x.kernel != k else x for x in invals]
            got = rule(eqn, mine, m)
            got = m.fallback(eqn, mine) if got is None else got
            outs = [o if o is not None else g for o, g in zip(outs, got)]
        return outs
    return apply


def _at(invals: list[Any]) -> tuple[list[int], View]:
    positions = [i for i, x in enumerate(invals) if isinstance(x, View)]
    return positions, invals[positions[0]]


def _pass(eqn: Any, invals: list[Any], m: _Roles) -> list[Any]:
    return [_at(invals)[1]]


def _barrier(eqn: Any, invals: list[Any], m: _Roles) -> list[Any]:
    return [x if isinstance(x, View) else None for x in invals]


def _reshape(eqn: Any, invals: list[Any], m: _Roles) -> list[Any] | None:
    positions, view = _at(invals)
    if positions != [0] or len(eqn.invars) != 1:
        return None
    name, new = eqn.primitive.name, tuple(eqn.outvars[0].aval.shape)
    if math.prod(new) != math.prod(eqn.invars[0].aval.shape):
        m.record(view, f"{name} to shape {new} (a broadcast)")
        return [None]
    dims = eqn.params.get("broadcast_dimensions")
    if dims is not None and list(dims) != sorted(dims):
        m.record(view, f"{name} with dimensions {tuple(dims)}")
        return [None]
    split = repartition(view, [a for g in view.axes for a in g], new)
    if split is None:
        m.record(view, f"{name} to shape {new}, which mixes axes")
        return [None]
    return [split[0].with_axes(split[1])]


def _transpose(eqn: Any, invals: list[Any], m: _Roles) -> list[Any]:
    view = _at(invals)[1]
    return [view.with_axes([view.axes[p] for p in eqn.params["permutation"]])]


def _slice(eqn: Any, invals: list[Any], m: _Roles) -> list[Any] | None:
    positions, view = _at(invals)
    if positions != [0]:
        return None
    in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    if eqn.primitive.name == "slice" and any(s != 1 for s in (eqn.params["strides"] or ())):
        m.record(view, "slice with strides")
        return [None]
    for j in range(len(in_shape)):
        if in_shape[j] != out_shape[j]:
            view = m.cut(view, j, out_shape[j])
    return [view]


def _gather(eqn: Any, invals: list[Any], m: _Roles) -> list[Any] | None:
    positions, view = _at(invals)
    if positions != [0]:
        return None
    dn = eqn.params["dimension_numbers"]
    sizes = tuple(eqn.params["slice_sizes"])
    in_shape = eqn.invars[0].aval.shape
    picked = sorted(set(dn.start_index_map) | set(dn.collapsed_slice_dims))
    if dn.operand_batching_dims or any(sizes[j] != in_shape[j] for j in range(len(sizes)) if j not in picked):
        m.record(view, "gather of a window")
        return [None]
    n_batch = len(eqn.outvars[0].aval.shape) - len(dn.offset_dims)
    if n_batch == 0:  # W[i]: indexing stack axes, the rest follows as a kernel
        for j in picked:
            view = m.cut(view, j, sizes[j])
        return [view.with_axes([view.axes[j] for j in range(len(in_shape)) if j not in dn.collapsed_slice_dims])]
    # entries looked up by ids (an embedding table in any layout): the looked-up axes are the inputs
    lookup = tuple(dn.start_index_map)
    if set(dn.collapsed_slice_dims) <= set(lookup) and all(sizes[j] == 1 for j in lookup):
        roles = {a: "i" if j in lookup else "o" for j, atoms in enumerate(view.axes) for a in atoms}
        lay = roles_layout(view, roles, m.shapes[view.kernel], "embed")
        m.record(view, Use(lay, "gather of rows") if isinstance(lay, Layout) else f"gather of rows: {lay}")
    else:
        m.record(view, "gather with index batch dimensions")
    return [None]


def _consumer(use: Callable[[Any, int, View, tuple[int, ...]], Use | str], at: int | None = None) -> walker.Rule:
    """A consumer of the kernel (at operand ``at``, or any one operand): records its use."""
    def rule(eqn: Any, invals: list[Any], m: _Roles) -> list[Any] | None:
        positions, view = _at(invals)
        if at is not None and positions != [at]:
            return None
        if len(positions) > 1:
            m.record(view, f"{eqn.primitive.name} with the kernel on both sides")
        else:
            m.record(view, use(eqn, positions[0], view, m.shapes[view.kernel]))
        return [None] * len(eqn.outvars)
    return rule


_RULES: dict[str, walker.Rule] = {
    **walker.CALLS, **walker.CONTROL,
    **{name: _each(rule) for name, rule in {
        **{name: _pass for name in walker.SAME_AXES | {"rev"}},
        **{name: _reshape for name in ("reshape", "squeeze", "broadcast_in_dim", "expand_dims")},
        "optimization_barrier": _barrier,
        "transpose": _transpose,
        "slice": _slice,
        "dynamic_slice": _slice,
        "gather": _gather,
        "dot_general": _consumer(dot_use),
        "conv_general_dilated": _consumer(lambda eqn, pos, view, shape: conv_use(eqn, view, shape), at=1),
        "ragged_dot_general": _consumer(lambda eqn, pos, view, shape: ragged_use(eqn, view, shape), at=1),
    }.items()},
}


def _agree(found: list[Use | str]) -> Layout | str:
    uses = [u for u in found if isinstance(u, Use)]
    unknown = [u for u in found if isinstance(u, str)]
    if not found:
        return "the model never uses it"
    if unknown:
        return f"it is used by {unknown[0]}"
    embeds = [u for u in uses if u.layout.kind == "embed"]
    if embeds:  # a table both looked up and attended (tied head) is an embedding
        uses = embeds
    layouts = {u.layout for u in uses}
    if len(layouts) > 1:
        seen = "; ".join(sorted({f"{u.where} -> roles {u.layout.roles!r} {u.layout.describe()}" for u in uses}))
        return f"its uses disagree on the axis roles: {seen}"
    return layouts.pop()


def read_layouts(apply_fn: Callable[..., Any], params: Any, args: Sequence[Any],
                 paths: Sequence[str]) -> dict[str, Layout | str]:
    """Traces ``apply_fn(params, *args)`` abstractly (:func:`jlora.trace._walker.trace_apply`: arrays and
    ``ShapeDtypeStruct`` leaves of ``args`` traced, the rest static) and reads the layout of each
    kernel in ``paths`` (the walker maps the params' leaves to their paths).

    Returns per path the :class:`Layout` its uses agree on, or a string saying why there is none.

    >>> import jax.numpy as jnp
    >>> p = {"w": jnp.zeros((4, 2, 3))}
    >>> read_layouts(lambda p, x: jnp.einsum("btd,ndh->btnh", x, p["w"]), p, (jnp.zeros((1, 5, 2)),),
    ...              ["w"])["w"].roles
    'oio'
    """
    t = walker.trace_apply(apply_fn, params, args, {}, "jlora.init")
    jaxpr = t.closed.jaxpr
    index: dict[str, int] = {}
    for i, p in enumerate(t.leaf_paths):
        index.setdefault(p, i)
    shapes = [tuple(jaxpr.invars[index[p]].aval.shape) for p in paths]
    mode = _Roles(shapes)
    args_in: list[Any] = [None] * len(jaxpr.invars)
    for k, (p, shape) in enumerate(zip(paths, shapes)):  # every kernel followed in one walk
        args_in[index[p]] = View(tuple((n,) for n in shape), tuple(((a, 0),) for a in range(len(shape))), kernel=k)
    for o in walker.run(mode, jaxpr, [None] * len(jaxpr.constvars), args_in):
        if mode.tracked(o):
            mode.record(o, "the model's output (it returns the kernel)")
    return {p: _agree(found) for p, found in zip(paths, mode.found)}


def parse_roles(path: str, shape: Sequence[int], roles: str, kind: str = "dense") -> Layout:
    """The layout stated in ``LoraConfig.layout`` for the kernel at ``path``.

    >>> parse_roles("w", (8, 4), "oi").describe()
    '(8:out, 4:in)'
    """
    try:
        return Layout(tuple(shape), roles, None, kind)
    except ValueError as err:
        raise ValueError(f"LoraConfig.layout for {path!r} (shape {tuple(shape)}): {err}") from None
