"""The symbolic kernel of the lazy rewrite and the rules for its views.

:class:`LoraValue` is an adapted kernel kept as ``W0`` (in the current view's shape) and the
factors in canonical order (``A``: ``stack + in + (r,)``, ``B``: ``stack + (r,) + out``), with
``view``: for every axis of the current view of ``W0``, the canonical axes it holds (major
first). A transpose only permutes ``view``; a reshape regroups canonical axes (splitting one
where needed, which reshapes ``A`` or ``B``); ``rev`` reverses canonical axes of the factors;
slices, dynamic slices and gathers of stack axes cut the factors the same way; a sharding
constraint constrains the factors on their matching axes (:func:`factor_specs`). Every rule takes
a jaxpr equation and returns its outputs, or ``None`` when it does not apply (the walker then takes
the lazy mode's fallback, the merged kernel).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from jlora.core.layout import regroup
from jlora.trace import _compat as jaxpr_compat
from jlora.trace._quant import Dequant, apply_dequantized, is_dequant
from jlora.trace._quant import materialise as _dequantized
from jlora.trace._walker import bind as _walker_bind

__all__ = ["LoraValue"]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class LoraValue:
    """A kernel ``W0 + scale * A ⊗ B`` kept in factored form (DoRA: ``factor ⊙ (W0 + scale * A ⊗ B)``).

    ``a`` is ``stack + in + (r,)``, ``b`` is ``stack + (r,) + out`` (``ns`` stack and ``ni`` input
    axes); ``view[j]`` lists the canonical axes (``0 .. ns+ni+no-1``) that axis j of ``w0`` holds.
    ``factor`` (DoRA) is ``m / stop_gradient(||W0 + s·A⊗B||_in)`` with shape ``stack + out``.
    A pytree whose leaves are these arrays, so it passes through ``jax.checkpoint``/``lax.cond``.

    >>> v = LoraValue(jnp.zeros((3, 2)), jnp.ones((3, 1)), jnp.ones((1, 2)), "w", 0, 0, 1, ((0,), (1,)), 2.0)
    >>> v.materialise().tolist()
    [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    """

    w0: Any
    a: Any
    b: Any
    path: str
    index: int
    ns: int
    ni: int
    view: tuple[tuple[int, ...], ...]
    scale: float
    factor: Any = None

    def tree_flatten(self):  # noqa: D102
        return (self.w0, self.a, self.b, self.factor), (self.path, self.index, self.ns, self.ni, self.view, self.scale)

    @classmethod
    def tree_unflatten(cls, aux, children):  # noqa: D102
        w0, a, b, factor = children
        path, index, ns, ni, view, scale = aux
        return cls(w0, a, b, path, index, ns, ni, view, scale, factor)

    @property
    def shape(self) -> tuple[int, ...]:
        """The kernel's (current view's) shape."""
        return tuple(self.w0.shape)

    @property
    def rank(self) -> int:
        """The (possibly block-fused) rank r."""
        return int(self.a.shape[-1])

    @property
    def no(self) -> int:
        """The number of canonical output axes."""
        return self.b.ndim - self.ns - 1

    @property
    def sizes(self) -> tuple[int, ...]:
        """The canonical axes' sizes: ``stack + in + out``."""
        return tuple(self.a.shape[: self.ns + self.ni]) + tuple(self.b.shape[self.ns + 1 :])

    def role(self, c: int) -> str:
        """``'s'``, ``'i'`` or ``'o'`` for canonical axis ``c``."""
        return "s" if c < self.ns else "i" if c < self.ns + self.ni else "o"

    def a_axis(self, c: int) -> int:
        """The axis of A holding canonical (stack or input) axis ``c``."""
        return c

    def b_axis(self, c: int) -> int:
        """The axis of B holding canonical (stack or output) axis ``c``."""
        return c if c < self.ns else c - self.ni + 1

    def factor_axis(self, c: int) -> int:
        """The axis of the DoRA factor (``stack + out``) holding canonical axis ``c``."""
        return c if c < self.ns else c - self.ni

    def replace(self, **kw: Any) -> LoraValue:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **kw)

    def scaled_b(self) -> jax.Array:
        """``scale * B`` in B's dtype (the scale is applied to the tiny factor, not the output)."""
        return self.b * jnp.asarray(self.scale, self.b.dtype)

    def to_view(self, canonical: jax.Array) -> jax.Array:
        """A canonical-order array (``stack + in + out``) in the current view's order and shape."""
        order = [c for axis in self.view for c in axis]
        return canonical.transpose(order).reshape(self.shape)

    def materialise(self) -> jax.Array:
        """``W0 + scale * A ⊗ B`` (times the DoRA factor), summed in float32 (or wider), cast to ``w0``'s dtype."""
        ns, ni = self.ns, self.ni
        sizes = self.sizes
        stack = sizes[:ns]
        w0 = _dequantized(self.w0)  # a quantized base: its float kernel (callers run this inside a checkpoint)
        acc = jnp.promote_types(jnp.float32, jnp.promote_types(w0.dtype, self.a.dtype))
        a = self.a.astype(acc).reshape(stack + (math.prod(sizes[ns : ns + ni]), self.rank))
        b = self.b.astype(acc).reshape(stack + (self.rank, -1))
        d = jnp.matmul(a, b, precision=lax.Precision.HIGHEST) * jnp.asarray(self.scale, acc)
        w = w0.astype(acc) + self.to_view(d.reshape(sizes))
        if self.factor is not None:
            f = self.factor.astype(acc).reshape(stack + (1,) * ni + sizes[ns + ni :])
            w = w * self.to_view(jnp.broadcast_to(f, sizes))
        return w.astype(w0.dtype)

    # --- canonical-axis surgery ------------------------------------------------------------------

    def map_axis(self, c: int, fn: Callable[[jax.Array, int], jax.Array]) -> LoraValue:
        """Applies ``fn(array, axis)`` to every factor array holding canonical axis ``c``."""
        role = self.role(c)
        a = fn(self.a, self.a_axis(c)) if role in "si" else self.a
        b = fn(self.b, self.b_axis(c)) if role in "so" else self.b
        f = self.factor
        if f is not None and role in "so":
            f = fn(f, self.factor_axis(c))
        return self.replace(a=a, b=b, factor=f)

    def split_axis(self, c: int, sizes: Sequence[int]) -> LoraValue:
        """Splits canonical axis ``c`` into ``sizes`` (row-major); ``view`` is renumbered."""
        k = len(sizes)

        def split(x: jax.Array, ax: int) -> jax.Array:
            return x.reshape(x.shape[:ax] + tuple(sizes) + x.shape[ax + 1 :])

        v = self.map_axis(c, split)
        role = self.role(c)
        ns, ni = self.ns + (k - 1) * (role == "s"), self.ni + (k - 1) * (role == "i")
        view = tuple(tuple(q for p in axis for q in ((range(c, c + k)) if p == c else (p + (k - 1) * (p > c),)))
                     for axis in self.view)
        return v.replace(ns=ns, ni=ni, view=view)

    def squeeze_units(self, keep: Sequence[int] = ()) -> LoraValue:
        """Removes every canonical axis of size 1 but those in ``keep`` (the consumers then see only real
        axes; a consumer keeps one it reads, e.g. the one local expert of a ``shard_map`` body)."""
        v = self
        for c in reversed(range(len(self.sizes))):
            if v.sizes[c] == 1 and c not in keep:
                v = v.map_axis(c, lambda x, ax: jnp.squeeze(x, ax))
                role = v.role(c)
                view = tuple(tuple(p - (p > c) for p in axis if p != c) for axis in v.view)
                v = v.replace(ns=v.ns - (role == "s"), ni=v.ni - (role == "i"), view=view)
        return v


