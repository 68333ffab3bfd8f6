"""Trainable extras beside the factors: bias modes, whole modules, rows of an embedding table.

- Biases (PEFT's ``bias="none" | "all" | "lora_only"``): :func:`bias_rules` gives the regexes for
  ``LoraConfig(trainable=...)``; those leaves are then trained whole and saved in the lora tree.
- Whole modules (PEFT's ``modules_to_save``, e.g. a new classifier head): list their leaves in
  ``LoraConfig.trainable`` (``r"params/classifier/.*"``).
- New tokens (PEFT's ``trainable_token_indices``): ``LoraConfig(embedding_rows={regex: (row, ...)})``
  puts a leaf ``'rows'`` of shape ``(n_rows,) + table.shape[1:]`` at the table's path in the lora
  tree (a copy of those rows at init); :func:`jlora.merge` scatters it into the table before any
  LoRA delta of the same table is added. Only those rows train; the rest of the table stays frozen.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core import paths

BIAS_MODES = ("none", "all", "lora_only")


def bias_rules(mode: str, targets: str | Sequence[str] = (), params: Any = None) -> tuple[str, ...]:
    """The ``trainable`` regexes for PEFT's bias modes.

    Args:
      mode: ``'none'`` (no bias trains), ``'all'`` (every leaf named ``bias``) or ``'lora_only'``
        (the biases beside the adapted kernels).
      targets: the ``LoraConfig.targets`` regexes (for ``'lora_only'``).
      params: optional parameter tree; with it, ``'lora_only'`` returns the exact (escaped) paths of the
        ``bias`` leaves that sit beside a targeted ``kernel``; without it, each target regex must end in
        ``kernel`` and that suffix is replaced by ``bias``.

    Returns:
      A tuple of regexes for ``LoraConfig(trainable=...)`` (empty for ``'none'``).

    >>> bias_rules("lora_only", r".*/(query|value)/kernel")
    ('.*/(query|value)/bias',)
    >>> bias_rules("all"), bias_rules("none")
    (('(.*/)?bias',), ())
    """
    if mode not in BIAS_MODES:
        raise ValueError(f"bias_rules: mode must be one of {BIAS_MODES} (PEFT's `bias`), got {mode!r}; "
                         "fix: e.g. bias_rules('all')")
    if mode == "none":
        return ()
    if mode == "all":
        return (r"(.*/)?bias",)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ValueError("bias_rules('lora_only'): no targets; fix: pass the LoraConfig.targets regexes")
    if params is not None:
        flat = paths.flatten(params)
        found = []
        for p in flat:
            parent, _, name = p.rpartition("/")
            bias = f"{parent}/bias" if parent else "bias"
            if paths.matches(targets, p) and bias in flat and bias != p:
                found.append(re.escape(bias))
        if not found:
            raise ValueError(
                f"bias_rules('lora_only'): no adapted kernel matched by {targets} has a sibling 'bias' leaf; "
                "fix: use mode='none'"
            )
        return tuple(found)
    out = []
    for t in targets:
        if not t.endswith("kernel"):
            raise ValueError(
                f"bias_rules('lora_only'): target {t!r} does not end in 'kernel', so its bias path cannot be "
                "derived from the regex; fix: pass params=... to resolve the exact bias paths"
            )
        out.append(t[: -len("kernel")] + "bias")
    return tuple(out)


def init_rows(table: Any, rows: Sequence[int], path: str) -> jax.Array:
    """A copy of the trained rows of ``table`` (its first axis): the initial ``'rows'`` leaf.

    >>> init_rows(jnp.arange(6.0).reshape(3, 2), (2, 0), "emb").tolist()
    [[4.0, 5.0], [0.0, 1.0]]
    """
    if isinstance(table, jax.ShapeDtypeStruct):
        raise ValueError(
            f"LoraConfig.embedding_rows: the rows of {path!r} start as copies of the table, which needs its "
            "values, got a jax.ShapeDtypeStruct; fix: pass arrays (jax.eval_shape can abstract them)"
        )
    shape = tuple(getattr(table, "shape", ()))
    if len(shape) < 2 or not jnp.issubdtype(table.dtype, jnp.floating):
        raise ValueError(
            f"LoraConfig.embedding_rows: {path!r} (shape {shape}) is not a float table with >= 2 axes; "
            "fix: narrow the embedding_rows regex to an embedding table"
        )
    bad = [r for r in rows if r >= shape[0]]
    if bad:
        raise ValueError(
            f"LoraConfig.embedding_rows: rows {bad} of {path!r} are out of range for a table of {shape[0]} rows; "
            "fix: resize the table for the new tokens first, then list their indices"
        )
    return jnp.array(jnp.asarray(table)[jnp.asarray(rows)], copy=True)


def scatter_rows(table: jax.Array, values: jax.Array, rows: Sequence[int] | None, path: str) -> jax.Array:
    """``table`` with ``table[rows] = values`` (a new array; the rows of a trained ``'rows'`` leaf).

    >>> scatter_rows(jnp.zeros((3, 2)), jnp.ones((1, 2)), (1,), "emb").tolist()
    [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    """
    if rows is None:
        raise ValueError(
            f"lora leaf {path + '/rows'!r}: LoraConfig.embedding_rows has no rule for {path!r}; fix: use the "
            "config the lora tree was made with"
        )
    want = (len(rows),) + tuple(table.shape[1:])
    if tuple(values.shape) != want:
        raise ValueError(
            f"lora leaf {path + '/rows'!r}: expected shape {want} ({len(rows)} rows of the table "
            f"{tuple(table.shape)}), got {tuple(values.shape)}; fix: make the lora tree with jlora.init and this config"
        )
    return table.at[jnp.asarray(rows)].set(values.astype(table.dtype))
