"""Reading each kernel's :class:`~jlora.layout.Layout` from how the model uses it.

:func:`read_layouts` traces ``apply_fn(params, *args)`` to a jaxpr (abstractly: no FLOPs) and
follows every target kernel through views — casts, transposes, reshapes that split or merge axes,
``rev``, slices and indexing of an axis (which makes it a *stack* axis), ``scan`` over an axis
(stack), calls, ``remat``, ``cond``, ``while`` — to the operations that consume it:

- ``dot_general``: contracted axes are *input* axes, the kernel's batch axes *stack*, the rest
  *output* axes (in any order, with any dimension numbers);
- ``conv_general_dilated``: the input-feature and spatial axes are inputs, the output-feature axis
  the output; with ``feature_group_count = G > 1`` the output channels split into
  ``(G, out per group)``: G is a stack axis (PEFT's convention: the rank is the total over groups);
- ``ragged_dot_general`` (``jax.lax.ragged_dot``, MoE experts): the group (expert) axis is a stack
  axis, contracted axes inputs, the rest outputs;
- ``gather`` of rows (an embedding lookup): the looked-up axis is the input, the row the output.

A kernel's axes are tracked as *atoms*: sub-axes of stored axes, refined when a reshape splits an
axis. Every use yields a role per atom; the uses must agree (an embedding table that is also used
as a tied output head is an embedding). Anything else is reported as a reason string, never
guessed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jlora.trace import _compat as jaxpr_compat
from jlora.core.layout import Layout, regroup

_PASS = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision", "rev"})
_RESHAPES = frozenset({"reshape", "squeeze", "broadcast_in_dim", "expand_dims"})
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                    "custom_vjp_call_jaxpr", "remat2", "remat", "checkpoint", "custom_lin"})

Atom = tuple[int, int]  # (stored axis, sub-axis index)


@dataclasses.dataclass(frozen=True)
class _View:
    """How one traced value relates to the stored kernel.

    ``subs[k]``: sizes of stored axis k's sub-axes; ``axes[j]``: the atoms (major first) of the
    value's axis j; ``fixed``: roles already decided by views (stack for indexed/scanned axes).
    """

    subs: tuple[tuple[int, ...], ...]
    axes: tuple[tuple[Atom, ...], ...]
    fixed: tuple[tuple[Atom, str], ...] = ()
    pseudo: tuple[tuple[Atom, int], ...] = ()  # sliced axes: (atom with a negative axis, size)

    def size(self, atom: Atom) -> int:
        if atom[0] < 0:
            return dict(self.pseudo)[atom]
        return self.subs[atom[0]][atom[1]]

    def with_axes(self, axes: Sequence[tuple[Atom, ...]]) -> _View:
        return dataclasses.replace(self, axes=tuple(tuple(a) for a in axes))

    def fix(self, atoms: Sequence[Atom], role: str) -> _View:
        return dataclasses.replace(self, fixed=self.fixed + tuple((a, role) for a in atoms))

    def split(self, atom: Atom, sizes: Sequence[int]) -> tuple[_View, list[Atom]]:
        """Refines ``atom`` into sub-atoms of ``sizes`` (row-major); returns them."""
        ax, k = atom
        n = len(sizes)
        subs = list(self.subs)
        subs[ax] = subs[ax][:k] + tuple(sizes) + subs[ax][k + 1 :]

        def renum(a: Atom) -> Atom:
            return (a[0], a[1] + n - 1) if a[0] == ax and a[1] > k else a

        axes = []
        for group in self.axes:
            new: list[Atom] = []
            for a in group:
                new.extend([(ax, k + i) for i in range(n)] if a == atom else [renum(a)])
            axes.append(tuple(new))
        fixed = []
        for a, role in self.fixed:
            fixed.extend([((ax, k + i), role) for i in range(n)] if a == atom else [(renum(a), role)])
        return _View(tuple(subs), tuple(axes), tuple(fixed), self.pseudo), [(ax, k + i) for i in range(n)]


def repartition(view: _View, atoms: Sequence[Atom], sizes: Sequence[int]) -> tuple[_View, list[tuple[Atom, ...]]] | None:
    """Groups ``atoms`` (row-major) into consecutive runs of the given ``sizes``, refining atoms
    where a size falls inside one (:func:`jlora.layout.regroup`); ``None`` when they do not align.

    >>> v = _View(((12,),), (((0, 0),),))
    >>> v2, groups = repartition(v, [(0, 0)], [3, 4])
    >>> v2.subs, groups
    (((3, 4),), [((0, 0),), ((0, 1),)])
    """
    state = [view]

    def split(atom: Atom, sizes: tuple[int, int]) -> Any:
        if atom[0] < 0:
            return None
        state[0], parts = state[0].split(atom, sizes)
        return parts, lambda a: (a[0], a[1] + 1) if a[0] == atom[0] and a[1] > atom[1] else a

    groups = regroup(atoms, sizes, lambda a: state[0].size(a), split)
    return None if groups is None else (state[0], [tuple(g) for g in groups])


@dataclasses.dataclass(frozen=True)
class Use:
    """One recognised use: the roles it implies for every atom of the kernel."""

    layout: Layout
    where: str


def _roles_layout(view: _View, roles: dict[Atom, str], shape: Sequence[int], kind: str, groups: int = 1,
                  feature: int | None = None) -> Layout | str:
    for atom, _ in view.pseudo:
        if roles.pop(atom, "s") == "i":
            return "a sliced or indexed stack axis is contracted as an input axis"
    for atom, role in view.fixed:
        if roles.get(atom, role) != role:
            return f"axis {atom[0]} is indexed or scanned (a stack axis) but used as an {roles[atom]} axis"
        roles[atom] = role
    splits, letters = [], []
    for ax, sizes in enumerate(view.subs):
        runs: list[list[Any]] = []  # [size, role]: adjacent sub-axes of one role merge; size-1 ones vanish
        for k, n in enumerate(sizes):
            role = roles.get((ax, k))
            if n == 1:
                continue
            if role is None:
                return f"axis {ax} (size {n}) reaches the use without a role"
            if runs and runs[-1][1] == role:
                runs[-1][0] *= n
            else:
                runs.append([n, role])
        if not runs:  # a size-1 axis: its role does not matter; keep the one it was given
            runs = [[1, next((roles[(ax, k)] for k in range(len(sizes)) if (ax, k) in roles), "i")]]
        splits.append(tuple(r[0] for r in runs))
        letters.extend(r[1] for r in runs)
    try:
        return Layout(tuple(shape), "".join(letters), tuple(splits), kind, groups, feature)
    except ValueError as err:
        return str(err)


def _dot_use(eqn: Any, pos: int, view: _View, shape: Sequence[int]) -> Use | str:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (lc, lb) if pos == 0 else (rc, rb)
    return _matmul_use(view, shape, contract, batch, f"dot_general contracting {tuple(contract)} batch {tuple(batch)}")


def _matmul_use(view: _View, shape: Sequence[int], contract: Sequence[int], stack: Sequence[int], where: str
                ) -> Use | str:
    """Contracted view axes are inputs, ``stack`` ones stack axes, the rest outputs."""
    roles: dict[Atom, str] = {}
    for j, atoms in enumerate(view.axes):
        role = "i" if j in contract else "s" if j in stack else "o"
        for a in atoms:
            roles[a] = role
    lay = _roles_layout(view, roles, shape, "dense")
    return f"{where}: {lay}" if isinstance(lay, str) else Use(lay, where)


def _conv_use(eqn: Any, view: _View, shape: Sequence[int]) -> Use | str:
    p = eqn.params
    if p["batch_group_count"] != 1:
        return f"conv_general_dilated with batch_group_count {p['batch_group_count']}"
    spec = p["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
    g = p["feature_group_count"]
    roles: dict[Atom, str] = {}
    out_atoms = view.axes[spec[0]]
    if g > 1:
        split = repartition(view, out_atoms, [g, math.prod(view.size(a) for a in out_atoms) // g])
        if split is None:
            return f"conv_general_dilated with {g} feature groups on output channels {out_atoms}"
        view, (g_atoms, o_atoms) = split
        for a in g_atoms:
            roles[a] = "s"
        out_atoms = o_atoms
    for a in out_atoms:
        roles[a] = "o"
    for j in spec[1:]:
        for a in view.axes[j]:
            roles[a] = "i"
    real = [a for a in view.axes[spec[1]] if view.size(a) > 1 and a[0] >= 0]
    feature = real[0][0] if len(real) == 1 and len(view.subs[real[0][0]]) == 1 else None
    lay = _roles_layout(view, roles, shape, "conv", g, feature)
    if isinstance(lay, str):
        return f"conv_general_dilated (kernel layout {tuple(spec)}): {lay}"
    return Use(lay, f"conv_general_dilated kernel layout {tuple(spec)}, {g} group(s)")


def _ragged_use(eqn: Any, view: _View, shape: Sequence[int]) -> Use | str:
    """``ragged_dot`` (grouped matmul, MoE experts): the group axis is a stack axis (one factor pair
    per expert), contracted axes are inputs, the rest outputs."""
    dn = eqn.params["ragged_dot_dimension_numbers"]
    (_, rc), (_, rb) = dn.dot_dimension_numbers
    groups = tuple(dn.rhs_group_dimensions)
    if not groups:
        return "ragged_dot_general with the kernel as the gradient output (no group axis)"
    return _matmul_use(view, shape, rc, tuple(rb) + groups, f"ragged_dot_general contracting {tuple(rc)}, groups on {groups}")


def _sub_jaxprs(eqn: Any) -> list[Any]:
    out = []
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            j = getattr(v, "jaxpr", v)
            if hasattr(j, "eqns") and hasattr(j, "invars"):
                out.append(j)
    return out


class _Reader:
    """Follows one kernel through a jaxpr, collecting :class:`Use` objects or reason strings."""

    def __init__(self, shape: Sequence[int]):
        self.shape = tuple(shape)
        self.found: list[Use | str] = []
        self.cuts = 0

    def follow(self, jaxpr: Any, var: Any, view: _View) -> list[tuple[int, _View]]:
        """Follows ``var`` through ``jaxpr``; returns ``(i, view)`` for each outvar i it reaches."""
        reached = [(i, view) for i, v in enumerate(jaxpr.outvars) if v is var]
        for eqn in jaxpr.eqns:
            positions = [i for i, v in enumerate(eqn.invars) if v is var]
            if positions:
                reached += self._use(jaxpr, eqn, positions, view)
        return reached

    def _cut(self, view: _View, axis: int, size: int) -> _View:
        """Axis ``axis`` was sliced or indexed: its atoms are stack axes; the result axis (of
        ``size``) is a pseudo-atom that must stay a stack or free axis."""
        self.cuts += 1
        pseudo = (-self.cuts, 0)
        fixed = view.fix(view.axes[axis], "s")
        axes = list(view.axes)
        axes[axis] = (pseudo,) if size != 1 else ()
        return dataclasses.replace(fixed.with_axes(axes), pseudo=view.pseudo + ((pseudo, size),))

    def _use(self, jaxpr: Any, eqn: Any, positions: list[int], view: _View) -> list[tuple[int, _View]]:
        name = eqn.primitive.name
        out = eqn.outvars
        if name in _PASS:
            return self.follow(jaxpr, out[0], view)
        if name == "optimization_barrier":
            return [r for pos in positions for r in self.follow(jaxpr, out[pos], view)]
        if name in _RESHAPES and positions == [0] and len(eqn.invars) == 1:
            new = tuple(out[0].aval.shape)
            if math.prod(new) != math.prod(eqn.invars[0].aval.shape):
                self.found.append(f"{name} to shape {new} (a broadcast)")
                return []
            dims = eqn.params.get("broadcast_dimensions")
            if dims is not None and list(dims) != sorted(dims):
                self.found.append(f"{name} with dimensions {tuple(dims)}")
                return []
            split = repartition(view, [a for g in view.axes for a in g], new)
            if split is None:
                self.found.append(f"{name} to shape {new}, which mixes axes")
                return []
            v2, groups = split
            return self.follow(jaxpr, out[0], v2.with_axes(groups))
        if name == "transpose":
            perm = eqn.params["permutation"]
            return self.follow(jaxpr, out[0], view.with_axes([view.axes[p] for p in perm]))
        if name in ("slice", "dynamic_slice") and positions == [0]:
            in_shape, out_shape = eqn.invars[0].aval.shape, out[0].aval.shape
            if name == "slice" and any(s != 1 for s in (eqn.params["strides"] or ())):
                self.found.append("slice with strides")
                return []
            for j in range(len(in_shape)):
                if in_shape[j] != out_shape[j]:
                    view = self._cut(view, j, out_shape[j])
            return self.follow(jaxpr, out[0], view)
        if name == "gather" and positions == [0]:
            return self._gather(jaxpr, eqn, view)
        if name == "dot_general":
            if len(positions) > 1:
                self.found.append("dot_general with the kernel on both sides")
            else:
                self.found.append(_dot_use(eqn, positions[0], view, self.shape))
            return []
        if name == "conv_general_dilated" and positions == [1]:
            self.found.append(_conv_use(eqn, view, self.shape))
            return []
        if name == "ragged_dot_general" and positions == [1]:
            self.found.append(_ragged_use(eqn, view, self.shape))
            return []
        if name == "scan":
            nc, ncar = jaxpr_compat.scan_split(eqn.params)
            body = jaxpr_compat.body(eqn.params["jaxpr"]).jaxpr
            for pos in positions:
                if pos < nc:
                    reached = self.follow(body, body.invars[pos], view)
                elif pos < nc + ncar:
                    self.found.append("scan carry")
                    reached = []
                else:
                    reached = self.follow(body, body.invars[pos], view.fix(view.axes[0], "s").with_axes(view.axes[1:]))
                if reached:
                    self.found.append("a value returned from a scan body")
            return []
        if name == "cond":
            for branch in jaxpr_compat.cond_branches(eqn.params):
                for pos in positions:
                    if pos > 0 and self.follow(branch.jaxpr, branch.jaxpr.invars[pos - 1], view):
                        self.found.append("a value returned from a cond branch")
            return []
        if name == "while":
            cn, bn = jaxpr_compat.while_split(eqn.params)
            body = jaxpr_compat.body(eqn.params["body_jaxpr"]).jaxpr
            for pos in positions:
                if cn <= pos < cn + bn:
                    self.follow(body, body.invars[pos - cn], view)
                elif pos >= cn + bn:
                    self.found.append("while_loop carry")
            return []
        subs = [j for j in _sub_jaxprs(eqn) if len(j.invars) == len(eqn.invars)]
        if not subs:
            self.found.append(name)
            return []
        reached = []
        for pos in positions:
            for i, v in self.follow(subs[0], subs[0].invars[pos], view):
                if i < len(out):
                    reached += self.follow(jaxpr, out[i], v)
        return reached

    def _gather(self, jaxpr: Any, eqn: Any, view: _View) -> list[tuple[int, _View]]:
        dn = eqn.params["dimension_numbers"]
        sizes = tuple(eqn.params["slice_sizes"])
        in_shape = eqn.invars[0].aval.shape
        picked = sorted(set(dn.start_index_map) | set(dn.collapsed_slice_dims))
        if dn.operand_batching_dims or any(sizes[j] != in_shape[j] for j in range(len(sizes)) if j not in picked):
            self.found.append("gather of a window")
            return []
        out_nd = len(eqn.outvars[0].aval.shape)
        n_batch = out_nd - len(dn.offset_dims)
        if n_batch == 0:  # W[i]: indexing stack axes, the rest follows as a kernel
            for j in picked:
                view = self._cut(view, j, sizes[j])
            axes = [view.axes[j] for j in range(len(in_shape)) if j not in dn.collapsed_slice_dims]
            return self.follow(jaxpr, eqn.outvars[0], view.with_axes(axes))
        # rows looked up by ids: an embedding table (vocab, features...)
        if tuple(dn.collapsed_slice_dims) == (0,) and tuple(dn.start_index_map) == (0,):
            roles = {a: "i" for a in view.axes[0]}
            for j in range(1, len(view.axes)):
                for a in view.axes[j]:
                    roles[a] = "o"
            lay = _roles_layout(view, roles, self.shape, "embed")
            self.found.append(Use(lay, "gather of rows") if isinstance(lay, Layout) else f"gather of rows: {lay}")
        else:
            self.found.append("gather with index batch dimensions")
        return []


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


def read_layouts(apply_fn: Callable[..., Any], params: Any, args: Sequence[Any], paths: Sequence[str],
                 flat_paths: Sequence[str]) -> dict[str, Layout | str]:
    """Traces ``apply_fn(params, *args)`` abstractly and reads the layout of each kernel in ``paths``.

    Returns per path the :class:`Layout` its uses agree on, or a string saying why there is none.

    >>> import jax.numpy as jnp
    >>> p = {"w": jnp.zeros((4, 2, 3))}
    >>> read_layouts(lambda p, x: jnp.einsum("btd,ndh->btnh", x, p["w"]), p, (jnp.zeros((1, 5, 2)),),
    ...              ["w"], ["w"])["w"].roles
    'oio'
    """
    closed = jax.make_jaxpr(apply_fn)(params, *args)
    jaxpr = closed.jaxpr
    index = {p: i for i, p in enumerate(flat_paths)}
    out: dict[str, Layout | str] = {}
    for path in paths:
        var = jaxpr.invars[index[path]]
        shape = tuple(var.aval.shape)
        reader = _Reader(shape)
        view = _View(tuple((n,) for n in shape), tuple(((k, 0),) for k in range(len(shape))))
        if reader.follow(jaxpr, var, view):
            reader.found.append("the model's output (it returns the kernel)")
        out[path] = _agree(reader.found)
    return out


def parse_roles(path: str, shape: Sequence[int], roles: str, kind: str = "dense") -> Layout:
    """The layout stated in ``LoraConfig.layout`` for the kernel at ``path``.

    >>> parse_roles("w", (8, 4), "oi").describe()
    '(8:out, 4:in)'
    """
    try:
        return Layout(tuple(shape), roles, None, kind)
    except ValueError as err:
        raise ValueError(f"LoraConfig.layout for {path!r} (shape {tuple(shape)}): {err}") from None
