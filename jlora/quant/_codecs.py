"""The block codecs behind :class:`~jlora.quant.QuantizedArray`: NF4 (blockwise absmax, bitsandbytes'
code book), int8 (per output channel) and GGUF's q8_0/q4_0/q4_1 (:mod:`jlora.quant._gguf`).

Each scheme has an encoder (a jitted float kernel -> ``QuantizedArray``; the axes it needs are
given by :mod:`jlora.quant._quant` from the kernel's layout) and :func:`decode` turns any of them
back into the float32 kernel. The schemes themselves are described in :mod:`jlora.quant._quant`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.quant import _dq as quant_dq
from jlora.quant import _gguf as quant_gguf
from jlora.quant._array import QuantizedArray

SCHEMES = ("nf4", "int8") + quant_gguf.SCHEMES

#: The 16 NF4 levels, bitsandbytes' exact float32 values (``get_4bit_type('nf4')``; QLoRA, eq. 4).
NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


# --- NF4 -----------------------------------------------------------------------------------------

def _midpoints(code: np.ndarray) -> np.ndarray:
    return ((code[:-1].astype(np.float32) + code[1:].astype(np.float32)) / np.float32(2)).astype(np.float32)


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


def nf4_blocks(w: jax.Array, shape: tuple[int, ...], bs: int) -> tuple[jax.Array, bool]:
    """The float32 blocks of ``w``: ``shape[:-1] + (n, bs)`` when ``bs`` divides the last axis (row
    blocks, ``True``), else the flattened kernel zero-padded to ``(n_blocks, bs)`` (``False``)."""
    x = w.astype(jnp.float32)
    if shape[-1] % bs == 0:
        return x.reshape(shape[:-1] + (shape[-1] // bs, bs)), True
    n = math.prod(shape)
    nb = -(-n // bs)
    return jnp.pad(x.reshape(-1), (0, nb * bs - n)).reshape(nb, bs), False


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def encode_nf4(w: jax.Array, shape: tuple[int, ...], bs: int, dq: bool, dtype: Any) -> QuantizedArray:
    """NF4 codes (two per byte, the first in the high nibble) and absmax per block of ``bs``."""
    blocks, rows = nf4_blocks(w, shape, bs)
    idx, absmax = _blockwise(blocks, np.asarray(NF4_CODE, np.float32), 0 if rows else math.prod(shape) % bs)
    pairs = idx.reshape(idx.shape[:-1] + (bs // 2, 2))
    packed = (pairs[..., 0] << 4) | pairs[..., 1]
    lead = shape[:-1] if rows else (blocks.shape[0],)
    codes = packed.reshape(lead + (-1,))
    if dq:
        q, s2, offset = quant_dq.double_quantize(absmax)
        return QuantizedArray(codes, q, s2, offset, shape, dtype, "nf4", bs, rows)
    return QuantizedArray(codes, absmax, None, None, shape, dtype, "nf4", bs, rows)


def nf4_absmax(q: QuantizedArray) -> jax.Array:
    """The float32 absmax per block (dequantized first under double quantization)."""
    if q.scales_scale is None:
        return q.scales
    return quant_dq.dequantize_absmax(q.scales, q.scales_scale, q.scales_offset)


def _decode_nf4(q: QuantizedArray) -> jax.Array:
    code = jnp.asarray(np.asarray(NF4_CODE, np.float32))
    c = q.codes
    idx = jnp.stack([c >> 4, c & 15], axis=-1).astype(jnp.int32)
    absmax = nf4_absmax(q)
    vals = code[idx.reshape(absmax.shape + (q.block_size,))] * absmax[..., None]
    n = q.size
    return vals.reshape(-1)[:n].reshape(q.shape)


# --- int8 ----------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def encode_int8(w: jax.Array, shape: tuple[int, ...], in_axes: tuple[int, ...], dtype: Any) -> QuantizedArray:
    """int8 codes and one float32 scale ``absmax / 127`` per position of the axes not in ``in_axes``."""
    x = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=in_axes, keepdims=True) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8)
    return QuantizedArray(codes, scale, None, None, shape, dtype, "int8", 0, True)


# --- GGUF blocks (q8_0, q4_0, q4_1; the codec is jlora.quant._gguf) ------------------------------

@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def encode_gguf(w: jax.Array, shape: tuple[int, ...], axis: int, scheme: str, dtype: Any) -> QuantizedArray:
    """GGUF blocks of 32 along ``axis``, as llama.cpp makes them."""
    codes, scales, mins, perm = quant_gguf.quantize_kernel(w, axis, scheme)
    return QuantizedArray(codes, scales, None, None, shape, dtype, scheme, quant_gguf.BLOCK, True, mins, perm)


def decode(q: QuantizedArray) -> jax.Array:
    """The float32 kernel of ``q``, whatever its scheme (traceable jnp code)."""
    if q.scheme in quant_gguf.SCHEMES:
        return quant_gguf.dequantize_kernel(q.codes, q.scales, q.mins, q.scheme, q.perm)
    return _decode_nf4(q) if q.scheme == "nf4" else q.codes.astype(jnp.float32) * q.scales
