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

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import _checks as checks
from jlora.core import paths
from jlora.core._config import LoraConfig
from jlora.core.layout import Layout
from jlora.quant import _codecs as codecs
from jlora.quant import _gguf as quant_gguf
from jlora.quant._array import QuantizedArray, is_quantized, splits_by_layer
from jlora.quant._codecs import NF4_CODE, SCHEMES
from jlora.quant._dq import dynamic_map
from jlora.quant._sharding import quantized_sharding

__all__ = [
    "NF4_CODE",
    "QuantizedArray",
    "dequantize",
    "dequantize_leaf",
    "dynamic_map",
    "from_gguf",
    "is_quantized",
    "quantize",
    "quantized_sharding",
    "splits_by_layer",
]


# --- which axes: the kernel's layout -------------------------------------------------------------

def stored_roles(path: str, shape: tuple[int, ...], config: LoraConfig | None,
                 layouts: Mapping[str, Layout] | None = None) -> Sequence[str]:
    """The role letters of each stored axis of the kernel at ``path`` (``'s'`` stack, ``'i'`` input,
    ``'o'`` output; a merged axis has several), from its :class:`~jlora.layout.Layout`.

    The layout is ``layouts[path]``, else the config's ``layout`` rule for the path, else the
    config's ``stack``/``axes`` counts (stack + in + out in stored order). Without any of them the
    documented default holds: no stack axis and every axis but the last an input
    (``Layout.plain(shape, 0, ndim - 1)``, a Flax ``(in..., out)`` kernel).

    >>> stored_roles("w", (4, 8, 16), None)
    ('i', 'i', 'o')
    >>> stored_roles("w", (2, 8, 16), LoraConfig(targets="w", stack=(("w", 1),)))
    ('s', 'i', 'o')
    """
    lay = (layouts or {}).get(path)
    roles = lay.stored_roles() if lay is not None else (config.layout_for(path) if config is not None else None)
    if roles is not None:
        if len(roles) != len(shape):
            raise ValueError(f"jlora.quant.quantize: layout roles {roles!r} of {path!r} do not fit shape {shape}")
        return roles
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
    return Layout.plain(shape, n_stack, n_in).stored_roles()


def _in_axes(path: str, shape: tuple[int, ...], config: LoraConfig | None,
             layouts: Mapping[str, Layout] | None = None) -> tuple[int, ...]:
    """The stored axes that are inputs only (the int8 scale is one per everything else)."""
    return tuple(k for k, r in enumerate(stored_roles(path, shape, config, layouts)) if set(r) == {"i"})


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


# --- quantize --------------------------------------------------------------------------------------

def _check_settings(scheme: Any, block_size: Any, double_quant: Any) -> None:
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


def _chosen(flat: Mapping[str, Any], targets: tuple[str, ...], exclude: tuple[str, ...]) -> set[str]:
    """The paths to quantize; a rule that matches nothing, or a chosen leaf that is no float kernel, is refused."""
    for r in targets + exclude:
        if not any(re.fullmatch(r, p) for p in flat):
            raise ValueError(
                f"jlora.quant.quantize: {r!r} matched no parameter; closest paths: "
                f"{', '.join(paths.closest(r, flat))}. Fix the regex (it must match a whole path, re.fullmatch)"
            )
    chosen = {p for p in flat if paths.matches(targets, p) and not paths.matches(exclude, p)}
    for p in sorted(chosen):
        _check_leaf(p, flat[p])
    return chosen


def _quantize_kernel(path: str, w: Any, scheme: str, block_size: int, double_quant: bool, config: LoraConfig | None,
                     layouts: Mapping[str, Layout] | None) -> QuantizedArray:
    """One kernel quantized; a concrete kernel's ``NamedSharding`` carries over to its arrays."""
    shape, dtype = tuple(w.shape), np.dtype(w.dtype)
    if scheme == "nf4":
        q = codecs.encode_nf4(jnp.asarray(w), shape, block_size, double_quant, dtype)
    elif scheme in quant_gguf.SCHEMES:
        q = codecs.encode_gguf(jnp.asarray(w), shape, _block_axis(path, shape, config, layouts), scheme, dtype)
    else:
        q = codecs.encode_int8(jnp.asarray(w), shape, _in_axes(path, shape, config, layouts), dtype)
    sharding = getattr(w, "sharding", None)
    if isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer) and isinstance(
            sharding, jax.sharding.NamedSharding):
        q = jax.device_put(q, quantized_sharding(q, sharding))
    return q


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
      layouts: int8 and GGUF schemes: ``{path: Layout}`` (e.g. ``jlora.kernel_layouts(lora)``): the
        scale is one per stack/output position, reduced over the kernel's input axes in whatever order
        it stores them (default: the config's ``layout``/``stack``/``axes`` rules, else all axes but the
        last: :func:`stored_roles`).

    Returns:
      ``frozen`` with a :class:`QuantizedArray` at each chosen kernel's path.

    >>> frozen = {"dense": {"kernel": jnp.linspace(-1, 1, 256).reshape(2, 128), "bias": jnp.zeros(128)}}
    >>> q = quantize(frozen, r".*/kernel")
    >>> q["dense"]["kernel"]
    QuantizedArray(nf4, shape=(2, 128), dtype=float32, block_size=64)
    >>> float(jnp.max(jnp.abs(dequantize(q["dense"]["kernel"]) - frozen["dense"]["kernel"]))) < 0.152
    True
    """
    _check_settings(scheme, block_size, double_quant)
    targets, exclude, config = _rules(rules_or_config)
    chosen = _chosen(paths.flatten(frozen), targets, exclude)

    def one(path: str, w: Any) -> Any:
        if path not in chosen:
            return w
        return _quantize_kernel(path, w, scheme, block_size, double_quant, config, layouts)

    return paths.map_with_path(one, frozen)


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


# --- dequantize ------------------------------------------------------------------------------------

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
    return codecs.decode(q).astype(q.dtype if dtype is None else dtype)


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
