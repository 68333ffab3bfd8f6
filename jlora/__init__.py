"""jlora: LoRA for JAX as pure functions over parameter pytrees."""

from jlora.apply import lora_apply
from jlora.config import LoraConfig
from jlora.kinds import Factored
from jlora.optim import optimizer
from jlora.summary import Summary, summary
from jlora.tree import adapted, delta, init, merge, unmerge

__version__ = "0.1.0"

__all__ = [
    "Factored",
    "LoraConfig",
    "Summary",
    "adapted",
    "delta",
    "init",
    "lora_apply",
    "merge",
    "optimizer",
    "summary",
    "unmerge",
]
