"""The :class:`Layout` record: the role of every axis of a stored kernel (see :mod:`jlora.core.layout`)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

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
      feature_groups: a grouped conv's ``feature_group_count``; its first stack axis is the group axis
        and the configured rank is the total over them (PEFT's convention: ``r % feature_groups == 0``,
        each gets ``r // feature_groups``). Saved as ``"groups"``; :attr:`groups` is its old name.
      feature: a conv's stored axis of input features (``cin``; its other input axes are spatial),
        or None (PEFT's conv tensors put it first: ``lora_A (r, cin, k...)``).
      fused: a fused kernel's groups: the last canonical output axis is ``len(fused)`` equal groups and
        only the ``True`` ones adapt (``LoraConfig.fused``); None for an ordinary kernel. A then has
        ``stack + in + (E·r,)`` and B ``stack + (E, r) + out[:-1] + (out[-1] / G,)``, E the enabled groups.

    >>> lay = Layout((4, 16, 8), "ois")   # e.g. an (out, in) kernel stacked on its last axis
    >>> lay.canonical_shape, lay.factor_shapes(2)
    ((8, 16, 4), ((8, 16, 2), (8, 2, 4)))
    >>> Layout((3, 3, 4, 6), "iiiso", splits=((3,), (3,), (4,), (2, 3)), kind="conv").canonical_shape
    (2, 3, 3, 4, 3)
    >>> Layout((64, 96), "io", fused=(True, False, True)).factor_shapes(4)
    ((64, 8), (2, 4, 32))
    """

    shape: tuple[int, ...]
    roles: str
    splits: tuple[tuple[int, ...], ...] | None = None
    kind: str = "dense"
    feature_groups: int = 1
    feature: int | None = None
    fused: tuple[bool, ...] | None = None

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
        g = self.feature_groups
        if g < 1 or (g > 1 and (not self.n_stack or self.stack_shape[0] != g)):
            raise ValueError(f"Layout: {g} feature groups need a first stack axis of that size, got {self.stack_shape}; "
                             "fix: put the conv's group axis first among the stack axes")
        if self.kind not in KINDS:
            raise ValueError(f"Layout: kind must be one of {KINDS}, got {self.kind!r}")
        if self.fused is not None:
            object.__setattr__(self, "fused", tuple(bool(g) for g in self.fused))
            if not any(self.fused) or self.out_shape[-1] % len(self.fused):
                raise ValueError(
                    f"Layout: fused groups {self.fused} need at least one enabled group and a last output axis "
                    f"divisible into {len(self.fused)} groups, got {self.out_shape[-1]}; fix the LoraConfig.fused rule"
                )

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

    @property
    def n_enabled(self) -> int:
        """The number of factor pairs side by side in A's last axis: a fused kernel's enabled groups, else 1."""
        return 1 if self.fused is None else sum(self.fused)

    @property
    def b_rank_axis(self) -> int:
        """The rank axis of B (after the stack axes and, for a fused kernel, the enabled-group axis)."""
        return self.n_stack + (0 if self.fused is None else 1)

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(A.shape, B.shape)`` for rank ``rank`` (per group of a grouped conv, per enabled fused group)."""
        stack, outs = self.stack_shape, self.out_shape
        if self.fused is None:
            return stack + self.in_shape + (rank,), stack + (rank,) + outs
        e = self.n_enabled
        return stack + self.in_shape + (e * rank,), stack + (e, rank) + outs[:-1] + (outs[-1] // len(self.fused),)

    def max_rank(self) -> int:
        """The largest useful rank: ``min(prod(in), prod(out))`` (per group of a grouped conv or a fused kernel)."""
        return min(self.fan_in, math.prod(self.out_shape) // (1 if self.fused is None else len(self.fused)))

    def expand_fused(self, b: Any) -> Any:
        """A fused kernel's B (``stack + (E, r) + out[:-1] + (out[-1] / G,)``) as the block-sparse B of the
        whole kernel, ``stack + (E·r,) + out``: enabled group e's block sits in its own columns, zeros elsewhere.

        >>> lay = Layout((2, 6), "io", fused=(True, False, True))
        >>> lay.expand_fused(jnp.ones((2, 1, 2))).astype(int).tolist()
        [[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]]
        """
        if self.fused is None:
            return b
        n = self.n_stack
        rows = []
        for e in range(self.n_enabled):
            block = jnp.take(b, e, axis=n)  # stack + (r,) + out[:-1] + (out_g,)
            zeros = jnp.zeros_like(block)
            cols, seen = [], 0
            for on in self.fused:
                cols.append(block if on and seen == e else zeros)
                seen += on
            rows.append(jnp.concatenate(cols, axis=-1))
        return jnp.concatenate(rows, axis=n)

    def with_fused(self, fused: Sequence[bool] | None) -> Layout:
        """This layout with fused groups ``fused`` (None: not fused)."""
        return dataclasses.replace(self, fused=None if fused is None else tuple(fused))

    def rank_per_stack(self, rank: int) -> int:
        """The rank of A and B for a configured ``rank``: ``rank // feature_groups`` for a grouped conv."""
        return rank // self.feature_groups

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
        if self.feature_groups != 1:
            out["groups"] = self.feature_groups
        if self.feature is not None:
            out["feature"] = self.feature
        if self.splits is not None:
            out["splits"] = [list(s) for s in self.splits]
        if self.fused is not None:
            out["fused"] = list(self.fused)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Layout:
        """The inverse of :meth:`to_json`.

        >>> lay = Layout((6, 3), "oi", fused=(True, False))
        >>> Layout.from_json(lay.to_json()) == lay
        True
        """
        splits, fused = data.get("splits"), data.get("fused")
        return cls(tuple(data["shape"]), str(data["roles"]),
                   None if splits is None else tuple(tuple(s) for s in splits), str(data.get("kind", "dense")),
                   int(data.get("groups", 1)), data.get("feature"), None if fused is None else tuple(fused))

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
