"""QLoRA: a quantized frozen base (NF4 or int8) that the LoRA factors train on top of.

:func:`quantize` turns chosen float kernels of the frozen tree into :class:`QuantizedArray`
leaves and :func:`dequantize` turns them back. A ``QuantizedArray`` is a registered pytree node:
its arrays (codes, scales) are children and its metadata (shape, dtype, scheme, block size,
layout) is static aux data, so a quantized tree goes through ``jax.jit``, ``jax.eval_shape``,
orbax and ``jax.device_put`` like any parameter tree. :func:`jlora.paths.flatten` sees it as one
leaf at the kernel's path (it subclasses :class:`jlora.paths.OpaqueLeaf`), so targets, lora
trees, ``adapted`` and summaries use the kernel's own path; its children are named ``codes``,
``scales``, ``scales_scale``, ``scales_offset`` (never ``A``/``B``).

Schemes (``w`` is a kernel of shape ``stack + in + out``):

- ``'nf4'`` (QLoRA, bitsandbytes' ``quantize_4bit``): the kernel is flattened in row-major order
  and cut into blocks of ``block_size`` (64) consecutive elements; each block stores its absmax
  (float32) and 4-bit indices into the 16-level NF4 code book :data:`NF4_CODE` (bitsandbytes'
  exact values), nearest level by comparing ``w * (1 / absmax)`` with the 15 midpoints (as
  bitsandbytes' kernel does). Two codes per ``uint8``, the first element in the high nibble.
  Dequantized value: ``NF4_CODE[code] * absmax``; its error is at most half the largest gap
  between adjacent levels times absmax (``0.1519 * absmax``, the gap from -1 to -0.696).
  Layout: if ``block_size`` divides the last (output) axis, codes have shape
  ``shape[:-1] + (shape[-1] // 2,)`` and absmax ``shape[:-1] + (shape[-1] // block_size,)``
  (the same blocks as the flat layout, but the kernel's leading axes are kept, so a sharding of
  the kernel applies to them: see :func:`quantized_sharding`). Otherwise the flattened kernel is
  zero-padded to a whole number of blocks (zeros never raise a block's absmax, so the values are
  those of bitsandbytes' partial last block, which, as there, is scaled by a true division
  ``w / absmax`` with its absmax at least 1e-38) and codes are ``(n_blocks, block_size // 2)``,
  absmax ``(n_blocks,)``.
- ``double_quant=True`` (QLoRA's double quantization, bitsandbytes' ``compress_statistics``):
  the float32 absmax values are flattened, their mean is subtracted (``scales_offset``, a float32
  scalar) and they are quantized blockwise (blocks of 256, one float32 absmax per block in
  ``scales_scale``) to 8-bit indices into bitsandbytes' signed dynamic map
  (:func:`dynamic_map`): 0.5 + 1/64 + 4/16384 bytes per weight instead of 0.5 + 4/64. Codes,
  block absmax, offset and dequantized values are bit-identical to bitsandbytes'
  ``quantize_4bit(..., compress_statistics=True)`` on the CPU: its float32 mean (PyTorch's summation
  order), its 65536-point code table instead of the exactly nearest level, its two roundings when
  dequantizing (:mod:`jlora.quant._dq`).
- ``'int8'``: per-output-channel absmax. The scale is ``absmax / 127`` over the kernel's *input*
  axes, one per output unit (and per stacked layer): ``scales`` has the kernel's shape with the
  input axes of size 1. The input axes are the ones a :class:`~jlora.LoraConfig` states for the
  path (``stack``/``axes``), else every axis but the last. ``codes = round(w / scale)`` in
  [-127, 127] (int8); error ``<= absmax / 254`` per channel (plus one float32 rounding).
- ``'q8_0'``, ``'q4_0'``, ``'q4_1'``: GGML/GGUF blocks of 32 values along one input axis, float16
  scale (and q4_1 minimum) per block, codes packed as the file packs them (:mod:`jlora.quant._gguf`;
  dequantization bit-identical to ``gguf.quants.dequantize``). :func:`from_gguf` keeps a GGUF
  file's own blocks (no re-quantization); :func:`quantize` makes them from a float kernel as
  llama.cpp does. The blocks are stored as GGUF stores them (``(*rows, n_blocks, ...)``, blocked
  axis last); ``perm`` transposes the stored tensor into the kernel (``(1, 0)`` for a Flax
  ``(in, out)`` kernel read from a GGUF ``(out, in)`` weight).

Quantization runs in float32 whatever the kernel's dtype; :func:`dequantize` returns float32 by
default (``dtype=None``: the kernel's original dtype). With a quantized base, ``jlora.merge``
needs ``into='float'``; :func:`jlora.lora_apply` (and :func:`jlora.quantized_apply` for a function
with no adapter) dequantizes each kernel inside every operation that uses it, in the forward and again
in the backward pass (:mod:`jlora.trace._quant`): no float copy of the base is kept across the step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import _checks as checks
from jlora.core import paths
from jlora.quant import _dq as quant_dq
from jlora.quant import _gguf as quant_gguf
from jlora.core._config import LoraConfig
from jlora.core.layout import Layout
from jlora.quant._dq import dynamic_map

__all__ = [
    "NF4_CODE",
    "QuantizedArray",
    "dequantize",
    "dequantize_leaf",
    "dynamic_map",
    "from_gguf",
    "is_quantized",
    "quant_report",
    "quantize",
    "quantized_sharding",
    "splits_by_layer",
]

SCHEMES = ("nf4", "int8") + quant_gguf.SCHEMES

#: The 16 NF4 levels, bitsandbytes' exact float32 values (``get_4bit_type('nf4')``; QLoRA, eq. 4).
NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def _midpoints(code: np.ndarray) -> np.ndarray:
    return ((code[:-1].astype(np.float32) + code[1:].astype(np.float32)) / np.float32(2)).astype(np.float32)


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


def splits_by_layer(q: QuantizedArray) -> bool:
    """Whether every array of ``q`` has the kernel's leading axis, so that ``q[i]`` (one stacked layer or
    expert) is the same scheme on ``shape[1:]``: nf4 with row blocks and no double quantization, int8
    with its leading axis not an input axis. ``lax.scan`` over the layers then slices the codes.

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


