"""Kernel layouts (the role of every axis) and the lora-tree node that carries one.

A kernel is a linear map from its *input* axes to its *output* axes, possibly repeated over
*stack* axes (scan layers, heads used as dot batch dimensions, groups of a grouped conv, experts).
:class:`Layout` gives every axis of the stored kernel one role, in whatever order the kernel
stores them; an axis may first be split into sub-axes (a grouped conv's output channels are
``(groups, out per group)``). LoRA factors the kernel in the *canonical* order:

- ``A``: ``stack + in + (r,)``,
- ``B``: ``stack + (r,) + out``,
- ``delta = s * A ⊗ B`` (``stack + in + out``), permuted back to the stored order.

This module is the ground floor: it imports nothing else of jlora, and every other module reads
roles from here (init, merge, the lazy rewrite, sharding, quantization, PEFT layouts, summary).
:class:`LoraKernel` is the lora tree's node for one adapted kernel: a read-only mapping of its
trainable parts (``"A"``, ``"B"``, DoRA's ``"m"``, trained ``"rows"``) that keeps the layout as
static pytree metadata, so it survives ``jax.jit``, ``jax.grad``, optax and ``jax.tree.map``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Hashable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import jax

ROLES = {"s": "stack", "i": "in", "o": "out"}
KINDS = ("dense", "embed", "conv")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The role of every axis of a stored kernel.

    Attributes:
      shape: the stored kernel's shape.
      roles: one letter per sub-axis: ``'s'`` stack, ``'i'`` input, ``'o'`` output.
      splits: per stored axis the sizes of its sub-axes (row-major), or ``None`` when no axis is
        split (then ``roles`` has one letter per stored axis).
      kind: ``'dense'``, ``'embed'`` (A zero, B normal at init) or ``'conv'``.
      groups: a grouped conv's ``feature_group_count``; its first stack axis is the group axis and
        the configured rank is the total over groups (PEFT's convention: ``r % groups == 0``, each
        group gets ``r // groups``).
      feature: a conv's stored axis of input features (``cin``; its other input axes are spatial),
        or None (PEFT's conv tensors put it first: ``lora_A (r, cin, k...)``).

    >>> lay = Layout((4, 16, 8), "ois")   # e.g. an (out, in) kernel stacked on its last axis
    >>> lay.canonical_shape, lay.factor_shapes(2)
    ((8, 16, 4), ((8, 16, 2), (8, 2, 4)))
    >>> Layout((3, 3, 4, 6), "iiiso", splits=((3,), (3,), (4,), (2, 3)), kind="conv").canonical_shape
    (2, 3, 3, 4, 3)
    """

    shape: tuple[int, ...]
    roles: str
    splits: tuple[tuple[int, ...], ...] | None = None
    kind: str = "dense"
    groups: int = 1
    feature: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        if self.splits is not None:
            splits = tuple(tuple(int(n) for n in s) for s in self.splits)
            object.__setattr__(self, "splits", None if all(len(s) == 1 for s in splits) else splits)
            if len(splits) != len(self.shape) or any(math.prod(s) != n for s, n in zip(splits, self.shape)):
                raise ValueError(f"Layout: splits {splits} do not split the kernel shape {self.shape}")
        n = len(self.sub_shape)
        if len(self.roles) != n or set(self.roles) - set(ROLES):
            raise ValueError(
                f"Layout: roles {self.roles!r} must give one of 's' (stack), 'i' (input), 'o' (output) to each "
                f"of the {n} axes of shape {self.sub_shape}; fix: e.g. 'io' for an (in, out) kernel, 'oi' for "
                "(out, in)"
            )
        if "i" not in self.roles or "o" not in self.roles:
            raise ValueError(
                f"Layout: roles {self.roles!r} for a kernel of shape {self.shape} need at least one input ('i') "
                "and one output ('o') axis; fix: a kernel maps its input axes to its output axes, e.g. 'io'"
            )
        if self.groups < 1 or (self.groups > 1 and (not self.n_stack or self.stack_shape[0] != self.groups)):
            raise ValueError(f"Layout: {self.groups} groups need a first stack axis of that size, got {self.stack_shape}")
        if self.kind not in KINDS:
            raise ValueError(f"Layout: kind must be one of {KINDS}, got {self.kind!r}")

    # --- derived facts ---------------------------------------------------------------------------

    @functools.cached_property
    def sub_shape(self) -> tuple[int, ...]:
        """The shape after splitting (equal to ``shape`` when nothing is split)."""
        if self.splits is None:
            return self.shape
        return tuple(n for s in self.splits for n in s)

    @functools.cached_property
    def perm(self) -> tuple[int, ...]:
        """Sub-axes in canonical order: the stack, then the input, then the output axes."""
        return tuple(i for role in "sio" for i, c in enumerate(self.roles) if c == role)

    @functools.cached_property
    def inv_perm(self) -> tuple[int, ...]:
        """The inverse of :attr:`perm`."""
        inv = [0] * len(self.perm)
        for i, p in enumerate(self.perm):
            inv[p] = i
        return tuple(inv)

    @property
    def n_stack(self) -> int:
        """The number of stack axes."""
        return self.roles.count("s")

    @property
    def n_in(self) -> int:
        """The number of input axes."""
        return self.roles.count("i")

    @property
    def n_out(self) -> int:
        """The number of output axes."""
        return self.roles.count("o")

    @functools.cached_property
    def canonical_shape(self) -> tuple[int, ...]:
        """``stack + in + out``."""
        return tuple(self.sub_shape[p] for p in self.perm)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """The stack axes' sizes, in canonical order."""
        return self.canonical_shape[: self.n_stack]

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The input axes' sizes, in canonical order."""
        return self.canonical_shape[self.n_stack : self.n_stack + self.n_in]

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The output axes' sizes, in canonical order."""
        return self.canonical_shape[self.n_stack + self.n_in :]

    @property
    def fan_in(self) -> int:
        """The number of inputs of one output unit (the init's fan-in)."""
        return math.prod(self.in_shape)

    @property
    def is_plain(self) -> bool:
        """True when the stored order already is ``stack + in + out`` and nothing is split."""
        return self.splits is None and self.perm == tuple(range(len(self.perm)))

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(A.shape, B.shape)`` for rank ``rank``."""
        return self.stack_shape + self.in_shape + (rank,), self.stack_shape + (rank,) + self.out_shape

    def max_rank(self) -> int:
        """The largest useful rank (per group for a grouped conv): ``min(prod(in), prod(out))``."""
        return min(self.fan_in, math.prod(self.out_shape))

    def rank_per_stack(self, rank: int) -> int:
        """The rank of A and B for a configured ``rank``: ``rank // groups`` for a grouped conv."""
        return rank // self.groups

    def stored_roles(self) -> tuple[str, ...]:
        """Per stored axis its role letters (several for a split axis), e.g. ``('i', 'so')``."""
        if self.splits is None:
            return tuple(self.roles)
        out, k = [], 0
        for s in self.splits:
            out.append(self.roles[k : k + len(s)])
            k += len(s)
        return tuple(out)

    def canonical_axes(self, axis: int) -> tuple[int, ...]:
        """The canonical positions of the sub-axes of stored axis ``axis`` (major first)."""
        start = sum(len(s) for s in self.splits[:axis]) if self.splits is not None else axis
        count = len(self.splits[axis]) if self.splits is not None else 1
        return tuple(self.inv_perm[k] for k in range(start, start + count))

    def in_feature_index(self) -> int:
        """The position of the conv's input-feature axis among the canonical input axes (the last
        one when :attr:`feature` is None: Flax's ``(k..., cin, cout)``)."""
        if self.feature is None:
            return self.n_in - 1
        pos = self.canonical_axes(self.feature)
        if len(pos) != 1 or not self.n_stack <= pos[0] < self.n_stack + self.n_in:
            raise ValueError(f"Layout: the feature axis {self.feature} of {self.describe()} is not one input axis")
        return pos[0] - self.n_stack

    def describe(self) -> str:
        """A short text naming each stored axis' size and role, e.g. ``(N=4:out, D=16:in)``-like.

        >>> Layout((8, 16), "oi").describe()
        '(8:out, 16:in)'
        """
        parts = []
        for n, roles in zip(self.shape, self.stored_roles()):
            parts.append(f"{n}:" + "×".join(ROLES[c] for c in roles))
        return "(" + ", ".join(parts) + ")"

    # --- moving arrays between the stored and the canonical order -------------------------------

    def to_canonical(self, w: Any) -> Any:
        """A stored-order kernel (or any array of :attr:`shape`) in canonical order."""
        if self.splits is not None:
            w = w.reshape(self.sub_shape)
        return w if self.perm == tuple(range(len(self.perm))) else w.transpose(self.perm)

    def from_canonical(self, c: Any) -> Any:
        """The inverse of :meth:`to_canonical`."""
        if self.perm != tuple(range(len(self.perm))):
            c = c.transpose(self.inv_perm)
        return c.reshape(self.shape) if self.splits is not None else c

    # --- serialisation ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (saved with adapters)."""
        out: dict[str, Any] = {"shape": list(self.shape), "roles": self.roles, "kind": self.kind}
        if self.groups != 1:
            out["groups"] = self.groups
        if self.feature is not None:
            out["feature"] = self.feature
        if self.splits is not None:
            out["splits"] = [list(s) for s in self.splits]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Layout:
        """The inverse of :meth:`to_json`.

        >>> lay = Layout((3, 5), "oi")
        >>> Layout.from_json(lay.to_json()) == lay
        True
        """
        splits = data.get("splits")
        return cls(tuple(data["shape"]), str(data["roles"]),
                   None if splits is None else tuple(tuple(s) for s in splits), str(data.get("kind", "dense")),
                   int(data.get("groups", 1)), data.get("feature"))

    @classmethod
    def plain(cls, shape: Sequence[int], n_stack: int, n_in: int, kind: str = "dense") -> Layout:
        """The layout ``stack + in + out`` stored in that order.

        >>> Layout.plain((10, 384, 64), 1, 1).roles
        'sio'
        """
        n = len(shape)
        if n_stack < 0 or n_in < 1 or n_stack + n_in >= n:
            raise ValueError(
                f"Layout: a kernel of shape {tuple(shape)} cannot have {n_stack} stacked and {n_in} input axes "
                "(at least one input and one output axis are needed)"
            )
        return cls(tuple(shape), "s" * n_stack + "i" * n_in + "o" * (n - n_stack - n_in), None, kind)


