"""jlora: LoRA for JAX as pure functions over parameter pytrees."""

from jlora import checkpoint, dora, layout, moe, multi, peft, quant, sharding
from jlora.apply import lora_apply, quantized_apply
from jlora.checkpoint import TrainCheckpointer, restore_adapter, save_adapter
from jlora.config import LoraConfig
from jlora.extras import bias_rules
from jlora.inits import to_plain_adapter
from jlora.kinds import Factored
from jlora.layout import Layout, LoraKernel
from jlora.optim import optimizer
from jlora.quant import QuantizedArray, dequantize, quantize
from jlora.sharding import lora_shardings, lora_specs
from jlora.summary import Summary, summary
from jlora.tree import adapted, delta, init, kernel_layouts, merge, unmerge

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
    "moe",
    "multi",
    "optimizer",
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
