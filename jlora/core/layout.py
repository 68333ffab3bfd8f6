"""Kernel layouts (the role of every axis) and the lora-tree node that carries one.

A kernel is a linear map from its *input* axes to its *output* axes, possibly repeated over
*stack* axes (scan layers, heads used as dot batch dimensions, groups of a grouped conv, experts).
:class:`Layout` gives every axis of the stored kernel one role, in whatever order the kernel
stores them; an axis may first be split into sub-axes (a grouped conv's output channels are
``(feature groups, out per group)``). LoRA factors the kernel in the *canonical* order:

- ``A``: ``stack + in + (r,)``,
- ``B``: ``stack + (r,) + out``,
- ``delta = s * A ⊗ B`` (``stack + in + out``), permuted back to the stored order.

A fused kernel (loralib's ``MergedLinear(enable_lora=...)``, ``LoraConfig.fused``) splits its last
canonical output axis into equal groups of which only some adapt; :attr:`Layout.fused` says which,
and :meth:`Layout.expand_fused` turns its partial B into the block-sparse B of the whole kernel.

This module is the ground floor: it imports nothing else of jlora but its helpers
(:mod:`jlora.core._layout`, the :class:`Layout` record; :mod:`jlora.core._regroup`). A kernel's
layout is decided once, at ``jlora.init`` (from the trace, the config, or :func:`layout_without_trace`),
saved with the adapter, and read from here by every other module.
:class:`LoraKernel` is the lora tree's node for one adapted kernel: a dict-like mapping of its
trainable parts (``"A"``, ``"B"``, DoRA's ``"m"``, trained ``"rows"``) that keeps the layout as
static pytree metadata, so it survives ``jax.jit``, ``jax.grad``, optax and ``jax.tree.map``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import jax

from jlora.core._layout import KINDS, ROLES, Layout
from jlora.core._regroup import regroup

__all__ = ["KINDS", "Layout", "LoraKernel", "ROLES", "is_kernel_node", "layout_without_trace", "regroup"]


def layout_without_trace(path: str, shape: Sequence[int], n_stack: int | None = None, n_in: int | None = None,
                         *, roles: str | None = None) -> Layout | str:
    """The one rule that says a kernel's layout without a trace of the model, or why it cannot.

    Stated ``roles`` (one letter per axis) or axis counts (``stack + in + out`` in stored order), or a
    2-D kernel (plus ``n_stack`` stack axes), read as ``(in, out)``, Flax's layout, qualify. The kind
    is the one guess from a name: a kernel whose last path key is ``embedding`` (Flax's ``nn.Embed``)
    is an embedding table. ``jlora.init`` calls it for a kernel with no trace; file formats call it
    for kernels their tensors do not place.

    >>> layout_without_trace("params/embed/embedding", (100, 8)).kind
    'embed'
    >>> layout_without_trace("w", (4, 4, 4))
    'a 3-D kernel (shape (4, 4, 4)) has no unambiguous input/output split without a trace'
    """
    kind = "embed" if path.rsplit("/", 1)[-1] == "embedding" else "dense"
    if roles is not None:
        return Layout(tuple(shape), roles, None, kind)
    stack = n_stack or 0
    if n_in is not None:
        return Layout.plain(shape, stack, n_in, kind)
    if len(shape) - stack == 2:
        return Layout.plain(shape, stack, 1, kind)
    return (f"a {len(shape)}-D kernel (shape {tuple(shape)}) has no unambiguous input/output split "
            "without a trace")


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
        fused = f" fused={self._layout.fused}" if self._layout.fused is not None else ""
        return f"LoraKernel({{{inner}}}, layout={self._layout.roles!r} {self._layout.describe()}{fused})"

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
