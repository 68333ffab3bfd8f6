"""PEFT interop: read and write ``adapter_config.json`` + ``adapter_model.safetensors``.

Key maps, module names and PEFT's matching/config rules live in :mod:`jlora.io._peft_keys` (re-exported
here: ``module_name``, ``LLAMA_KEY_MAP``, ``BERT_KEY_MAP``, ``KeyMap``); this module converts tensor
layouts and does the file I/O.

:func:`load` runs the steps of :mod:`jlora.io._peft_read` (read the files -> classify the keys ->
resolve each kernel's layout -> convert the factors and whole leaves -> build the
:class:`~jlora.LoraConfig`); :func:`save` those of :mod:`jlora.io._peft_write` (collect the lora
tree's leaves -> resolve each kernel's layout -> convert -> write the two files).

Layouts (PyTorch on the left, jlora on the right)::

    Linear     lora_A.weight (r, in)           A (in..., r)     multi-axis kernels flattened, C order
               lora_B.weight (out, r)          B (r, out...)
    Embedding  lora_embedding_A (r, vocab)     A (vocab, r)
               lora_embedding_B (d, r)         B (r, d)
    Conv       lora_A.weight (r, cin, k...)    A (k..., cin, r)  a conv to r channels
               lora_B.weight (cout, r, 1...)   B (r, cout)       a 1x1 conv
    Experts    lora_A.weight (E·r, in)         A (E, in, r)      PEFT target_parameters (one (E, ., .)
               lora_B.weight (out, r·E)        B (E, r, out)     parameter; see jlora.io._peft_experts)

Whole trained leaves (jlora's ``trainable``) become PEFT's ``modules_to_save`` (weights of a whole
module) and ``bias`` (``'lora_only'`` or ``'all'``). Only safetensors is read or written; a
pickled ``adapter_model.bin`` is refused, never unpickled.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jlora.core import paths
from jlora.core._config import LoraConfig
from jlora.core._describe import kernel_layouts, nest
from jlora.core.layout import Layout
from jlora.io import _peft_experts as peft_experts
from jlora.io import _peft_read as read
from jlora.io import _peft_write as write
from jlora.io._peft_keys import (BERT_KEY_MAP, GPT2_FAN_IN_FAN_OUT, GPT2_KEY_MAP, LLAMA_KEY_MAP, KeyMap, PortKeyMap,
                                 _mapper, _place, _torch_param, module_name, stated_kernels)

__all__ = ["save", "load", "module_name", "KeyMap", "PortKeyMap", "LLAMA_KEY_MAP", "BERT_KEY_MAP", "GPT2_KEY_MAP",
           "GPT2_FAN_IN_FAN_OUT"]


def _adapter_dir(directory: str | os.PathLike[str], adapter_name: str | None) -> Path:
    root = Path(directory)
    if adapter_name is None or adapter_name == "default":
        return root
    if not isinstance(adapter_name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", adapter_name) or adapter_name in (
            ".", ".."):
        raise ValueError(
            f"adapter_name: expected a plain folder name (letters, digits, '_', '-', '.'), got {adapter_name!r}; "
            "fix: a name such as 'sql' (PEFT writes a named adapter to directory/adapter_name)"
        )
    return root / adapter_name


def save(directory: str | os.PathLike[str], lora: Mapping[str, Any], config: LoraConfig, key_map: KeyMap, *,
         adapter_name: str | None = None, overwrite: bool = False, conv: str | Sequence[str] = (),
         fan_in_fan_out: str | Sequence[str] = (), params: Any = None,
         base_model_name_or_path: str | None = None, task_type: str | None = None,
         param_order: Sequence[str] = peft_experts.PARAM_ORDER) -> Path:
    """Writes a jlora adapter as a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``peft.PeftModel.from_pretrained(model, directory)`` then loads it onto the equivalent
    ``transformers`` model (``subfolder=adapter_name, adapter_name=adapter_name`` for a named one).

    Args:
      directory: the output folder (created if needed). Nothing is written outside it.
      lora: the lora tree (nested dicts: ``{"A": (in..., r), "B": (r, out...)}`` per adapted kernel,
        whole arrays for trained leaves).
      config: the :class:`jlora.LoraConfig` the tree was made with.
      key_map: jlora leaf path -> torch module name (callable or ``(regex, replacement)`` pairs).
      adapter_name: write into ``directory/adapter_name`` as PEFT does for a non-default adapter.
      overwrite: replace an existing adapter in the target folder (refused otherwise).
      conv: regexes of plain-dict kernel paths that are convolutions (``(k..., cin, cout)``); a
        multi-axis kernel is otherwise a dense map flattened to ``nn.Linear``. Not needed for trees
        from :func:`jlora.init` (their layout says it).
      fan_in_fan_out: regexes of kernel paths whose torch module stores its weight ``(in, out)``
        (GPT-2's ``Conv1D``: :data:`GPT2_FAN_IN_FAN_OUT`): PEFT's ``fan_in_fan_out`` is written for
        them and their trained-whole weights are not transposed.
      params: the base parameters: a module saved whole (``modules_to_save``) whose bias was not
        trained takes it from here (PEFT saves every parameter of such a module).
      base_model_name_or_path: recorded in the config (PEFT uses it only when no model is passed).
      task_type: PEFT task type (e.g. ``'CAUSAL_LM'``), or None for a plain ``PeftModel``.
      param_order: expert kernels (a stack axis, e.g. ``(E, in, out)``) are written as PEFT
        ``target_parameters`` (key_map gives the torch parameter name); this is the torch module's
        order of its expert parameters (:mod:`jlora.io._peft_experts`).

    Returns:
      The folder holding the two files.

    >>> import tempfile, jax.numpy as jnp
    >>> lora = {"params": {"lm_head": {"kernel": {"A": jnp.ones((4, 2)), "B": jnp.ones((2, 3))}}}}
    >>> out = save(tempfile.mkdtemp(), lora, LoraConfig(rank=2, targets=".*"), LLAMA_KEY_MAP)
    >>> sorted(p.name for p in out.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    write.check_arguments(lora, config)
    fn = _mapper(key_map)
    conv = (conv,) if isinstance(conv, str) else tuple(conv)
    fan_in_fan_out = (fan_in_fan_out,) if isinstance(fan_in_fan_out, str) else tuple(fan_in_fan_out)
    out_dir = _adapter_dir(directory, adapter_name)
    write.refuse_existing(out_dir, overwrite)

    leaves = write.collect(lora)
    layouts = kernel_layouts(lora)
    kernels = [write.resolve(path, pair, layouts.get(path), config, conv)
               for path, pair in sorted(leaves.pairs.items())]
    place = write.placer(fn)
    got = write.Converted()
    write.convert_kernels(kernels, place, config, param_order, got)
    write.convert_rows(leaves.rows, place, config, got)
    write.convert_whole(leaves.whole, place, params, conv, fan_in_fan_out, got)
    body = write.config_body(config, got, fan_in_fan_out, task_type, base_model_name_or_path)
    write.write_files(out_dir, got.tensors, body)
    return out_dir


def load(directory: str | os.PathLike[str], params: Any, key_map: KeyMap, *,
         adapter_name: str | None = None, apply_fn: Callable[..., Any] | None = None, args: Sequence[Any] = (),
         layouts: Mapping[str, Layout] | None = None, ignore: str | Sequence[str] = (),
         fan_in_fan_out: str | Sequence[str] | None = None,
         param_order: Sequence[str] = peft_experts.PARAM_ORDER) -> tuple[dict[str, Any], LoraConfig]:
    """Reads a PEFT LoRA adapter into a jlora ``(lora, config)`` pair for ``params``.

    Args:
      directory: the folder PEFT's ``save_pretrained`` wrote (``adapter_config.json`` and
        ``adapter_model.safetensors``; pickled ``.bin`` files are refused, never unpickled).
      params: the base parameter tree (arrays or ``jax.ShapeDtypeStruct``s); its paths, through
        ``key_map``, tell where each torch module lives.
      key_map: jlora leaf path -> torch module name (callable or ``(regex, replacement)`` pairs).
      adapter_name: read ``directory/adapter_name`` (PEFT's folder for a non-default adapter).
      apply_fn: the model's apply function: the axis roles of each adapted kernel are read from its
        trace on ``args`` (needed for kernels not stored ``(in..., out...)``, e.g. an ``(out, in)``
        PyTorch-style or Gemma einsum kernel, and for OIHW or grouped convs).
      args: example inputs for ``apply_fn``.
      layouts: ``{path: Layout}`` given directly instead (e.g. ``jlora.kernel_layouts(lora)``).
        Without a trace or a layout, a :class:`PortKeyMap` states the order of the kernels (the Flax
        ports' maps do: ``(in, out)``); with none of the three, the sizes decide, and a kernel they do
        not tell apart (a square one: ``(in, out)`` and ``(out, in)`` both fit) is refused.
      ignore: regexes of torch module names whose adapter tensors are skipped on purpose (a module the
        Flax model does not have, e.g. BERT's ``pooler.dense`` matched by a ``dense`` target).
      fan_in_fan_out: regexes of kernel paths whose torch module stores ``(in, out)`` (GPT-2's
        ``Conv1D``: :data:`GPT2_FAN_IN_FAN_OUT`); their weights saved whole are not transposed.
        Default: inferred from shapes, and a square one is refused when the adapter says
        ``fan_in_fan_out``.
      param_order: for ``target_parameters`` (expert kernels): the torch module's order of its
        expert parameters (:mod:`jlora.io._peft_experts`).

    Returns:
      ``(lora, config)``: the lora tree (nested dicts of ``jax.Array``) and a
      :class:`jlora.LoraConfig` whose targets, ranks, alphas (PEFT's ``rank_pattern`` and
      ``alpha_pattern`` resolved per module), ``rslora``, dropout and ``trainable`` leaves
      (``modules_to_save`` and ``bias``) reproduce the adapter; use with :func:`jlora.merge` or
      :func:`jlora.lora_apply`.

    >>> import tempfile, jax.numpy as jnp
    >>> params = {"params": {"lm_head": {"kernel": jnp.zeros((4, 3))}}}
    >>> lora = {"params": {"lm_head": {"kernel": {"A": jnp.ones((4, 2)), "B": jnp.ones((2, 3))}}}}
    >>> d = save(tempfile.mkdtemp(), lora, LoraConfig(rank=2, alpha=4, targets=".*"), LLAMA_KEY_MAP)
    >>> back, cfg = load(d, params, LLAMA_KEY_MAP)
    >>> back["params"]["lm_head"]["kernel"]["A"].shape, cfg.scale_for("params/lm_head/kernel")
    ((4, 2), 2.0)
    """
    fn = _mapper(key_map)
    kernels = stated_kernels(key_map)
    ignore_rules = (ignore,) if isinstance(ignore, str) else tuple(ignore)
    weights, body, tensors = read.read_files(_adapter_dir(directory, adapter_name))
    flat = paths.flatten(params)
    owners = read.Owners.of(flat, lambda p: _place(fn, p), _torch_param)
    experts = peft_experts.read(tensors, body, params, lambda p: _place(fn, p), layouts=layouts, apply_fn=apply_fn,
                                args=args, param_order=param_order)  # pops the target_parameters tensors
    found = read.classify(tensors, weights, ignore_rules)
    known = read.traced_layouts(found, owners, layouts, apply_fn, params, args)
    ctx = read.ReadContext(weights, body, flat, owners, known, kernels)

    adapted = [read.resolve_kernel(module, parts, ctx) for module, parts in sorted(found.factors.items())]
    got = read.Converted()
    for kernel in adapted:
        read.convert_kernel(kernel, ctx, got)
    read.convert_experts(experts, got)
    read.convert_rows(found.token_rows, ctx, got)
    read.convert_whole(found, ctx, fan_in_fan_out, got)
    return nest(got.out, got.used), read.build_config(body, got)
