"""The model of an adapter: configuration, kernel layouts, paths, factor inits, DoRA, optimizer labels.

Nothing here traces a model: every function reads arrays, shapes and a :class:`LoraConfig`.
Folders above (``quant``, ``trace``, ``adapt``, ``io``, ``multi``) build on this one; it imports none of them.
"""

from jlora.core import dora, layout, paths
from jlora.core._config import LoraConfig
from jlora.core._describe import adapted, kernel_layouts
from jlora.core._extras import bias_rules
from jlora.core._inits import to_plain_adapter
from jlora.core._kinds import Factored
from jlora.core._optim import optimizer
from jlora.core._summary import Summary, summary
from jlora.core.layout import Layout, LoraKernel

__all__ = ["Factored", "Layout", "LoraConfig", "LoraKernel", "Summary", "adapted", "bias_rules", "dora",
           "kernel_layouts", "layout", "optimizer", "paths", "summary", "to_plain_adapter"]
