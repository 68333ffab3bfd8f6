"""The :class:`QuantizedArray` leaf: a quantized kernel as a registered pytree node.

Its arrays (codes, scales) are children and its metadata (shape, dtype, scheme, block size, layout)
is static aux data, so a quantized tree goes through ``jax.jit``, ``jax.eval_shape``, orbax and
``jax.device_put`` like any parameter tree. It subclasses :class:`jlora.paths.OpaqueLeaf`, so
:func:`jlora.paths.flatten` sees one leaf at the kernel's path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jlora.core import paths

__all__ = ["QuantizedArray", "is_quantized", "splits_by_layer"]

_CHILDREN = ("codes", "scales", "scales_scale", "scales_offset", "mins")
_AUX = ("shape", "dtype", "scheme", "block_size", "rows", "perm")


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedArray(paths.OpaqueLeaf):
    """A quantized kernel: arrays as pytree children, the rest as static aux data.

    Attributes:
      codes: ``uint8`` (nf4: two 4-bit codes per byte) or ``int8`` (int8) codes.
      scales: nf4: float32 absmax per block, or with double quantization ``uint8`` indices into
        :func:`dynamic_map`; int8: float32 ``absmax / 127``, the kernel's shape with input axes 1.
      scales_scale: double quantization only: float32 absmax per block of 256 scales, else None.
      scales_offset: double quantization only: the float32 mean subtracted from the scales.
      shape: the kernel's shape.
      dtype: the kernel's dtype (what ``dequantize(x, dtype=None)`` returns).
      scheme: ``'nf4'`` or ``'int8'``.
      block_size: nf4 block size (0 for int8).
      rows: nf4 layout: True if the blocks tile the last axis (codes keep the leading axes).
      mins: q4_1 only: float16 minimum per block (``value = q * d + m``), else None.
      perm: GGUF schemes: the kernel is the stored tensor transposed by ``perm`` (None: as stored).

    >>> import jax.numpy as jnp
    >>> from jlora.quant import quantize
    >>> q = quantize({"w": jnp.ones((4, 64))}, "w")["w"]
    >>> q.shape, q.codes.shape, q.scales.shape, q.nbytes
    ((4, 64), (4, 32), (4, 1), 144)
    """

    codes: Any
    scales: Any
    scales_scale: Any
    scales_offset: Any
    shape: tuple[int, ...]
    dtype: Any
    scheme: str
    block_size: int
    rows: bool
    mins: Any = None
    perm: tuple[int, ...] | None = None

    @property
    def ndim(self) -> int:
        """The kernel's number of axes."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """The kernel's number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized arrays (codes and every scale), from their shapes."""
        return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in self._children().values())

    def _children(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in _CHILDREN if getattr(self, n) is not None}

    def __repr__(self) -> str:
        dq = ", double_quant" if self.scales_scale is not None else ""
        bs = f", block_size={self.block_size}" if self.scheme == "nf4" else ""
        tr = f", perm={self.perm}" if self.perm is not None else ""
        return f"QuantizedArray({self.scheme}, shape={self.shape}, dtype={np.dtype(self.dtype).name}{bs}{dq}{tr})"


def _flatten_with_keys(q: QuantizedArray) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
    # always the same five children (None, an empty subtree, where absent), so that the aux data
    # does not depend on the children and tree maps that replace leaves keep the structure
    return [(jax.tree_util.GetAttrKey(n), getattr(q, n)) for n in _CHILDREN], _aux(q)


def _aux(q: QuantizedArray) -> tuple[Any, ...]:
    return (q.shape, np.dtype(q.dtype), q.scheme, q.block_size, q.rows, q.perm)


def _flatten(q: QuantizedArray) -> tuple[list[Any], tuple[Any, ...]]:
    return [getattr(q, n) for n in _CHILDREN], _aux(q)


def _unflatten(aux: tuple[Any, ...], children: Sequence[Any]) -> QuantizedArray:
    return QuantizedArray(**dict(zip(_CHILDREN, children)), **dict(zip(_AUX, aux)))


jax.tree_util.register_pytree_with_keys(QuantizedArray, _flatten_with_keys, _unflatten, _flatten)


def is_quantized(x: Any) -> bool:
    """True for a :class:`QuantizedArray` leaf.

    >>> import jax.numpy as jnp
    >>> from jlora.quant import quantize
    >>> is_quantized(jnp.ones((2, 2))), is_quantized(quantize({"w": jnp.ones((2, 64))}, "w")["w"])
    (False, True)
    """
    return isinstance(x, QuantizedArray)


def splits_by_layer(q: QuantizedArray) -> bool:
    """Whether every array of ``q`` has the kernel's leading axis, so that ``q[i]`` (one stacked layer or
    expert) is the same scheme on ``shape[1:]``: nf4 with row blocks and no double quantization, int8
    with its leading axis not an input axis. ``lax.scan`` over the layers then slices the codes.

    >>> import jax.numpy as jnp
    >>> from jlora.quant import quantize
    >>> splits_by_layer(quantize({"w": jnp.ones((2, 4, 64))}, "w")["w"])
    True
    """
    if not is_quantized(q):
        raise TypeError(f"jlora.quant.splits_by_layer: expected a QuantizedArray, got {type(q).__name__}; fix: pass a "
                        "leaf of jlora.quantize's result")
    if len(q.shape) < 2:
        return False
    if q.scheme == "nf4":
        return q.rows and q.scales_scale is None and len(q.shape) >= 3
    if q.scheme == "int8":
        return q.scales.shape[0] == q.shape[0]
    return False
