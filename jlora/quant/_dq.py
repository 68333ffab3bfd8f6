"""QLoRA's double quantization, bit for bit as bitsandbytes' ``quantize_4bit(compress_statistics=True)``.

bitsandbytes (0.50, CPU) quantizes the float32 NF4 absmax values ``a`` (one per block of 64 weights) as:

1. ``offset = a.mean()``: PyTorch's float32 CPU sum (its cascade sum: 8-lane vectors, 4
   interleaved rows, chunks of ``2**max(4, ceil(log2(rows)) // 4)`` rows summed level by level;
   one thread) divided by ``len(a)`` (a true float32 division). :func:`torch_mean` does the same
   additions in the same order, so the offset is the same float32 number. (Above 32768 values
   PyTorch splits the sum over its threads, so bitsandbytes' own offset then depends on
   ``torch.get_num_threads()``; jlora's is its value with one thread.)
2. ``v = a - offset``, cut into blocks of 256 (a partial last block is its own block), each block
   scaled by ``1 / absmax(block)`` (float32 reciprocal, then multiply) and coded to 8 bits with
   the signed dynamic map (:func:`dynamic_map`). The code is *not* the exactly nearest level:
   bitsandbytes' CPU kernel rounds the scaled value to a grid of 65536 points on [-1, 1] and
   looks the code up in a table built from the midpoints of the map. That composite is a
   monotone step function of the scaled value, so jlora stores its 255 steps
   (:func:`_code_steps`, computed once in NumPy from the same float32 operations) and codes a
   value as the number of steps at or below it. A block whose absmax is 0 gets code 0.
3. Dequantization: ``dynamic_map()[code] * absmax(block)`` rounded to float32, *then* ``+ offset``
   (two roundings: :func:`dequantize_absmax` keeps XLA from fusing them into one FMA, :func:`_rounded`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["DQ_BLOCK", "dequantize_absmax", "double_quantize", "dynamic_map", "torch_mean"]

DQ_BLOCK = 256
_LANES, _ILP, _LEVELS = 8, 4, 4  # PyTorch's CPU sum: Vectorized<float> lanes, rows at once, cascade levels
_GRID = 65535  # bitsandbytes' CPU code table: 65536 points on [-1, 1]
_F32 = np.float32


def _linspace_f32(n: int) -> np.ndarray:
    """``torch.linspace(0.1, 1, n, dtype=float32)``: ``start + step*i`` (first half) and
    ``end - step*(n-1-i)`` (second half), each one fused multiply-add rounded once to float32."""
    start, end = _F32(0.1), _F32(1.0)
    step = _F32((end - start) / _F32(n - 1))
    i = np.arange(n, dtype=np.float64)
    low = (np.float64(start) + np.float64(step) * i).astype(_F32)  # exact in float64, one rounding
    high = (np.float64(end) - np.float64(step) * (n - 1 - i)).astype(_F32)
    return np.where(i < n // 2, low, high)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic quantization map (``create_dynamic_map()``), sorted.

    256 float32 values in [-1, 1]: for exponents 10^-6..10^0, the 2^i bin means of
    ``linspace(0.1, 1, 2^i + 1)``, both signs, plus 0 and 1, computed with bitsandbytes' own float32
    operations (PyTorch's float32 ``linspace``, float32 means, times ``float32(10^e)``), so every
    value equals bitsandbytes' map exactly.

    >>> m = dynamic_map()
    >>> m.shape, float(m[0]), float(m[-1]), bool(np.all(np.diff(m) > 0))
    ((256,), -0.992968738079071, 1.0, True)
    """
    data = [np.array([0.0, 1.0], _F32)]
    for i in range(7):
        bounds = _linspace_f32(2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / _F32(2)
        scale = _F32(10.0 ** (-6 + i))
        data += [means * scale, means * -scale]
    return np.sort(np.concatenate(data)).astype(_F32)


def _lut_code(v: np.ndarray, midpoints: np.ndarray) -> np.ndarray:
    """bitsandbytes' CPU 8-bit code of scaled values ``v`` (float32): grid index, then table."""
    grid = (_F32(-1) + (_F32(2) * np.arange(_GRID + 1).astype(_F32)) / _F32(_GRID)).astype(_F32)
    table = np.searchsorted(midpoints, grid, side="left")  # the midpoints strictly below each grid point
    t = ((np.clip(v, _F32(-1), _F32(1)) + _F32(1)) * _F32(0.5)).astype(_F32)
    index = np.trunc((t.astype(np.float64) * _GRID + 0.5).astype(_F32)).astype(np.int64)
    return table[index]


def _ordered(bits: np.ndarray) -> np.ndarray:
    """float32 bit patterns (int64) to integers in the floats' order, and back (:func:`_unordered`)."""
    return np.where(bits >= 2**31, -(bits - 2**31), bits)


def _unordered(key: np.ndarray) -> np.ndarray:
    return np.where(key < 0, -key + 2**31, key).astype(np.uint32).view(_F32)


@functools.lru_cache(maxsize=1)
def _code_steps() -> np.ndarray:
    """The 255 float32 steps ``t_k = min {v : code(v) >= k}`` of bitsandbytes' 8-bit coding, by bisection
    over the float32 values in [-1, 1] (the code is monotone in ``v``); ``code(v) = #{k : t_k <= v}``."""
    dmap = dynamic_map()
    midpoints = (_F32(0.5) * (dmap[:-1] + dmap[1:])).astype(_F32)
    k = np.arange(1, 256)
    lo = np.full(k.shape, _ordered(np.array([_F32(-1)]).view(np.uint32).astype(np.int64))[0])
    hi = np.full(k.shape, _ordered(np.array([_F32(1)]).view(np.uint32).astype(np.int64))[0])
    while np.any(hi - lo > 1):  # invariant: code(lo) < k <= code(hi)
        mid = (lo + hi) // 2
        up = _lut_code(_unordered(mid), midpoints) >= k
        hi, lo = np.where(up, mid, hi), np.where(up, lo, mid)
    return _unordered(hi)


def _fold(x: jax.Array) -> jax.Array:
    """Left-to-right float32 sum over axis 0, starting from 0 (a scan: XLA keeps the order)."""
    return lax.scan(lambda c, r: (c + r, None), jnp.zeros(x.shape[1:], x.dtype), x)[0]


def _fold_groups(x: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """Sums of consecutive groups of ``size`` rows of ``x`` (each left to right) and the sum of the rest."""
    full = x.shape[0] // size
    head = x[: full * size].reshape((full, size) + x.shape[1:])
    return _fold(jnp.moveaxis(head, 1, 0)), _fold(x[full * size:])


def _multi_row_sum(rows: jax.Array) -> jax.Array:
    """PyTorch's ``multi_row_sum``: column sums of ``rows`` with its 4-level cascade."""
    size = rows.shape[0]
    ceil_log2 = 1 if size <= 2 else (size - 1).bit_length()
    step = 1 << max(4, ceil_log2 // _LEVELS)
    chunks, acc0 = _fold_groups(rows, step)
    groups, acc1 = _fold_groups(chunks, step)
    supers, acc2 = _fold_groups(groups, step)
    return ((acc0 + acc1) + acc2) + _fold(supers)


def _row_sum(x: jax.Array) -> jax.Array:
    """PyTorch's ``row_sum``: ``_ILP`` interleaved partial sums, the leftovers, then the partials."""
    n = x.shape[0]
    rows = n // _ILP
    part = _multi_row_sum(x[: rows * _ILP].reshape((rows, _ILP) + x.shape[1:]))
    first = part[0]
    for i in range(rows * _ILP, n):
        first = first + x[i]
    for k in range(1, _ILP):
        first = first + part[k]
    return first


def torch_mean(x: jax.Array) -> jax.Array:
    """``torch.mean`` of a 1-D float32 array on the CPU (one thread), bit for bit.

    PyTorch sums float32 in float32 with a cascade over 8-lane vectors (``SumKernel.cpp``); this does
    the same additions in the same order, then one true division by the length.

    >>> float(torch_mean(jnp.arange(10, dtype=jnp.float32)))
    4.5
    """
    x = jnp.asarray(x, jnp.float32)
    n = x.shape[0]
    if n >= _LANES:
        vecs = n // _LANES
        lanes = _row_sum(x[: vecs * _LANES].reshape(vecs, _LANES))
        total = jnp.zeros((), jnp.float32)
        for k in range(vecs * _LANES, n):
            total = total + x[k]
        for k in range(_LANES):
            total = total + lanes[k]
    else:
        total = _row_sum(x)
    # a barrier, or XLA turns the division by a constant into a multiplication by its reciprocal
    return total / lax.optimization_barrier(jnp.float32(n))


def double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """8-bit codes of float32 absmax values, as bitsandbytes' ``compress_statistics=True``.

    Args:
      absmax: float32 NF4 absmax values, any shape (flattened row-major).

    Returns:
      ``(codes, block_absmax, offset)``: ``uint8`` codes of ``absmax``'s shape (indices into
      :func:`dynamic_map`), the float32 absmax of each block of 256 (``(ceil(n / 256),)``) and the
      float32 mean that was subtracted (a scalar).

    >>> codes, s2, offset = double_quantize(jnp.array([1.0, 2.0, 3.0]))
    >>> codes.tolist(), s2.tolist(), float(offset)   # 0 takes code 131 (2.1e-5), as in bitsandbytes
    ([0, 131, 255], [1.0], 2.0)
    """
    flat = jnp.asarray(absmax, jnp.float32).reshape(-1)
    offset = torch_mean(flat)
    m = flat.shape[0]
    nb = -(-m // DQ_BLOCK)
    blocks = jnp.pad(flat - offset, (0, nb * DQ_BLOCK - m)).reshape(nb, DQ_BLOCK)  # zeros never raise an absmax
    s2 = jnp.max(jnp.abs(blocks), axis=-1)
    inv = 1.0 / jnp.where(s2 > 0, s2, 1.0)
    codes = jnp.searchsorted(jnp.asarray(_code_steps()), blocks * inv[:, None], side="right")
    codes = jnp.where(s2[:, None] > 0, codes, 0).astype(jnp.uint8)
    return codes.reshape(-1)[:m].reshape(jnp.shape(absmax)), s2, offset


def dequantize_absmax(codes: jax.Array, block_absmax: jax.Array, offset: jax.Array) -> jax.Array:
    """The float32 absmax values back: ``dynamic_map()[code] * block_absmax`` rounded, then ``+ offset``.

    >>> codes, s2, offset = double_quantize(jnp.array([1.0, 2.0, 3.0]))
    >>> [round(v, 5) for v in dequantize_absmax(codes, s2, offset).tolist()]
    [1.00703, 2.00002, 3.0]
    """
    flat = codes.reshape(-1)
    m = flat.shape[0]
    nb = block_absmax.shape[0]
    padded = jnp.pad(flat, (0, nb * DQ_BLOCK - m)).reshape(nb, DQ_BLOCK)
    scaled = _rounded(jnp.asarray(dynamic_map())[padded.astype(jnp.int32)] * block_absmax[:, None])
    return (scaled.reshape(-1)[:m] + offset).reshape(codes.shape)


def _rounded(x: jax.Array) -> jax.Array:
    """``x`` (float32) itself, but never contracted into a following add.

    bitsandbytes rounds ``code * absmax`` to float32 and adds the offset in a second operation; XLA's
    CPU backend fuses a multiply and an add into one FMA (one rounding), even across an
    ``optimization_barrier``. An integer select on the bits (it only swaps one NaN pattern for
    another) sits between the two, so the product is rounded on its own.
    """
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    bits = jnp.where(bits == jnp.uint32(0xFFFFFFFF), jnp.uint32(0x7FC00000), bits)
    return lax.bitcast_convert_type(bits, jnp.float32)
