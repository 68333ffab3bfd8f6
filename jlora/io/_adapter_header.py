"""The JSON header of an adapter checkpoint (item ``jlora``): built from a lora tree and its config on
save, read back and checked on restore. Its format: ``{"format", "version", "config", "metadata",
"leaves": {path: {"shape", "dtype"}}, "layouts": {kernel path: Layout JSON}}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from jlora.core import paths
from jlora.core._config import LoraConfig
from jlora.core._describe import MAGNITUDE, ROWS, WHOLE, A, kernel_layouts, leaf_roles
from jlora.io._files import FORMAT, VERSION, check_manifest, short

_FIX_CONFIG = "fix: pass the LoraConfig the tree was made with (jlora.init(key, params, config))"


def leaf_table(lora: Any) -> dict[str, dict[str, Any]]:
    table = {}
    for p, x in paths.flatten(lora).items():
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"save_adapter: lora leaf '{p}' is a {type(x).__name__}, expected an "
                            "array; fix: save the tree jlora.init returned (it holds only arrays).")
        table[p] = {"shape": [int(d) for d in x.shape], "dtype": np.dtype(x.dtype).name}
    return table


def check_describes(lora: Any, config: LoraConfig) -> None:
    """Raises ValueError unless ``config`` describes every leaf of ``lora`` (rank, targets, trainable).

    Each leaf's role (A, B, DoRA magnitude, trained rows, trained whole) comes from
    :func:`jlora.core._describe.leaf_roles`; A's rank is checked against the config.
    """
    layouts = kernel_layouts(lora)
    flat = paths.flatten(lora)
    for p, leaf in leaf_roles(lora).items():
        if paths.matches(config.trainable, p):
            continue
        kernel, part, x = leaf.owner, leaf.role, flat[p]
        if part == ROWS:
            rows = config.rows_for(kernel)
            if rows is None or x.shape[:1] != (len(rows),):
                raise ValueError(f"save_adapter: lora leaf {p!r} holds {x.shape[0]} trained rows, the config's "
                                 f"embedding_rows gives {rows} for {kernel!r}; {_FIX_CONFIG}.")
            continue
        if part == WHOLE:
            raise ValueError(f"save_adapter: lora leaf {p!r} is trained whole, but the config's trainable "
                             f"{list(config.trainable)} does not match it; {_FIX_CONFIG}.")
        if not paths.matches(config.targets, kernel) or paths.matches(config.exclude, kernel):
            raise ValueError(f"save_adapter: lora leaf {p!r} adapts {kernel!r}, which the config's targets "
                             f"{list(config.targets)} (exclude {list(config.exclude)}) do not select; "
                             f"{_FIX_CONFIG}.")
        if part == MAGNITUDE and not config.use_dora:
            raise ValueError(f"save_adapter: lora leaf {p!r} is a DoRA magnitude, but the config has "
                             f"use_dora=False; {_FIX_CONFIG}.")
        if part == A:
            _check_rank(p, kernel, x.shape[-1], config, layouts.get(kernel))


def _check_rank(p: str, kernel: str, last: int, config: LoraConfig, layout: Any) -> None:
    """A's last axis against the config's rank (over the enabled groups of a fused kernel, per feature
    group of a grouped conv: PEFT's convention)."""
    fused = config.fused_for(kernel)
    n = sum(fused) if fused else 1
    want = config.rank_for(kernel) // (layout.feature_groups if layout is not None else 1)
    if last != want * n:
        per = f" over {n} enabled groups" if fused else ""
        raise ValueError(f"save_adapter: lora factor {p!r} has rank {last / n:g} (last axis "
                         f"{last}{per}), the config gives rank {want} for {kernel!r}; "
                         f"{_FIX_CONFIG}, e.g. config.replace(rank=...) or rank_pattern.")


def read_header(directory: Path, verify: bool, who: str) -> dict[str, Any]:
    check_manifest(directory, who, verify)
    fix = "fix: restore from another copy, or save the adapter again"
    item = directory / "jlora"
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            header = ckptr.restore(directory, ocp.args.Composite(jlora=ocp.args.JsonRestore()))["jlora"]
    except UnicodeDecodeError as e:
        raise ValueError(f"{who}: the header in '{item}' is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                         f"offset {e.start}): the checkpoint is damaged; {fix}.") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{who}: the header in '{item}' is not valid JSON ({e.msg} at line {e.lineno} "
                         f"column {e.colno}): the checkpoint is damaged; {fix}.") from e
    except Exception as e:  # orbax / filesystem errors: one clear message
        raise ValueError(f"{who}: cannot read the header in '{item}' ({short(e)}); {fix}.") from e
    version = header.get("version") if isinstance(header, dict) else None
    if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(version, int):
        raise ValueError(f"{who}: '{directory}' has no jlora adapter header (format "
                         f"{header.get('format') if isinstance(header, dict) else header!r}); fix: pass a "
                         "directory written by save_adapter.")
    if version > VERSION:
        raise ValueError(f"{who}: '{directory}' has format version {version}; this jlora reads "
                         f"{FORMAT!r} up to version {VERSION}; fix: upgrade jlora.")
    try:
        config = LoraConfig.from_json(header["config"])
        leaves = {str(p): {"shape": [int(d) for d in v["shape"]], "dtype": str(np.dtype(v["dtype"]))}
                  for p, v in header["leaves"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{who}: the header in '{item}' does not hold a valid LoraConfig and leaf table "
                         f"({short(e)}); {fix}.") from e
    layouts = header.get("layouts") or {}
    if not isinstance(layouts, dict):
        raise ValueError(f"{who}: the header in '{item}' has a malformed layout table; {fix}.")
    return {"config": config, "metadata": header.get("metadata") or {}, "leaves": leaves, "layouts": layouts}


def build_header(lora: Any, config: LoraConfig, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The JSON header of a save: config, metadata, leaf table and layouts; the tree must be non-empty
    and described by ``config``, the metadata JSON-serialisable."""
    try:
        meta = json.loads(json.dumps(dict(metadata or {})))
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_adapter: metadata must be JSON-serialisable: {e}; fix: pass numbers, "
                        "strings, lists and dicts only.") from e
    leaves = leaf_table(lora)
    if not leaves:
        raise ValueError("save_adapter: the lora tree is empty; nothing to save; fix: pass the tree "
                         "jlora.init returned.")
    check_describes(lora, config)
    return {"format": FORMAT, "version": VERSION, "config": json.loads(config.to_json()),
            "metadata": meta, "leaves": leaves,
            "layouts": {p: lay.to_json() for p, lay in kernel_layouts(lora).items()}}
