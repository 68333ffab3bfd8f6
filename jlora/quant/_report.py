"""Bytes and errors of each quantization scheme on a random kernel (for benchmarks and the README)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.quant._array import QuantizedArray
from jlora.quant._codecs import nf4_absmax, nf4_blocks
from jlora.quant._quant import _leaf_dequant, quantize

__all__ = ["quant_report"]


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
        blocks = nf4_blocks(w, q.shape, q.block_size)[0]
        true = jnp.max(jnp.abs(blocks), axis=-1)
        out["max_err_over_absmax"] = jnp.max(nf4_blocks(err, q.shape, q.block_size)[0] / true[..., None])
        if q.scales_scale is not None:
            out["scale_rel_err"] = jnp.max(jnp.abs(nf4_absmax(q) - true) / true)
    else:
        out["max_err_over_absmax"] = jnp.max(err / (q.scales * 127.0))
    return out
