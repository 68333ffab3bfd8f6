"""Many adapters over one frozen base: stacks, mixed batches, mixed-batch training, combination.

A *stack* holds N adapters in one lora tree with a leading adapter axis on every leaf; ranks are
padded to a common rank per path. Which adapter runs is an array (an index), never a Python value:
switching adapters, changing the mix of a batch, or swapping the stacked arrays for another stack of
the same shapes never recompiles. The last entry of a stack is all zeros: the id ``len(names)``
(``stack.base_id``) means "base model only".

>>> import jax.numpy as jnp, jlora
>>> frozen, cfg = {"w": jnp.zeros((2, 2))}, jlora.LoraConfig(rank=1, alpha=1, targets="w")
>>> s = stack(frozen, {"a": ({"w": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2))}}, cfg)})
>>> s.names, s.base_id, select(s, s.id("a"))["w"]["B"].tolist()
(('a',), 1, [[1.0, 1.0]])

Imports every folder below it (:mod:`jlora.core`, :mod:`jlora.trace`, :mod:`jlora.adapt`, :mod:`jlora.io`).
"""

from jlora.multi._combine import combine
from jlora.multi._serve import gathered_lowrank, grouped_lowrank, mixed_apply
from jlora.multi._stack import Stack, put, scaled, select, stack, unstack
from jlora.multi._train import example_weights, per_adapter, restore_stack, save_stack, train_step

__all__ = ["Stack", "combine", "example_weights", "gathered_lowrank", "grouped_lowrank", "mixed_apply",
           "per_adapter", "put", "restore_stack", "save_stack", "scaled", "select", "stack", "train_step",
           "unstack"]