def regroup(atoms: Sequence[Hashable], sizes: Sequence[int], size_of: Callable[[Any], int],
            split: Callable[[Any, tuple[int, int]], tuple[list[Any], Callable[[Any], Any]] | None]
            ) -> list[list[Any]] | None:
    """Groups ``atoms`` (row-major axes) into consecutive runs whose sizes multiply to ``sizes``.

    Where a size falls inside an atom, ``split(atom, (q, rest))`` refines it and returns the two new
    atoms and a renumbering of the other atoms (or ``None`` when it cannot). Trailing size-1 atoms
    join the last group. Returns ``None`` when the sizes do not align. Both the layout reader and
    the lazy rewrite follow reshapes with it.

    >>> regroup([0, 1], [6], {0: 2, 1: 3}.get, None)
    [[0, 1]]
    """
    queue = list(atoms)
    groups: list[list[Any]] = []
    for n in sizes:
        group: list[Any] = []
        groups.append(group)
        p = 1
        while p < n:
            if not queue:
                return None
            m = size_of(queue[0])
            if p * m <= n:
                if n % (p * m):
                    return None
                group.append(queue.pop(0))
                p *= m
                continue
            if n % p or m % (n // p):
                return None
            q = n // p
            atom = queue[0]
            result = split(atom, (q, m // q))
            if result is None:
                return None
            (first, second), ren = result
            queue = [second] + [ren(a) for a in queue[1:]]
            for g in groups:
                g[:] = [ren(a) for a in g]
            group.append(first)
            p *= q
    if any(size_of(a) != 1 for a in queue):
        return None
    if queue and groups:
        groups[-1].extend(queue)
    return groups


# --- the lora-tree node of one adapted kernel -----------------------------------------------------

@jax.tree_util.register_pytree_with_keys_class
class LoraKernel(MutableMapping):
    """The trainable parts of one adapted kernel (``"A"``, ``"B"``, optionally ``"m"``, ``"rows"``)
    and its :class:`Layout`, which travels as static pytree metadata.

    It reads and writes like a dict (``node["A"]``, ``node["A"] = ...``) and its pytree keys are the
    part names, so leaf paths are ``<kernel path>/A`` exactly as for a plain dict; ``jax.tree.map``,
    ``jax.grad`` and optax keep the layout.

    >>> node = LoraKernel({"A": jax.numpy.ones((3, 2)), "B": jax.numpy.zeros((2, 4))}, Layout((4, 3), "oi"))
    >>> node["A"].shape, node.layout.roles, sorted(node)
    ((3, 2), 'oi', ['A', 'B'])
    >>> jax.tree.map(lambda x: x.shape, node).layout == node.layout
    True
    """

    __slots__ = ("_parts", "_layout")

    def __init__(self, parts: Mapping[str, Any], layout: Layout):
        if not isinstance(layout, Layout):
            raise TypeError(f"LoraKernel: layout must be a jlora Layout, got {type(layout).__name__}; fix: "
                            "LoraKernel(parts, jlora.Layout(kernel_shape, roles))")
        self._parts = dict(sorted(dict(parts).items()))
        self._layout = layout

    @property
    def layout(self) -> Layout:
        """The kernel's :class:`Layout`."""
        return self._layout

    def __getitem__(self, key: str) -> Any:
        return self._parts[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._parts[key] = value
        self._parts = dict(sorted(self._parts.items()))

    def __delitem__(self, key: str) -> None:
        del self._parts[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def __eq__(self, other: object) -> bool:
        """Equal parts (as a dict compares them) and, against another node, the same layout."""
        if isinstance(other, LoraKernel) and other.layout != self._layout:
            return False
        return isinstance(other, Mapping) and dict(self._parts) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]  # mutable, like dict

    def replace(self, **parts: Any) -> LoraKernel:
        """A copy with some parts changed (``None`` removes a part)."""
        new = dict(self._parts, **parts)
        return LoraKernel({k: v for k, v in new.items() if v is not None}, self._layout)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k!r}: {v!r}" for k, v in self._parts.items())
        return f"LoraKernel({{{inner}}}, layout={self._layout.roles!r} {self._layout.describe()})"

    def tree_flatten_with_keys(self):  # noqa: D102
        keys = tuple(self._parts)
        return [(jax.tree_util.DictKey(k), self._parts[k]) for k in keys], (keys, self._layout)

    def tree_flatten(self):  # noqa: D102
        keys = tuple(self._parts)
        return [self._parts[k] for k in keys], (keys, self._layout)

    @classmethod
    def tree_unflatten(cls, aux: Any, children: Sequence[Any]) -> LoraKernel:  # noqa: D102
        keys, layout = aux
        node = object.__new__(cls)
        node._parts = dict(zip(keys, children))
        node._layout = layout
        return node


def is_kernel_node(x: Any) -> bool:
    """True for a :class:`LoraKernel`."""
    return isinstance(x, LoraKernel)