def is_quantized(x: Any) -> bool:
    """True for a :class:`QuantizedArray` leaf.

    >>> is_quantized(jnp.ones((2, 2))), is_quantized(quantize({"w": jnp.ones((2, 64))}, "w")["w"])
    (False, True)
    """
    return isinstance(x, QuantizedArray)


# --- NF4 -----------------------------------------------------------------------------------------

def _nearest(xn: jax.Array, code: np.ndarray) -> jax.Array:
    """Index of the nearest level: the number of midpoints strictly below ``xn``."""
    return jnp.searchsorted(jnp.asarray(_midpoints(code)), xn, side="left").astype(jnp.uint8)


def _blockwise(x: jax.Array, code: np.ndarray, partial: int = 0) -> tuple[jax.Array, jax.Array]:
    """Codes and float32 absmax of ``x`` (..., block): nearest level of ``x * (1 / absmax)``.

    ``partial``: the number of real values in the last block of a flat ``x`` (blocks, block) that
    does not fill it (0: none). bitsandbytes scales that block by a true division and clamps its
    absmax at 1e-38, so this does too (the barrier keeps XLA from turning the division by a
    broadcast into a multiplication by the reciprocal)."""
    absmax = jnp.max(jnp.abs(x), axis=-1)
    inv = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0).astype(jnp.float32)
    xn = x * inv[..., None]
    if partial:  # (a select, not a max: XLA's CPU code flushes the subnormal 1e-38 to 0 in arithmetic)
        last = absmax[-1]
        div = x[-1] / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.where(last > 0, last, 1.0), x[-1].shape))
        xn = xn.at[-1].set(jnp.where(last > 0, div, 0.0))
        absmax = absmax.at[-1].set(jnp.where(last > 0, last, jnp.float32(1e-38)))
    return _nearest(xn, code), absmax


