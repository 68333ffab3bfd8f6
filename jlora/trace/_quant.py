"""Quantized kernels in the lazy rewrite: dequantized at each use, inside the op, forward and backward.

QLoRA saves memory only if what crosses from the forward pass to the backward pass is the codes and
scales of a quantized kernel, never its float copy. Plain autodiff of ``x·dequantize(codes)`` keeps
the float kernel as the residual for ``dX = dY·W0ᵀ``, so every layer's float kernels stay alive
until the backward pass reaches them. Here a quantized base kernel is a :class:`Dequant` value in the
walker's lazy mode: the :class:`~jlora.quant.QuantizedArray` plus the views the model applies to the kernel
(casts, reshapes, transposes, slices, a ``dynamic_slice`` of a stacked layer). Views are recorded,
not computed. The operation that consumes the kernel runs through :func:`apply_dequantized`, a
custom VJP whose residuals are the codes, scales and the operation's other inputs and whose backward
pass dequantizes again; the plain dense fast path (:func:`jlora.trace._dense.dense_rows`) keeps the
``Dequant`` as its residual in the same way. Each dequantization is tied to the operation's input
(forward) or cotangent (backward) by :func:`dequantize_after`, so XLA can neither hoist it to the
start of the step nor merge the two into one long-lived float kernel.

:func:`jlora.quantized_apply` runs any function of a quantized tree this way (no adapter needed);
calling :func:`jlora.dequantize` inside a differentiated function instead keeps the float kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora.quant import _quant as quant
from jlora.trace._walker import SAME_AXES
from jlora.trace._walker import bind as _bind

__all__ = ["VIEWS", "Dequant", "apply_dequantized", "dequantize_after", "is_dequant", "layers", "materialise", "view"]

#: Primitives recorded as views of a quantized kernel (the first input is the kernel, any other
#: inputs are index arrays); every other primitive consumes it.
VIEWS = SAME_AXES | {"reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose", "rev", "slice",
                     "dynamic_slice"}


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Dequant:
    """A quantized kernel as the model sees it: ``views`` applied to ``dequantize_leaf(q)``, not yet computed.

    ``views`` are jaxpr equations (static); ``operands[k]`` are the extra array inputs of view ``k``
    (a ``dynamic_slice``'s start indices). A pytree whose leaves are the codes, scales and operands,
    so it passes through ``jax.checkpoint``, ``lax.cond`` and custom VJPs as integers and scales.

    >>> import jax.numpy as jnp
    >>> q = quant.quantize({"w": jnp.full((2, 64), 0.5)}, "w", scheme="int8")["w"]
    >>> d = Dequant(q)
    >>> d.shape, d.dtype, materialise(d)[1, :2].tolist()
    ((2, 64), dtype('float32'), [0.5, 0.5])
    """

    q: Any
    views: tuple[Any, ...] = ()
    operands: tuple[tuple[Any, ...], ...] = ()

    def tree_flatten(self):  # noqa: D102
        return (self.q, self.operands), self.views

    @classmethod
    def tree_unflatten(cls, views, children):  # noqa: D102
        return cls(children[0], views, children[1])

    @property
    def aval(self) -> Any:
        """Shape and dtype of the current view."""
        if self.views:
            return self.views[-1].outvars[0].aval
        return jax.ShapeDtypeStruct(tuple(self.q.shape), self.q.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        """The current view's shape."""
        return tuple(self.aval.shape)

    @property
    def dtype(self) -> Any:
        """The current view's dtype."""
        return self.aval.dtype

    @property
    def ndim(self) -> int:
        """The current view's number of axes."""
        return len(self.shape)


def is_dequant(x: Any) -> bool:
    """True for a :class:`Dequant` value."""
    return isinstance(x, Dequant)


def materialise(x: Any) -> Any:
    """The float kernel of a :class:`Dequant` (dequantized, views applied); anything else as it is.

    Called outside :func:`apply_dequantized` its result is an ordinary value that autodiff may keep:
    use it only where nothing is differentiated through the kernel, or the kernel is small.
    """
    if not is_dequant(x):
        return x
    w = quant.dequantize_leaf(x.q, None)
    for eqn, ops in zip(x.views, x.operands):
        w = _bind(eqn, [w, *ops])[0]
    return w


def view(eqn: Any, invals: Sequence[Any]) -> Dequant | None:
    """``eqn`` recorded as a view of the :class:`Dequant` ``invals[0]``; None if ``eqn`` is no view of it."""
    d, ops = invals[0], tuple(invals[1:])
    if eqn.primitive.name not in VIEWS or not is_dequant(d) or any(is_dequant(o) for o in ops):
        return None
    return Dequant(d.q, d.views + (eqn,), d.operands + (ops,))


def apply_dequantized(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``fn(tree)`` with every :class:`Dequant` in ``tree`` (also inside a LoraValue) dequantized inside
    the operation: a custom VJP whose residuals are the codes, scales and the other inputs, and whose
    backward pass dequantizes again (:func:`dequantize_after`) and differentiates ``fn`` with respect to the
    other inputs (the quantized kernels get no cotangent: they are frozen).

    >>> import jax.numpy as jnp
    >>> q = quant.quantize({"w": jnp.eye(64)}, "w", scheme="int8")["w"]
    >>> apply_dequantized(lambda t: t[0] @ t[1], (jnp.ones((1, 64)), Dequant(q)))[0, :3].tolist()
    [1.0, 1.0, 1.0]
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_dequant)
    at = [i for i, x in enumerate(leaves) if is_dequant(x)]
    if not at:
        return fn(tree)
    rest = [i for i in range(len(leaves)) if i not in at]

    def call(kernels: Sequence[Any], others: Sequence[Any]) -> Any:
        full = list(leaves)
        for i, w in zip(at, kernels):
            full[i] = w
        for i, x in zip(rest, others):
            full[i] = x
        return fn(jax.tree_util.tree_unflatten(treedef, full))

    @jax.custom_vjp
    def op(deqs: tuple[Any, ...], others: tuple[Any, ...]) -> Any:
        return call([dequantize_after(d, others) for d in deqs], others)

    def fwd(deqs: tuple[Any, ...], others: tuple[Any, ...]) -> tuple[Any, Any]:
        return op(deqs, others), (deqs, others)

    def bwd(res: Any, ct: Any) -> tuple[None, Any]:
        deqs, others = res
        kernels = [dequantize_after(d, ct) for d in deqs]
        return None, jax.vjp(lambda o: call(kernels, o), others)[1](ct)[0]

    op.defvjp(fwd, bwd)
    return op(tuple(leaves[i] for i in at), tuple(leaves[i] for i in rest))


def dequantize_after(x: Any, after: Any) -> Any:
    """The float kernel of a :class:`Dequant`, computed once ``after`` exists (the op's input in the
    forward pass, its cotangents in the backward pass); anything else as it is.

    Without it XLA schedules every dequantization as early as it can (all layers' float kernels
    alive at the start of the step) and merges the backward pass's with the forward pass's (alive
    from the forward to the backward pass); XLA:CPU drops optimization barriers before its last
    common-subexpression pass, so a barrier does not prevent either. Instead each of the kernel's
    arrays is read through a ``dynamic_slice`` of all but its last element whose start is
    ``min(bits of an element of after, 0)`` (a copy of the codes and scales: an eighth of the float
    kernel for nf4):
    always 0 (a negative start is clamped), unknown to the compiler, and available only once
    ``after`` is.
    """
    if not is_dequant(x):
        return x
    floats = [c for c in jax.tree_util.tree_leaves(after) if jnp.issubdtype(c.dtype, jnp.floating) and c.size]
    if not floats:
        return materialise(x)
    bits = lax.bitcast_convert_type(floats[0].reshape(-1)[0].astype(jnp.float32), jnp.int32)
    zero = jnp.minimum(bits, 0)

    def tie(arr: jax.Array) -> jax.Array:  # every array: no part of the dequantization can move or merge
        flat = arr.reshape(-1)
        if flat.shape[0] < 2:  # a scalar (the double-quant offset): nothing worth keeping apart
            return arr
        head = lax.dynamic_slice_in_dim(flat, zero, flat.shape[0] - 1)  # flat[:-1]: the start is 0 after clamping
        return jnp.concatenate([head, flat[-1:]]).reshape(arr.shape)

    tied = {k: tie(v) for k, v in x.q._children().items()}
    return materialise(Dequant(dataclasses.replace(x.q, **tied), x.views, x.operands))


def layers(d: Dequant, length: int) -> tuple[dict[str, Any], Callable[[dict[str, Any]], Dequant]] | None:
    """``(xs, step)`` for ``lax.scan`` over the leading (layer) axis of a quantized kernel: ``xs`` its
    arrays, each with that leading axis, and ``step(one layer's arrays)`` the layer's :class:`Dequant`.
    None where the arrays do not split by layer (a view applied first, or a layout whose blocks or
    scales span layers: :func:`jlora.quant.splits_by_layer`).

    >>> import jax.numpy as jnp
    >>> q = quant.quantize({"w": jnp.ones((3, 4, 64))}, "w")["w"]
    >>> xs, step = layers(Dequant(q), 3)
    >>> step({k: v[0] for k, v in xs.items()}).shape
    (4, 64)
    """
    q = d.q
    if d.views or len(q.shape) < 2 or q.shape[0] != length or not quant.splits_by_layer(q):
        return None

    def step(arrays: dict[str, Any]) -> Dequant:
        return Dequant(dataclasses.replace(q, shape=tuple(q.shape[1:]), **arrays))

    return q._children(), step
