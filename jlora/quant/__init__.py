"""Quantized base kernels (QLoRA): nf4/int8 blocks with bitsandbytes' double quantization, GGUF's
q8_0/q4_0/q4_1, LoftQ initialisation and export of a merged model to GGUF.

Imports only :mod:`jlora.core`; the tracing walker (:mod:`jlora.trace`) reads these arrays lazily.

>>> import jax.numpy as jnp
>>> q = quantize({"w": jnp.ones((4, 64))}, "w")["w"]
>>> is_quantized(q), q.shape, float(dequantize(q).max())
(True, (4, 64), 1.0)
"""

from jlora.quant import gguf_export
from jlora.quant._array import QuantizedArray, is_quantized, splits_by_layer
from jlora.quant._codecs import NF4_CODE
from jlora.quant._quant import dequantize, dequantize_leaf, from_gguf, quantize
from jlora.quant._report import quant_report
from jlora.quant._sharding import quantized_sharding
from jlora.quant.gguf_export import write_gguf

__all__ = ["NF4_CODE", "gguf_export", "QuantizedArray", "dequantize", "dequantize_leaf", "from_gguf", "is_quantized",
           "quant_report", "quantize", "quantized_sharding", "splits_by_layer", "write_gguf"]