def _nf4_blocks(w: jax.Array, shape: tuple[int, ...], bs: int) -> tuple[jax.Array, bool]:
    x = w.astype(jnp.float32)
    if shape[-1] % bs == 0:
        return x.reshape(shape[:-1] + (shape[-1] // bs, bs)), True
    n = math.prod(shape)
    nb = -(-n // bs)
    return jnp.pad(x.reshape(-1), (0, nb * bs - n)).reshape(nb, bs), False




@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _nf4(w: jax.Array, shape: tuple[int, ...], bs: int, dq: bool, dtype: Any) -> QuantizedArray:
    blocks, rows = _nf4_blocks(w, shape, bs)
    idx, absmax = _blockwise(blocks, np.asarray(NF4_CODE, np.float32), 0 if rows else math.prod(shape) % bs)
    pairs = idx.reshape(idx.shape[:-1] + (bs // 2, 2))
    packed = (pairs[..., 0] << 4) | pairs[..., 1]
    lead = shape[:-1] if rows else (blocks.shape[0],)
    codes = packed.reshape(lead + (-1,))
    if dq:
        q, s2, offset = quant_dq.double_quantize(absmax)
        return QuantizedArray(codes, q, s2, offset, shape, dtype, "nf4", bs, rows)
    return QuantizedArray(codes, absmax, None, None, shape, dtype, "nf4", bs, rows)


def _nf4_absmax(q: QuantizedArray) -> jax.Array:
    if q.scales_scale is None:
        return q.scales
    return quant_dq.dequantize_absmax(q.scales, q.scales_scale, q.scales_offset)


def _nf4_dequant(q: QuantizedArray) -> jax.Array:
    code = jnp.asarray(np.asarray(NF4_CODE, np.float32))
    c = q.codes
    idx = jnp.stack([c >> 4, c & 15], axis=-1).astype(jnp.int32)
    absmax = _nf4_absmax(q)
    vals = code[idx.reshape(absmax.shape + (q.block_size,))] * absmax[..., None]
    n = q.size
    return vals.reshape(-1)[:n].reshape(q.shape)


# --- int8 ----------------------------------------------------------------------------------------

def _in_axes(path: str, shape: tuple[int, ...], config: LoraConfig | None,
             layouts: Mapping[str, Layout] | None = None) -> tuple[int, ...]:
    """The stored axes that are inputs only (the int8 scale is one per everything else)."""
    lay = (layouts or {}).get(path)
    roles = lay.stored_roles() if lay is not None else (config.layout_for(path) if config is not None else None)
    if roles is not None:
        if len(roles) != len(shape):
            raise ValueError(f"jlora.quant.quantize: layout roles {roles!r} of {path!r} do not fit shape {shape}")
        return tuple(k for k, r in enumerate(roles) if set(r) == {"i"})
    n_stack = (config.stack_for(path) if config is not None else None) or 0
    n_in = config.axes_for(path) if config is not None else None
    if n_in is None:
        n_in = len(shape) - 1 - n_stack
    if n_in < 1 or n_stack + n_in >= len(shape):
        raise ValueError(
            f"jlora.quant.quantize: kernel {path!r} of shape {shape} cannot have {n_stack} stacked and "
            f"{n_in} input axes (at least one input and one output axis are needed); fix the config's "
            "stack/axes rule for this path"
        )
    return tuple(range(n_stack, n_stack + n_in))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _int8(w: jax.Array, shape: tuple[int, ...], in_axes: tuple[int, ...], dtype: Any) -> QuantizedArray:
    x = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=in_axes, keepdims=True) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8)
    return QuantizedArray(codes, scale, None, None, shape, dtype, "int8", 0, True)


# --- GGUF blocks (q8_0, q4_0, q4_1; the codec is jlora.quant._gguf) ------------------------------

@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _gguf(w: jax.Array, shape: tuple[int, ...], axis: int, scheme: str, dtype: Any) -> QuantizedArray:
    codes, scales, mins, perm = quant_gguf.quantize_kernel(w, axis, scheme)
    return QuantizedArray(codes, scales, None, None, shape, dtype, scheme, quant_gguf.BLOCK, True, mins, perm)


def _block_axis(path: str, shape: tuple[int, ...], config: LoraConfig | None,
                layouts: Mapping[str, Layout] | None) -> int:
    """GGUF blocks run along the kernel's last input axis (GGUF's ``ne0`` of a matmul weight)."""
    axis = _in_axes(path, shape, config, layouts)[-1]
    if shape[axis] % quant_gguf.BLOCK:
        raise ValueError(
            f"jlora.quant.quantize: GGUF blocks of {quant_gguf.BLOCK} run along the input axis {axis} of {path!r} "
            f"(shape {shape}), whose size {shape[axis]} is not a multiple of {quant_gguf.BLOCK}; fix: scheme='nf4' "
            "or 'int8' for this kernel, or exclude it"
        )
    return axis


def from_gguf(data: np.ndarray, scheme: str, *, perm: Sequence[int] | None = None, dtype: Any = jnp.float32
              ) -> QuantizedArray:
    """A GGUF tensor's own blocks as a :class:`QuantizedArray` (no re-quantization).

    Args:
      data: the tensor's bytes as ``gguf.GGUFReader`` gives them (``tensor.data``: uint8
        ``(*rows, n // 32 * bytes_per_block)``; rows may be permuted first, blocks stay whole).
      scheme: ``'q8_0'``, ``'q4_0'`` or ``'q4_1'`` (``tensor.tensor_type.name.lower()``).
      perm: the kernel is the stored tensor ``(*rows, n)`` transposed by ``perm``; None keeps the
        stored order. ``(1, 0)`` turns a GGUF ``(out, in)`` weight into a Flax ``(in, out)`` kernel.
      dtype: what :func:`dequantize_leaf` returns with ``dtype=None``.

    >>> raw = np.zeros((3, 2 * 34), np.uint8)                 # 3 rows of 64 values, q8_0 bytes
    >>> q = from_gguf(raw, "q8_0", perm=(1, 0))
    >>> q, q.nbytes
    (QuantizedArray(q8_0, shape=(64, 3), dtype=float32, perm=(1, 0)), 204)
    """
    codes, scales, mins = quant_gguf.split_blocks(data, scheme)
    stored = codes.shape[:-2] + (codes.shape[-2] * quant_gguf.BLOCK,)
    if perm is not None:
        perm = tuple(int(a) for a in perm)
        if sorted(perm) != list(range(len(stored))):
            raise ValueError(f"jlora.quant.from_gguf: perm must be a permutation of the {len(stored)} axes of the "
                             f"stored tensor {stored}, got {perm}; fix: e.g. perm=(1, 0) for a 2-D weight")
        perm = None if perm == tuple(range(len(stored))) else perm
    shape = stored if perm is None else tuple(stored[a] for a in perm)
    arrays = [None if a is None else jnp.asarray(a) for a in (codes, scales, mins)]
    return QuantizedArray(arrays[0], arrays[1], None, None, shape, np.dtype(dtype), scheme, quant_gguf.BLOCK, True,
                          arrays[2], perm)


# --- public API ----------------------------------------------------------------------------------

def _rules(rules_or_config: Any) -> tuple[tuple[str, ...], tuple[str, ...], LoraConfig | None]:
    if isinstance(rules_or_config, LoraConfig):
        return rules_or_config.targets, rules_or_config.exclude, rules_or_config
    if isinstance(rules_or_config, str):
        rules_or_config = (rules_or_config,)
    if not (isinstance(rules_or_config, Sequence) and rules_or_config
            and all(isinstance(r, str) for r in rules_or_config)):
        raise TypeError(
            "jlora.quant.quantize: rules_or_config must be a jlora.LoraConfig (its targets are quantized), "
            f"a regex string or a non-empty sequence of them, got {rules_or_config!r}; "
            "fix: e.g. quantize(frozen, r'.*/kernel')"
        )
    for r in rules_or_config:
        try:
            re.compile(r)
        except re.error as err:
            raise ValueError(f"jlora.quant.quantize: {r!r} is not a valid regex ({err})") from None
    return tuple(rules_or_config), (), None


def _check_leaf(path: str, leaf: Any) -> None:
    if is_quantized(leaf):
        raise ValueError(
            f"jlora.quant.quantize: {path!r} is already quantized ({leaf!r}); fix: narrow the regex, or "
            "dequantize it first (quantizing twice compounds the error)"
        )
    shape = tuple(getattr(leaf, "shape", ()))
    dtype = getattr(leaf, "dtype", None)
    if len(shape) < 2 or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        what = f"shape {shape}, dtype {dtype if dtype is not None else type(leaf).__name__}"
        raise ValueError(
            f"jlora.quant.quantize: {path!r} ({what}) is not a float kernel: quantization applies to float "
            "arrays with at least 2 axes; fix: narrow the regex so it matches only kernels (biases, norms "
            "and scalars stay in float)"
        )


def quantize(frozen: Any, rules_or_config: LoraConfig | str | Sequence[str], *, scheme: str = "nf4",
             block_size: int = 64, double_quant: bool = False, layouts: Mapping[str, Layout] | None = None) -> Any:
    """Quantizes the chosen kernels of a frozen tree; every other leaf is returned as is.

    Pure and jit-able (the settings are static) and works on ``jax.ShapeDtypeStruct`` trees
    under ``jax.eval_shape``. A concrete kernel with a ``NamedSharding`` gives codes and scales
    the sharding :func:`quantized_sharding` derives from it (under ``jax.jit``, XLA propagates
    the kernel's sharding; pin it with ``out_shardings`` built from :func:`quantized_sharding`).

    Args:
      frozen: the base parameter tree (Linen dict, nested dicts; arrays or abstract shapes).
      rules_or_config: a :class:`~jlora.LoraConfig` (its ``targets`` minus ``exclude`` are
        quantized, and for int8 its ``stack``/``axes`` rules give the input axes) or regexes
        (``re.fullmatch`` against canonical paths).
      scheme: ``'nf4'`` (4-bit NormalFloat, blockwise absmax), ``'int8'`` (per output channel) or a
        GGUF block type ``'q8_0'``, ``'q4_0'``, ``'q4_1'`` (blocks of 32 along the kernel's last input
        axis, bit-identical to ``gguf.quants.quantize`` of the kernel with that axis moved last).
      block_size: nf4 block size, a positive even number (bitsandbytes: 64). If it does not divide
        the kernel's size the flattened kernel is zero-padded to whole blocks.
      double_quant: nf4 only: quantize the absmax scales to 8 bits (blocks of 256, mean removed).
      layouts: int8 and GGUF schemes: ``{path: Layout}`` (e.g. ``jlora.adapt._tree.kernel_layouts(lora)``): the scale is one
        per stack/output position, reduced over the kernel's input axes in whatever order it stores them
        (default: the config's ``layout``/``stack``/``axes`` rules, else all axes but the last).

    Returns:
      ``frozen`` with a :class:`QuantizedArray` at each chosen kernel's path.

    >>> frozen = {"dense": {"kernel": jnp.linspace(-1, 1, 256).reshape(2, 128), "bias": jnp.zeros(128)}}
    >>> q = quantize(frozen, r".*/kernel")
    >>> q["dense"]["kernel"]
    QuantizedArray(nf4, shape=(2, 128), dtype=float32, block_size=64)
    >>> float(jnp.max(jnp.abs(dequantize(q["dense"]["kernel"]) - frozen["dense"]["kernel"]))) < 0.152
    True
    """
    if scheme not in SCHEMES:
        raise ValueError(f"jlora.quant.quantize: scheme must be one of {SCHEMES}, got {scheme!r}; fix: scheme='nf4' "
                         "(QLoRA), 'int8' or a GGUF block type ('q8_0', 'q4_0', 'q4_1')")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(
            f"jlora.quant.quantize: block_size must be a positive even int (two 4-bit codes per byte), "
            f"got {block_size!r}; fix: block_size=64 (bitsandbytes' default)"
        )
    if not isinstance(double_quant, bool):
        raise TypeError(f"jlora.quant.quantize: double_quant must be a bool, got {double_quant!r}")
    if double_quant and scheme != "nf4":
        raise ValueError(
            "jlora.quant.quantize: double_quant=True applies to scheme='nf4' (it quantizes the blockwise "
            "absmax scales); int8 keeps one float32 scale per output channel. Fix: drop double_quant"
        )
    targets, exclude, config = _rules(rules_or_config)
    flat = paths.flatten(frozen)
    for r in targets + exclude:
        if not any(re.fullmatch(r, p) for p in flat):
            raise ValueError(
                f"jlora.quant.quantize: {r!r} matched no parameter; closest paths: "
                f"{', '.join(paths.closest(r, flat))}. Fix the regex (it must match a whole path, re.fullmatch)"
            )
    chosen = {p for p in flat if paths.matches(targets, p) and not paths.matches(exclude, p)}
    for p in sorted(chosen):
        _check_leaf(p, flat[p])

    def one(path: str, w: Any) -> Any:
        if path not in chosen:
            return w
        shape, dtype = tuple(w.shape), np.dtype(w.dtype)
        if scheme == "nf4":
            q = _nf4(jnp.asarray(w), shape, block_size, double_quant, dtype)
        elif scheme in quant_gguf.SCHEMES:
            q = _gguf(jnp.asarray(w), shape, _block_axis(path, shape, config, layouts), scheme, dtype)
        else:
            q = _int8(jnp.asarray(w), shape, _in_axes(path, shape, config, layouts), dtype)
        sharding = getattr(w, "sharding", None)
        if isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer) and isinstance(
                sharding, jax.sharding.NamedSharding):
            q = jax.device_put(q, quantized_sharding(q, sharding))
        return q

    return paths.map_with_path(one, frozen)


def dequantize_leaf(q: QuantizedArray, dtype: Any = None) -> jax.Array:
    """The float kernel of one :class:`QuantizedArray`, as traceable jnp code (no jit of its own).

    The one place that knows how each scheme dequantizes: :func:`dequantize`, merge and the
    per-use dequantization inside :func:`jlora.lora_apply` all call it. ``dtype=None``: the
    kernel's original dtype.

    >>> q = quantize({"w": jnp.full((2, 64), 0.25)}, "w")["w"]
    >>> dequantize_leaf(q, jnp.float32)[0, :2].tolist()
    [0.25, 0.25]
    """
    if not is_quantized(q):
        raise TypeError(f"jlora.quant.dequantize_leaf: expected a QuantizedArray, got {type(q).__name__}; fix: "
                        "jlora.dequantize(tree) dequantizes every quantized leaf of a tree")
    if q.scheme in quant_gguf.SCHEMES:
        x = quant_gguf.dequantize_kernel(q.codes, q.scales, q.mins, q.scheme, q.perm)
    else:
        x = _nf4_dequant(q) if q.scheme == "nf4" else q.codes.astype(jnp.float32) * q.scales
    return x.astype(q.dtype if dtype is None else dtype)


_leaf_dequant = jax.jit(dequantize_leaf, static_argnums=1)


def dequantize(tree_or_leaf: Any, dtype: Any = jnp.float32) -> Any:
    """Float kernels back from :class:`QuantizedArray` leaves (a leaf, or every one in a tree).

    Args:
      tree_or_leaf: a ``QuantizedArray`` or a tree containing some; other leaves pass through.
      dtype: the result's dtype (default float32); ``None``: each kernel's original dtype.

    >>> q = quantize({"w": jnp.full((2, 64), 0.5)}, "w", scheme="int8")
    >>> dequantize(q)["w"][0, :3].tolist()
    [0.5, 0.5, 0.5]
    """
    dtype = checks.float_dtype("jlora.quant.dequantize", dtype)
    if is_quantized(tree_or_leaf):
        return _leaf_dequant(tree_or_leaf, dtype)
    return jax.tree_util.tree_map(lambda x: _leaf_dequant(x, dtype) if is_quantized(x) else x,
                                  tree_or_leaf, is_leaf=is_quantized)


def quantized_sharding(q: QuantizedArray, sharding: jax.sharding.NamedSharding) -> QuantizedArray:
    """Shardings for the arrays of ``q`` derived from its kernel's ``NamedSharding``.

    int8: codes take the kernel's spec and scales the same spec with the input axes replicated.
    nf4 with the row layout (``block_size`` divides the last axis): codes and absmax keep the
    kernel's spec on the leading axes and on the last (output) axis when its shortened size
    (``out // 2``, ``out // block_size``) still divides by the mesh axes; else that axis is
    replicated. The flat nf4 layout and the double-quantization arrays are replicated. GGUF schemes:
    the stored rows keep their kernel axes' entries, the blocked axis's entry goes to the block
    count when it divides (else replicated), the axis inside a block is replicated; q4_1 minimums
    shard like the scales.

    Returns:
      a ``QuantizedArray`` with the same structure whose children are ``NamedSharding``\\ s (a valid
      ``out_shardings``/``jax.device_put`` target).

    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    >>> q = quantize({"w": jnp.ones((4, 128))}, "w")["w"]
    >>> tuple(quantized_sharding(q, NamedSharding(mesh, P(None, "x"))).codes.spec)
    (None, 'x')
    """
    if not isinstance(q, QuantizedArray) or not isinstance(sharding, jax.sharding.NamedSharding):
        raise TypeError(
            f"quantized_sharding: expected (QuantizedArray, NamedSharding), got ({type(q).__name__}, "
            f"{type(sharding).__name__}); fix: quantized_sharding(frozen_q[path], NamedSharding(mesh, P(...)))"
        )
    mesh = sharding.mesh
    spec = tuple(sharding.spec) + (None,) * (len(q.shape) - len(tuple(sharding.spec)))

    def size(entry: Any) -> int:
        names = entry if isinstance(entry, tuple) else (entry,)
        return math.prod(mesh.shape[n] for n in names if n is not None)

    def fit(arr_shape: tuple[int, ...], entries: tuple[Any, ...]) -> jax.sharding.NamedSharding:
        fixed = tuple(e if e is None or d % size(e) == 0 else None for d, e in zip(arr_shape, entries))
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*fixed))

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if q.scheme in quant_gguf.SCHEMES:
        codes_spec, scales_spec = quant_gguf.stored_entries(spec, q.perm)
        codes, scales = fit(tuple(q.codes.shape), codes_spec), fit(tuple(q.scales.shape), scales_spec)
        return dataclasses.replace(q, codes=codes, scales=scales, mins=None if q.mins is None else scales)
    if q.scheme == "int8":
        scale_spec = tuple(None if q.scales.shape[i] == 1 and q.shape[i] != 1 else e for i, e in enumerate(spec))
        codes, scales = fit(q.shape, spec), fit(tuple(q.scales.shape), scale_spec)
    elif q.rows:
        codes = fit(tuple(q.codes.shape), spec)
        scales = fit(tuple(q.scales.shape), spec) if q.scales_scale is None else replicated
    else:
        codes = scales = replicated
    extra = replicated if q.scales_scale is not None else None
    return dataclasses.replace(q, codes=codes, scales=scales, scales_scale=extra, scales_offset=extra)


