"""GGML block formats Q8_0, Q4_0 and Q4_1: the bytes of a GGUF tensor as arrays, both ways.

The block codec under :mod:`jlora.quant`'s GGUF schemes (``QuantizedArray(scheme='q8_0' | 'q4_0' |
'q4_1')``). It knows blocks and bytes only; kernels, layouts and pytrees are :mod:`jlora.quant`'s
business (it imports nothing of jlora).

A GGUF tensor is stored row-major with its rows cut into blocks of 32 consecutive values along the
last stored axis (for a matmul weight that is the *input* axis: GGUF keeps PyTorch's ``(out, in)``).
Per block (llama.cpp ``ggml-common.h``; ``gguf.quants`` in Python):

========  ===========================================  ====================================
scheme    bytes of one block                           value of element ``j``
========  ===========================================  ====================================
``q8_0``  f16 ``d``, 32 x int8 ``q``            (34)   ``q[j] * d``
``q4_0``  f16 ``d``, 16 bytes of nibbles        (18)   ``(nib(j) - 8) * d``
``q4_1``  f16 ``d``, f16 ``m``, 16 bytes        (20)   ``nib(j) * d + m``
========  ===========================================  ====================================

``nib(j)`` is the low nibble of byte ``j`` for ``j < 16`` and the high nibble of byte ``j - 16``
otherwise. As arrays (``rows`` = the stored shape without its last axis, ``nb`` = blocks per row):
``codes`` ``(*rows, nb, 32)`` int8 (q8_0) or ``(*rows, nb, 16)`` uint8 (the file's nibble bytes),
``scales`` ``(*rows, nb)`` float16 (``d``), ``mins`` ``(*rows, nb)`` float16 (``m``, q4_1 only).

:func:`dequantize_rows` is traceable jnp code bit-identical to ``gguf.quants.dequantize`` (the
products ``q * d`` are exact in float32; q4_1 rounds once, in ``+ m``, as gguf does), and
:func:`quantize_rows` is bit-identical to ``gguf.quants.quantize`` on CPU (float32 arithmetic in
gguf's order, true divisions, no fused multiply-add on XLA's CPU backend).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BLOCK", "SCHEMES", "TYPE_SIZE", "dequantize_kernel", "dequantize_rows", "join_blocks", "quantize_kernel",
           "quantize_rows", "split_blocks", "storage_perm", "stored_entries"]

BLOCK = 32
SCHEMES = ("q8_0", "q4_0", "q4_1")
#: bytes per block of 32 values, as GGUF stores them (``gguf.GGML_QUANT_SIZES``)
TYPE_SIZE = {"q8_0": 34, "q4_0": 18, "q4_1": 20}


def _check_scheme(where: str, scheme: Any) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"jlora.quant._gguf.{where}: scheme must be one of {SCHEMES}, got {scheme!r}; fix: the "
                         "GGUF tensor type in lower case (e.g. tensor.tensor_type.name.lower())")
    return scheme


def split_blocks(raw: np.ndarray, scheme: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(codes, scales, mins)`` from a GGUF tensor's bytes (``GGUFReader``'s ``tensor.data``).

    Args:
      raw: ``uint8`` of shape ``(*rows, nb * TYPE_SIZE[scheme])``, the file's bytes as
        ``gguf.GGUFReader`` gives them (any leading shape).
      scheme: ``'q8_0'``, ``'q4_0'`` or ``'q4_1'``.

    Returns:
      NumPy arrays (copies, not views into the file): codes ``(*rows, nb, 32)`` int8 or
      ``(*rows, nb, 16)`` uint8, scales ``(*rows, nb)`` float16, mins likewise (q4_1) or None.

    >>> raw = np.zeros((2, 34), np.uint8); raw[:, :2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    >>> raw[:, 2] = 3
    >>> codes, scales, mins = split_blocks(raw, "q8_0")
    >>> codes.shape, scales.tolist(), int(codes[0, 0, 0]), mins
    ((2, 1, 32), [[0.5], [0.5]], 3, None)
    """
    scheme = _check_scheme("split_blocks", scheme)
    raw = np.asarray(raw)
    size = TYPE_SIZE[scheme]
    if raw.dtype != np.uint8 or raw.ndim < 1 or raw.shape[-1] % size:
        raise ValueError(f"jlora.quant._gguf.split_blocks: raw must be uint8 bytes with a last axis that is a multiple "
                         f"of {size} ({scheme} blocks), got {raw.dtype} {raw.shape}; fix: pass tensor.data of a "
                         f"GGUFReader tensor whose tensor_type is {scheme.upper()}")
    blocks = raw.reshape(raw.shape[:-1] + (raw.shape[-1] // size, size))
    scales = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    if scheme == "q4_1":
        mins = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
        return np.ascontiguousarray(blocks[..., 4:]), scales, mins
    codes = np.ascontiguousarray(blocks[..., 2:])
    return (codes.view(np.int8) if scheme == "q8_0" else codes), scales, None


def join_blocks(codes: Any, scales: Any, mins: Any, scheme: str) -> np.ndarray:
    """The GGUF bytes ``(*rows, nb * TYPE_SIZE[scheme])`` of block arrays (inverse of :func:`split_blocks`).

    >>> raw = np.arange(40, dtype=np.uint8).reshape(2, 20)
    >>> bool(np.array_equal(join_blocks(*split_blocks(raw, "q4_1"), "q4_1"), raw))
    True
    """
    scheme = _check_scheme("join_blocks", scheme)
    parts = [np.asarray(scales, np.float16)[..., None].view(np.uint8)]
    if scheme == "q4_1":
        parts.append(np.asarray(mins, np.float16)[..., None].view(np.uint8))
    parts.append(np.asarray(codes).view(np.uint8))
    blocks = np.concatenate(parts, axis=-1)
    return blocks.reshape(blocks.shape[:-2] + (-1,))


def _nibbles(codes: jax.Array) -> jax.Array:
    """``(..., 16)`` bytes -> ``(..., 32)`` values 0..15: low nibbles first, then high nibbles."""
    return jnp.concatenate([codes & 15, codes >> 4], axis=-1)


def dequantize_rows(codes: jax.Array, scales: jax.Array, mins: jax.Array | None, scheme: str) -> jax.Array:
    """Float32 values ``(*rows, nb * 32)`` of block arrays; traceable (jit, grad-free, vmap).

    Bit-identical to ``gguf.quants.dequantize`` of the same bytes.

    >>> codes = jnp.full((1, 1, 16), 0x31, jnp.uint8)          # low nibble 1, high nibble 3
    >>> d = jnp.full((1, 1), 0.5, jnp.float16)
    >>> dequantize_rows(codes, d, None, "q4_0")[0, [0, 16]].tolist()
    [-3.5, -2.5]
    >>> dequantize_rows(codes, d, jnp.full((1, 1), 1.0, jnp.float16), "q4_1")[0, [0, 16]].tolist()
    [1.5, 2.5]
    """
    scheme = _check_scheme("dequantize_rows", scheme)
    d = scales.astype(jnp.float32)[..., None]
    if scheme == "q8_0":
        vals = codes.astype(jnp.float32) * d
    elif scheme == "q4_0":
        vals = (_nibbles(codes).astype(jnp.int8) - jnp.int8(8)).astype(jnp.float32) * d
    else:
        vals = _nibbles(codes).astype(jnp.float32) * d + mins.astype(jnp.float32)[..., None]
    return vals.reshape(vals.shape[:-2] + (-1,))


def _round_away(x: jax.Array) -> jax.Array:
    return jax.lax.round(x, jax.lax.RoundingMethod.AWAY_FROM_ZERO)


def _pack(q: jax.Array) -> jax.Array:
    """``(..., 32)`` values 0..15 -> ``(..., 16)`` bytes, element j low, j + 16 high."""
    return q[..., :16] | (q[..., 16:] << 4)


def _inverse(d: jax.Array) -> jax.Array:
    return jnp.where(d == 0, jnp.float32(0), 1 / jnp.where(d == 0, jnp.float32(1), d))


def _divide(x: jax.Array, c: int) -> jax.Array:
    """``x / c`` rounded once, as NumPy does, for ``x >= 0`` (an absmax, a range).

    XLA rewrites a division by a constant into a multiplication by its rounded reciprocal, which
    differs from ``x / c`` in the last bit for about half of the values (c = 15). A divisor that
    depends on ``x`` keeps the true division; its other branch is never taken (``x >= 0``; NaN
    stays NaN either way).
    """
    return x / jnp.where(x >= 0, jnp.float32(c), jnp.float32(c + 1))


def quantize_rows(x: jax.Array, scheme: str) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(codes, scales, mins)`` of ``x`` ``(*rows, n)`` (``n`` a multiple of 32), as llama.cpp quantizes.

    Float32 arithmetic in ``gguf.quants``' order (q8_0: ``d = amax / 127``, round half away from
    zero; q4_0: ``d = max / -8`` with ``max`` the entry of largest magnitude; q4_1:
    ``d = (max - min) / 15``, ``m = min``; 4-bit codes ``trunc(.. + 0.5)`` clipped to 0..15), so
    :func:`join_blocks` of the result equals ``gguf.quants.quantize`` (checked bit for bit on CPU).

    >>> codes, d, m = quantize_rows(jnp.arange(32.0)[None], "q4_1")
    >>> codes.shape, float(d[0, 0]), float(m[0, 0])
    ((1, 1, 16), 2.06640625, 0.0)
    """
    scheme = _check_scheme("quantize_rows", scheme)
    if x.ndim < 1 or x.shape[-1] % BLOCK:
        raise ValueError(f"jlora.quant._gguf.quantize_rows: the last axis must be a multiple of {BLOCK}, got shape "
                         f"{tuple(x.shape)}; fix: GGUF blocks tile the rows, pad or pick another scheme")
    b = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // BLOCK, BLOCK))
    if scheme == "q8_0":
        d = _divide(jnp.max(jnp.abs(b), axis=-1), 127)
        q = _round_away(b * _inverse(d)[..., None])
        return q.astype(jnp.int8), d.astype(jnp.float16), None
    if scheme == "q4_0":
        imax = jnp.argmax(jnp.abs(b), axis=-1)[..., None]
        d = jnp.take_along_axis(b, imax, axis=-1)[..., 0] / jnp.float32(-8)
        q = jnp.trunc(b * _inverse(d)[..., None] + jnp.float32(8.5))
        return _pack(jnp.clip(q, 0, 15).astype(jnp.uint8)), d.astype(jnp.float16), None
    lo, hi = jnp.min(b, axis=-1), jnp.max(b, axis=-1)
    d = _divide(hi - lo, 15)
    q = jnp.trunc((b - lo[..., None]) * _inverse(d)[..., None] + jnp.float32(0.5))
    return _pack(jnp.clip(q, 0, 15).astype(jnp.uint8)), d.astype(jnp.float16), lo.astype(jnp.float16)


# --- kernels: the stored tensor (blocked axis last) and the kernel's own axis order ----------------

def storage_perm(ndim: int, axis: int) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """``(order, perm)`` for blocks along kernel ``axis``: ``stored = kernel.transpose(order)`` puts
    that axis last, ``kernel = stored.transpose(perm)`` (``perm`` None when no transpose is needed).

    >>> storage_perm(2, 0)
    ((1, 0), (1, 0))
    >>> storage_perm(3, 2)
    ((0, 1, 2), None)
    """
    order = tuple(a for a in range(ndim) if a != axis) + (axis,)
    perm = tuple(int(i) for i in np.argsort(order))
    return order, (None if perm == tuple(range(ndim)) else perm)


def quantize_kernel(w: jax.Array, axis: int, scheme: str
                    ) -> tuple[jax.Array, jax.Array, jax.Array | None, tuple[int, ...] | None]:
    """``(codes, scales, mins, perm)``: ``w`` quantized in blocks of 32 along ``axis``, stored GGUF-style.

    The blocks equal ``gguf.quants.quantize(w.transpose(order))`` (``order`` from :func:`storage_perm`),
    e.g. for a Flax ``(in, out)`` kernel and ``axis=0`` those of the PyTorch ``(out, in)`` weight.

    >>> codes, scales, mins, perm = quantize_kernel(jnp.ones((64, 3)), 0, "q8_0")
    >>> codes.shape, scales.shape, perm
    ((3, 2, 32), (3, 2), (1, 0))
    """
    order, perm = storage_perm(w.ndim, axis)
    return (*quantize_rows(jnp.transpose(w, order), scheme), perm)


def dequantize_kernel(codes: jax.Array, scales: jax.Array, mins: jax.Array | None, scheme: str,
                      perm: tuple[int, ...] | None) -> jax.Array:
    """Float32 kernel of stored blocks: :func:`dequantize_rows`, then the transpose ``perm`` (if any).

    >>> codes, scales, mins, perm = quantize_kernel(jnp.arange(64.0).reshape(32, 2), 0, "q8_0")
    >>> dequantize_kernel(codes, scales, mins, "q8_0", perm).shape
    (32, 2)
    """
    vals = dequantize_rows(codes, scales, mins, scheme)
    return vals if perm is None else jnp.transpose(vals, perm)


def stored_entries(entries: tuple[Any, ...], perm: tuple[int, ...] | None) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """A kernel's ``PartitionSpec`` entries (kernel axis order) for ``(codes, scales)``.

    The stored rows keep their axes' entries, the blocked axis's entry goes to the block-count axis
    and the axis inside a block is replicated (the caller replicates an axis a mesh does not divide).

    >>> stored_entries(("x", "y"), (1, 0))
    (('y', 'x', None), ('y', 'x'))
    """
    stored = entries if perm is None else tuple(entries[perm.index(j)] for j in range(len(perm)))
    return stored + (None,), stored
