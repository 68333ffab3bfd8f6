"""Shardings of a :class:`~jlora.quant.QuantizedArray`'s arrays, derived from its kernel's ``NamedSharding``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from jlora.quant import _gguf as quant_gguf
from jlora.quant._array import QuantizedArray

__all__ = ["quantized_sharding"]


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

    >>> import jax.numpy as jnp, numpy as np
    >>> from jlora.quant import quantize
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