def quant_report(shape: tuple[int, ...] = (1024, 1024), seed: int = 0) -> dict[str, dict[str, float]]:
    """Bytes and errors of each scheme on a random normal float32 kernel (for benchmarks/README).

    For ``nf4``, ``nf4+dq`` (double quantization) and ``int8``: ``bytes_ratio`` (quantized bytes,
    scales included, over float32 bytes), ``max_err_over_absmax`` (the largest |error| divided by
    its block's or channel's absmax), ``rel_rmse`` (RMS error over RMS weight) and, for ``nf4+dq``,
    ``scale_rel_err`` (the largest relative error of the dequantized absmax scales).

    >>> r = quant_report((64, 128))
    >>> r["nf4"]["bytes_ratio"], round(r["int8"]["bytes_ratio"], 4)
    (0.140625, 0.2656)
    """
    w = jax.random.normal(jax.random.key(seed), tuple(shape), jnp.float32) * 0.02
    out: dict[str, dict[str, float]] = {}
    for name, kw in (("nf4", {"scheme": "nf4"}), ("nf4+dq", {"scheme": "nf4", "double_quant": True}),
                     ("int8", {"scheme": "int8"})):
        q = quantize({"w": w}, "w", **kw)["w"]
        row = {k: float(v) for k, v in _errors(w, q).items()}
        out[name] = {"bytes_ratio": q.nbytes / (w.size * 4), **row}
    return out


@jax.jit
def _errors(w: jax.Array, q: QuantizedArray) -> dict[str, jax.Array]:
    err = jnp.abs(_leaf_dequant(q, jnp.float32) - w)
    out = {"rel_rmse": jnp.sqrt(jnp.mean(err**2)) / jnp.sqrt(jnp.mean(w**2))}
    if q.scheme == "nf4":
        blocks = _nf4_blocks(w, q.shape, q.block_size)[0]
        true = jnp.max(jnp.abs(blocks), axis=-1)
        out["max_err_over_absmax"] = jnp.max(_nf4_blocks(err, q.shape, q.block_size)[0] / true[..., None])
        if q.scales_scale is not None:
            out["scale_rel_err"] = jnp.max(jnp.abs(_nf4_absmax(q) - true) / true)
    else:
        out["max_err_over_absmax"] = jnp.max(err / (q.scales * 127.0))
    return out