def is_lora(x: Any) -> bool:
    """True for a :class:`LoraValue`."""
    return isinstance(x, LoraValue)


def bind(eqn: Any, invals: Sequence[Any], **overrides: Any) -> list[Any]:
    """Binds ``eqn``'s primitive on ``invals`` with its params (``overrides`` replace some).

    A quantized kernel (:class:`~jlora.trace._quant.Dequant`) among ``invals`` is dequantized inside the
    operation (:func:`~jlora.trace._quant.apply_dequantized`), forward and backward."""
    if any(is_dequant(x) for x in invals):
        return apply_dequantized(lambda vals: bind(eqn, vals, **overrides), list(invals))
    return _walker_bind(eqn, invals, **overrides)


def view_of_w0(eqn: Any, invals: Sequence[Any]) -> Any:
    """``eqn`` (a view: cast, reshape, transpose, slice, a pick along stack axes) applied to ``W0`` =
    ``invals[0]``; a quantized ``W0`` records it (dequantized later, at its use)."""
    w0, ops = invals[0], tuple(invals[1:])
    if is_dequant(w0):
        return Dequant(w0.q, w0.views + (eqn,), w0.operands + (ops,))
    return bind(eqn, invals)[0]


def _with_w0(v: LoraValue, eqn: Any, **kw: Any) -> list[Any]:
    return [v.replace(w0=view_of_w0(eqn, [v.w0]), **kw)]


