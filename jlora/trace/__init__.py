"""The tracing walker (:mod:`jlora.trace._walker`): a model's jaxpr read for kernel roles (``init``) and
evaluated with adapted kernels as symbolic values (``lora_apply``'s lazy rewrite, many adapters per
row), each a mode of the one walker with its own rule table.

Imports :mod:`jlora.core` and :mod:`jlora.quant`.
"""

from jlora.trace._lazy import LoraValue, Traced, lazy_call, lazy_eval, trace_apply
from jlora.trace._rows import rows_call

__all__ = ["LoraValue", "Traced", "lazy_call", "lazy_eval", "rows_call", "trace_apply"]
