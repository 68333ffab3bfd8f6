"""jlora: LoRA for JAX as pure functions over parameter pytrees.

The package is five folders, each importing only the ones before it::

    core   the model of an adapter: LoraConfig, Layout, paths, factor inits, DoRA, optimizer labels
    quant  quantized base kernels: nf4/int8 (bitsandbytes), GGUF, LoftQ
    trace  the one jaxpr walker: kernel roles for init, the lazy rewrite, per-row adapters
    adapt  init, merge, unmerge, delta, lora_apply
    io     adapters on disk: orbax checkpoints, training checkpoints, the PEFT format
    multi  many adapters over one base

plus :mod:`jlora.sharding` (partition specs for the lora tree). This module is the public surface.
"""

import sys as _sys

from jlora import sharding
from jlora.adapt import delta, init, lora_apply, merge, quantized_apply, unmerge
from jlora.core import (Factored, Layout, LoraConfig, LoraKernel, Summary, adapted, bias_rules, dora,
                        kernel_layouts, layout, optimizer, paths, summary, to_plain_adapter)
from jlora import multi, quant
from jlora.io import TrainCheckpointer, checkpoint, peft, restore_adapter, save_adapter
from jlora.quant import QuantizedArray, dequantize, quantize
from jlora.sharding import lora_shardings, lora_specs

# The public modules that moved into folders stay importable by their old names
# (``import jlora.peft``, ``from jlora.paths import flatten``).
for _name, _module in {"paths": paths, "layout": layout, "dora": dora, "checkpoint": checkpoint,
                       "peft": peft}.items():
    _sys.modules.setdefault(f"jlora.{_name}", _module)

__version__ = "0.1.0"

__all__ = [
    "Factored",
    "Layout",
    "LoraConfig",
    "LoraKernel",
    "QuantizedArray",
    "Summary",
    "TrainCheckpointer",
    "adapted",
    "bias_rules",
    "checkpoint",
    "delta",
    "dequantize",
    "dora",
    "init",
    "kernel_layouts",
    "layout",
    "lora_apply",
    "lora_shardings",
    "lora_specs",
    "merge",
    "multi",
    "optimizer",
    "paths",
    "peft",
    "quant",
    "quantize",
    "quantized_apply",
    "restore_adapter",
    "save_adapter",
    "sharding",
    "summary",
    "to_plain_adapter",
    "unmerge",
]
