"""The view model of the roles reader (:mod:`jlora.trace._analysis`) and the roles each use implies.

A kernel's axes are tracked as *atoms*: sub-axes of stored axes, refined when a reshape splits an
axis. A :class:`View` says which atoms each axis of a traced value holds; the consumers
(:func:`dot_use`, :func:`conv_use`, :func:`ragged_use`, :func:`roles_layout` for a lookup) turn
one use into a :class:`Use` (a role per atom, as a :class:`~jlora.layout.Layout`) or a reason string.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from jlora.core.layout import Layout, regroup

__all__ = ["Atom", "Use", "View", "conv_use", "dot_use", "matmul_use", "ragged_use", "repartition", "roles_layout"]

Atom = tuple[int, int]  # (stored axis, sub-axis index)


@dataclasses.dataclass(frozen=True)
class View:
    """How one traced value relates to the stored kernel.

    ``subs[k]``: sizes of stored axis k's sub-axes; ``axes[j]``: the atoms (major first) of the
    value's axis j; ``fixed``: roles already decided by views (stack for indexed/scanned axes);
    ``kernel``: which of the kernels read in one walk it is a view of.
    """

    subs: tuple[tuple[int, ...], ...]
    axes: tuple[tuple[Atom, ...], ...]
    fixed: tuple[tuple[Atom, str], ...] = ()
    pseudo: tuple[tuple[Atom, int], ...] = ()  # sliced axes: (atom with a negative axis, size)
    kernel: int = 0

    def size(self, atom: Atom) -> int:
        if atom[0] < 0:
            return dict(self.pseudo)[atom]
        return self.subs[atom[0]][atom[1]]

    def with_axes(self, axes: Sequence[tuple[Atom, ...]]) -> View:
        return dataclasses.replace(self, axes=tuple(tuple(a) for a in axes))

    def fix(self, atoms: Sequence[Atom], role: str) -> View:
        return dataclasses.replace(self, fixed=self.fixed + tuple((a, role) for a in atoms))

    def split(self, atom: Atom, sizes: Sequence[int]) -> tuple[View, list[Atom]]:
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
        new = dataclasses.replace(self, subs=tuple(subs), axes=tuple(axes), fixed=tuple(fixed))
        return new, [(ax, k + i) for i in range(n)]


def repartition(view: View, atoms: Sequence[Atom], sizes: Sequence[int]) -> tuple[View, list[tuple[Atom, ...]]] | None:
    """Groups ``atoms`` (row-major) into consecutive runs of the given ``sizes``, refining atoms
    where a size falls inside one (:func:`jlora.layout.regroup`); ``None`` when they do not align.

    >>> v = View(((12,),), (((0, 0),),))
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


def roles_layout(view: View, roles: dict[Atom, str], shape: Sequence[int], kind: str, groups: int = 1,
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


def dot_use(eqn: Any, pos: int, view: View, shape: Sequence[int]) -> Use | str:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (lc, lb) if pos == 0 else (rc, rb)
    return matmul_use(view, shape, contract, batch, f"dot_general contracting {tuple(contract)} batch {tuple(batch)}")


def matmul_use(view: View, shape: Sequence[int], contract: Sequence[int], stack: Sequence[int], where: str
                ) -> Use | str:
    """Contracted view axes are inputs, ``stack`` ones stack axes, the rest outputs."""
    roles: dict[Atom, str] = {}
    for j, atoms in enumerate(view.axes):
        role = "i" if j in contract else "s" if j in stack else "o"
        for a in atoms:
            roles[a] = role
    lay = roles_layout(view, roles, shape, "dense")
    return f"{where}: {lay}" if isinstance(lay, str) else Use(lay, where)


def conv_use(eqn: Any, view: View, shape: Sequence[int]) -> Use | str:
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
    lay = roles_layout(view, roles, shape, "conv", g, feature)
    if isinstance(lay, str):
        return f"conv_general_dilated (kernel layout {tuple(spec)}): {lay}"
    return Use(lay, f"conv_general_dilated kernel layout {tuple(spec)}, {g} group(s)")


def ragged_use(eqn: Any, view: View, shape: Sequence[int]) -> Use | str:
    """``ragged_dot`` (grouped matmul, MoE experts): the group axis is a stack axis (one factor pair
    per expert), contracted axes are inputs, the rest outputs."""
    dn = eqn.params["ragged_dot_dimension_numbers"]
    (_, rc), (_, rb) = dn.dot_dimension_numbers
    groups = tuple(dn.rhs_group_dimensions)
    if not groups:
        return "ragged_dot_general with the kernel as the gradient output (no group axis)"
    return matmul_use(view, shape, rc, tuple(rb) + groups, f"ragged_dot_general contracting {tuple(rc)}, groups on {groups}")
