"""Adapting a model: ``init`` (frozen base + LoRA factors), ``merge``/``unmerge``/``delta`` and
``lora_apply`` (the adapted apply function, lazy or merged).

Imports :mod:`jlora.core`, :mod:`jlora.quant` and :mod:`jlora.trace`.
"""

from jlora.adapt._apply import lora_apply, quantized_apply
from jlora.adapt._tree import delta, init, merge, unmerge

__all__ = ["delta", "init", "lora_apply", "merge", "quantized_apply", "unmerge"]
