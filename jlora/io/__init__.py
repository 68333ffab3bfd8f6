"""Adapters on disk: orbax adapter checkpoints with manifests (:mod:`jlora.io.checkpoint`), crash-safe
training checkpoints, and the PEFT format (:mod:`jlora.io.peft`).

Imports :mod:`jlora.core`, :mod:`jlora.quant` and :mod:`jlora.trace` (PEFT reads kernel roles from a trace).
"""

from jlora.io import checkpoint, peft
from jlora.io.checkpoint import TrainCheckpointer, TrainState, restore_adapter, save_adapter

__all__ = ["TrainCheckpointer", "TrainState", "checkpoint", "peft", "restore_adapter", "save_adapter"]