# --- views ---------------------------------------------------------------------------------------

def dtype_view(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    """``convert_element_type`` / ``copy``: only W0 changes."""
    return _with_w0(invals[0], eqn)


def reshape(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    """``reshape`` / ``squeeze`` / ``expand_dims`` / a size-preserving ``broadcast_in_dim``."""
    v = invals[0]
    if len(invals) != 1 or (eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is not None):
        return None
    new = tuple(eqn.outvars[0].aval.shape)
    if math.prod(new) != math.prod(v.shape):
        return None  # a real broadcast
    dims = eqn.params.get("broadcast_dimensions")
    if dims is not None and list(dims) != sorted(dims):
        return None
    state = [v]

    def split(c: int, sizes: tuple[int, int]) -> tuple[list[int], Callable[[int], int]]:
        state[0] = state[0].split_axis(c, sizes)
        return [c, c + 1], lambda p: p + (p > c)

    groups = regroup([c for axis in v.view for c in axis], new, lambda c: state[0].sizes[c], split)
    if groups is None:
        return None
    return _with_w0(state[0], eqn, view=tuple(tuple(g) for g in groups))


def transpose(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    """``transpose``: only ``view`` is permuted."""
    v = invals[0]
    return _with_w0(v, eqn, view=tuple(v.view[p] for p in eqn.params["permutation"]))


def rev(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    """``rev``: reversing a view axis reverses each canonical axis it holds."""
    v = invals[0]
    for j in eqn.params["dimensions"]:
        for c in v.view[j]:
            v = v.map_axis(c, lambda x, ax: lax.rev(x, (ax,)))
    return [v.replace(w0=view_of_w0(eqn, [invals[0].w0]))]


def _stack_of(v: LoraValue, j: int) -> int | None:
    axis = v.view[j]
    return axis[0] if len(axis) == 1 and v.role(axis[0]) == "s" else None


def slice_(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    """``slice`` along stack axes (a range of layers or experts)."""
    v = invals[0]
    p = eqn.params
    strides = p["strides"] or (1,) * len(v.shape)
    out = v
    for j, n in enumerate(v.shape):
        if (p["start_indices"][j], p["limit_indices"][j], strides[j]) == (0, n, 1):
            continue
        c = _stack_of(v, j)
        if c is None:
            return None
        lo, hi, st = p["start_indices"][j], p["limit_indices"][j], strides[j]
        out = out.map_axis(c, lambda x, ax, lo=lo, hi=hi, st=st: lax.slice_in_dim(x, lo, hi, st, ax))
    return [out.replace(w0=view_of_w0(eqn, [v.w0]))]


def dynamic_slice(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    """``dynamic_slice`` along stack axes (``W[i]`` in a loop)."""
    v, starts = invals[0], invals[1:]
    if any(is_lora(s) for s in starts):
        return None
    sizes = eqn.params["slice_sizes"]
    out = v
    for j, n in enumerate(v.shape):
        if sizes[j] == n:
            continue
        c = _stack_of(v, j)
        if c is None:
            return None
        out = out.map_axis(c, lambda x, ax, s=starts[j], k=sizes[j]: lax.dynamic_slice_in_dim(x, s, k, ax))
    return [out.replace(w0=view_of_w0(eqn, [v.w0, *starts]))]


def gather_stack(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    """A gather that picks along stack axes only (``jnp.take(W, i, axis=0)``, ``W[ids]``)."""
    v, idx = invals
    if not is_lora(v) or is_lora(idx):
        return None
    dn = eqn.params["dimension_numbers"]
    sizes = tuple(eqn.params["slice_sizes"])
    picked = sorted(set(dn.start_index_map) | set(dn.collapsed_slice_dims))
    if dn.operand_batching_dims or any(sizes[j] != v.shape[j] for j in range(len(sizes)) if j not in picked):
        return None
    canon = {j: _stack_of(v, j) for j in picked}
    if any(c is None for c in canon.values()):
        return None
    out_nd = len(eqn.outvars[0].aval.shape)
    n_batch = out_nd - len(dn.offset_dims)
    collapsed = sorted(canon[j] for j in dn.collapsed_slice_dims)

    def pick(x: jax.Array) -> jax.Array:
        """The same gather on a factor (canonical stack axis c is its axis c in A, B and the factor)."""
        cs = [canon[j] for j in dn.collapsed_slice_dims]
        d = dn._replace(offset_dims=tuple(range(n_batch, n_batch + x.ndim - len(cs))),
                        collapsed_slice_dims=tuple(sorted(cs)),
                        start_index_map=tuple(canon[j] for j in dn.start_index_map))
        ss = [x.shape[k] for k in range(x.ndim)]
        for j in picked:
            ss[canon[j]] = sizes[j]
        return bind(eqn, [x, idx], dimension_numbers=d, slice_sizes=tuple(ss))[0]

    a, b = pick(v.a), pick(v.b)
    f = None if v.factor is None else pick(v.factor)

    def renum(c: int) -> int:
        return c + n_batch - sum(1 for k in collapsed if k < c)

    kept = [j for j in range(len(v.shape)) if j not in dn.collapsed_slice_dims]
    offset_axes = iter([tuple(renum(c) for c in v.view[j]) for j in kept])
    batch_axes = iter([(k,) for k in range(n_batch)])
    view = tuple(next(offset_axes) if j in dn.offset_dims else next(batch_axes) for j in range(out_nd))
    return [v.replace(w0=view_of_w0(eqn, [v.w0, idx]), a=a, b=b, factor=f, ns=v.ns + n_batch - len(collapsed),
                      view=view)]


def sharding_constraint(eqn: Any, invals: list[Any], ctx: Any) -> list[Any] | None:
    """``with_sharding_constraint`` on the kernel: ``W0`` is constrained, and with a ``NamedSharding``
    each factor axis holding a canonical axis is sharded like the view axis that holds it alone
    (A's input axes like the kernel's input axes, B's output axes like its output axes); the rank
    axis and axes merged with others in the view stay unsharded.

    >>> from jax.sharding import AxisType
    >>> mesh = jax.make_mesh((1,), ("m",), axis_types=(AxisType.Auto,))
    >>> f = lambda w: lax.with_sharding_constraint(w, NamedSharding(mesh, PartitionSpec(None, "m")))
    >>> eqn = jax.make_jaxpr(f)(jnp.ones((3, 2))).eqns[0]
    >>> v = LoraValue(jnp.ones((3, 2)), jnp.ones((3, 1)), jnp.ones((1, 2)), "w", 0, 0, 1, ((0,), (1,)), 1.0)
    >>> sharding_constraint(eqn, [v], None)[0].b.sharding.spec
    P(None, 'm')
    """
    v = invals[0]
    w0 = view_of_w0(eqn, [v.w0])
    s = eqn.params["sharding"]
    if not isinstance(s, NamedSharding):
        return [v.replace(w0=w0)]

    def constrain(x: Any, spec: PartitionSpec | None) -> Any:
        if x is None:
            return None
        named = NamedSharding(s.mesh, spec, memory_kind=s.memory_kind)
        return bind(eqn, [x], **jaxpr_compat.sharding_constraint_params(eqn.params, named))[0]

    a, b, f, _ = factor_specs(v, s.spec)
    return [v.replace(w0=w0, a=constrain(v.a, a), b=constrain(v.b, b), factor=constrain(v.factor, f))]


def factor_specs(v: LoraValue, spec: Sequence[Any]) -> tuple[PartitionSpec, PartitionSpec, Any, bool]:
    """The specs of ``A``, ``B`` and the DoRA factor (None without one) for the kernel's view sharded by
    ``spec``: each factor axis holding a canonical axis that a view axis holds alone is sharded like
    that view axis, every other axis (the rank axis, axes merged in the view) is unsharded; and
    whether that is exact (no view axis holding merged axes is sharded).

    >>> v = LoraValue(jnp.ones((3, 2)), jnp.ones((3, 1)), jnp.ones((1, 2)), "w", 0, 0, 1, ((1,), (0,)), 1.0)
    >>> factor_specs(v, PartitionSpec("m"))
    (P(None, None), P(None, 'm'), None, True)
    """
    spec = tuple(spec) + (None,) * (len(v.shape) - len(spec))
    canon = {axis[0]: spec[j] for j, axis in enumerate(v.view) if len(axis) == 1}
    exact = all(spec[j] is None or len(axis) == 1 for j, axis in enumerate(v.view))
    ns, ni, n = v.ns, v.ni, len(v.sizes)
    stack, outs = [canon.get(c) for c in range(ns)], [canon.get(c) for c in range(ns + ni, n)]
    a = PartitionSpec(*stack, *[canon.get(c) for c in range(ns, ns + ni)], None)
    b = PartitionSpec(*stack, None, *outs)
    return a, b, None if v.factor is None else PartitionSpec(*stack, *outs), exact
