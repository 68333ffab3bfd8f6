"""Adapter checkpoints on orbax: the lora tree, its config and user metadata, nothing else.

An adapter checkpoint is a directory written by orbax (``CompositeCheckpointHandler``:
item ``lora`` holds the factor arrays, item ``jlora`` a JSON header with the config,
the user metadata and every leaf's shape and dtype) plus ``jlora_manifest.json``, the
commit marker, which lists the sha256 and size of every file. A save goes to a hidden
sibling ``.<name>.jlora-partial-<id>`` and is renamed into place only once complete, so
a save killed midway never produces a directory that loads; ``restore_adapter`` checks
every file against the manifest before reading anything.

``overwrite=True`` swaps with two renames: the old adapter to ``.<name>.jlora-old-<id>``,
then the new one into place. A process killed between them leaves both hidden folders;
a reader then loads the new one (it is complete: its manifest was written first), and the
next save to that name finishes the swap and removes the leftovers. One writer at a time:
``save_adapter`` holds a lock (:class:`jlora.io._files.WriterLock`) and refuses a second.

The header (config, metadata, leaf table, layouts) is built and read by :mod:`jlora.io._adapter_header`;
``TrainCheckpointer`` (resumable training on orbax's ``CheckpointManager``) lives in
:mod:`jlora.io._train` and is re-exported here.
"""

from __future__ import annotations

import os
import shutil
import uuid
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jlora.core import paths
from jlora.core._config import LoraConfig
from jlora.core._describe import adapted, nest
from jlora.core.layout import Layout
from jlora.io._adapter_header import build_header, read_header
from jlora.io._files import (MANIFEST, WriterLock, broadcast_text, commit, files, is_primary, leftovers, pause_point,
                             read_resolved, recover, short, staging_path, sync, write_manifest)
from jlora.io._train import TrainCheckpointer, TrainState

__all__ = ["save_adapter", "restore_adapter", "read_adapter_header", "validate_adapter",
           "TrainCheckpointer", "TrainState"]


# --------------------------------------------------------------------------- shardings and writing


def _sharding_for(path: str, shardings: Any, flat_like: Mapping[str, Any] | None):
    if isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if isinstance(shardings, Mapping):
        if path not in shardings:
            raise ValueError(f"restore_adapter: `shardings` has no entry for the saved leaf '{path}'; fix: "
                             "pass a tree with the lora structure (jlora.sharding.lora_shardings) or "
                             "one Sharding for every leaf.")
        return shardings[path]
    if flat_like is not None and path in flat_like:
        s = getattr(flat_like[path], "sharding", None)
        if isinstance(s, jax.sharding.Sharding):
            return s
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _write_adapter(directory: Path, lora: Any, header: dict[str, Any], overwrite: bool) -> None:
    """Writes ``lora`` and ``header`` to a staging folder and commits it to ``directory`` (under the
    writer lock; every process calls it): a failed save leaves nothing, an old adapter is replaced
    only once the new one is complete."""
    key = f"jlora_save_adapter_{zlib.crc32(str(directory).encode())}"
    if is_primary():
        recover(directory)
    sync(key + "_recovered")
    existing = directory.exists() and (not directory.is_dir() or any(directory.iterdir()))
    if existing and not overwrite:
        raise FileExistsError(f"save_adapter: '{directory}' already exists; pass overwrite=True to "
                              "replace it, or choose a new directory.")
    if existing and not (directory / MANIFEST).is_file():
        raise FileExistsError(f"save_adapter: '{directory}' exists and is not a jlora adapter "
                              f"checkpoint (no {MANIFEST}); refusing to replace it even with "
                              "overwrite=True; fix: choose a new directory or delete it yourself.")
    token = broadcast_text(uuid.uuid4().hex[:12] if is_primary() else "")
    staging = staging_path(directory, token)
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(staging, ocp.args.Composite(lora=ocp.args.StandardSave(lora),
                                                   jlora=ocp.args.JsonSave(header)))
        pause_point("adapter-written")
        if is_primary():
            write_manifest(staging)
            pause_point("adapter-committed")
            commit(staging, directory, replace=existing)
    except BaseException:
        if is_primary() and (directory.exists() or not existing):  # a failed save leaves nothing
            for kind, path in leftovers(directory).get(token, {}).items():
                if kind != "old":
                    shutil.rmtree(path, ignore_errors=True)
        raise
    sync(key + "_" + token)


def _read_adapter(where: Path, verify: bool, shardings: Any, flat_like: Mapping[str, Any] | None, like: Any,
                  frozen: Any) -> tuple[Any, LoraConfig, dict]:
    """``(lora, config, metadata)`` of the checkpoint folder ``where``: header first, the arrays checked
    against ``like``/``frozen`` as shapes, then restored into their shardings."""
    header = read_header(where, verify, "restore_adapter")
    config = header["config"]
    abstract = paths.unflatten_dict({
        p: jax.ShapeDtypeStruct(tuple(leaf["shape"]), jax.numpy.dtype(leaf["dtype"]),
                                sharding=_sharding_for(p, shardings, flat_like))
        for p, leaf in header["leaves"].items()})
    name = f"checkpoint '{where}'"
    validate_adapter(abstract, like=like, frozen=frozen, config=config, where=name)
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            lora = ckptr.restore(where, ocp.args.Composite(
                lora=ocp.args.StandardRestore(abstract)))["lora"]
    except Exception as e:  # tensorstore/orbax errors on damaged data
        raise ValueError(f"restore_adapter: cannot read the arrays of {name} ({short(e)}): the data "
                         "is damaged; fix: restore from another copy (verify=True checks every "
                         "file's sha256 first).") from e
    try:
        layouts = {p: Layout.from_json(v) for p, v in header["layouts"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"restore_adapter: the layout table of {name} is malformed ({short(e)}); fix: "
                         "restore from another copy, or save the adapter again.") from e
    return nest(paths.flatten(lora), layouts), config, header["metadata"]


# --------------------------------------------------------------------------- adapters


def save_adapter(directory: str | os.PathLike, lora: Any, config: LoraConfig,
                 metadata: Mapping[str, Any] | None = None, *, overwrite: bool = False) -> int:
    """Saves a LoRA adapter (lora tree, config as JSON, user metadata) with orbax.

    The save is atomic: it is written to a hidden sibling directory, a manifest with the
    sha256 of every file is added last (the commit marker), then it is renamed to
    ``directory``. With ``overwrite=True`` an existing checkpoint is replaced only after
    the new one is complete, and a process killed at any point leaves a name that loads
    (the old adapter or the new one). Only the lora tree is written, never the base model.
    Every process must call it in a multi-process run.

    Args:
      directory: the checkpoint directory to create (absent or empty unless ``overwrite``).
      lora: the lora tree (``jlora.init``), arrays of any sharding.
      config: the ``LoraConfig`` the tree was made with (stored as JSON); it must describe
        the tree (targets, ranks, trainable leaves).
      metadata: JSON-serialisable user metadata (base model name, step, metrics ...).
      overwrite: replace an existing adapter checkpoint at ``directory`` (never another
        kind of directory).

    Returns:
      The checkpoint's size on disk in bytes (factors + metadata).

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is False.
      TypeError: ``config`` is not a LoraConfig, ``metadata`` is not JSON-serialisable.
      ValueError: ``config`` does not describe ``lora``.
      RuntimeError: another process (or object) is saving to ``directory`` right now.

    Example:
      >>> import tempfile, jax.numpy as jnp, jlora
      >>> cfg = jlora.LoraConfig(rank=2, targets=".*")
      >>> lora = {"w": {"A": jnp.ones((4, 2)), "B": jnp.zeros((2, 3))}}
      >>> d = tempfile.mkdtemp() + "/adapter"
      >>> save_adapter(d, lora, cfg, {"step": 10}) > 0
      True
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"save_adapter: config must be a jlora.LoraConfig, got {type(config).__name__}; "
                        "fix: pass the LoraConfig given to jlora.init.")
    directory = Path(directory).absolute()
    header = build_header(lora, config, metadata)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with WriterLock(directory.parent / f".{directory.name}.jlora-lock", "save_adapter", directory,
                    "wait for the other save to finish (or stop that process), or save to another "
                    "directory"):
        _write_adapter(directory, lora, header, overwrite)
    return sum(p.stat().st_size for p in files(directory))


def read_adapter_header(directory: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Reads a saved adapter's header: config, metadata and leaf shapes, without the arrays.

    Args:
      directory: an adapter checkpoint written by ``save_adapter``.
      verify: check every file against the manifest first.

    Returns:
      ``{"config": LoraConfig, "metadata": dict, "leaves": {path: {"shape", "dtype"}}}``.

    Raises:
      ValueError: missing, incomplete or corrupted checkpoint, or an unreadable header.

    Example:
      >>> import tempfile, jax.numpy as jnp, jlora
      >>> d = tempfile.mkdtemp() + "/a"
      >>> _ = save_adapter(d, {"w": {"A": jnp.ones((4, 2)), "B": jnp.zeros((2, 3))}},
      ...                  jlora.LoraConfig(rank=2, targets=".*"))
      >>> read_adapter_header(d)["leaves"]["w/B"]
      {'shape': [2, 3], 'dtype': 'float32'}
    """
    directory = Path(directory).absolute()
    return read_resolved(directory, "read_adapter_header", lambda d: read_header(d, verify, "read_adapter_header"))


def validate_adapter(lora: Any, *, like: Any = None, frozen: Any = None,
                     config: LoraConfig | None = None, where: str = "adapter") -> None:
    """Checks that a lora tree (or its shapes) fits a template lora tree or a frozen model.

    Args:
      lora: the lora tree to check (arrays or ``ShapeDtypeStruct``).
      like: a lora template (``jax.eval_shape`` of ``jlora.init`` on the target model): the
        paths, shapes and dtypes must be the same.
      frozen: the base params: every factor pair must factor the kernel at its path.
      config: the adapter's config (needed with ``frozen``).
      where: a name for the checked tree in error messages.

    Raises:
      ValueError: naming the path and both shapes (and ranks) on the first mismatch.

    Example:
      >>> import jax.numpy as jnp
      >>> a = {"w": {"A": jnp.ones((4, 2)), "B": jnp.ones((2, 3))}}
      >>> validate_adapter(a, like={"w": {"A": jnp.ones((4, 8)), "B": jnp.ones((8, 3))}})
      Traceback (most recent call last):
      ...
      ValueError: adapter leaf 'w/A': shape (4, 2) (rank 2) does not match the target's (4, 8) (rank 8); ...
    """
    flat = paths.flatten(lora)
    if like is not None:
        ref = paths.flatten(like)
        missing, extra = sorted(set(ref) - set(flat)), sorted(set(flat) - set(ref))
        if missing or extra:
            raise ValueError(
                f"{where} paths differ from the target's: only in the {where}: "
                f"{', '.join(extra[:5]) or 'none'}; only in the target: {', '.join(missing[:5]) or 'none'}. "
                "Fix: restore into a model with the same LoRA targets (same config.targets).")
        for p, x in flat.items():
            got, want = tuple(x.shape), tuple(ref[p].shape)
            if got != want:
                g, w = (f" (rank {got[-1]})", f" (rank {want[-1]})") if p.endswith("/A") else ("", "")
                raise ValueError(f"{where} leaf '{p}': shape {got}{g} does not match the target's "
                                 f"{want}{w}; fix: restore into a model of the same architecture and "
                                 "LoRA rank, or restore without `like`.")
            if np.dtype(x.dtype) != np.dtype(ref[p].dtype):
                raise ValueError(f"{where} leaf '{p}': dtype {np.dtype(x.dtype).name} does not match the "
                                 f"target's {np.dtype(ref[p].dtype).name}; fix: cast after restoring.")
    if frozen is not None:
        if config is None:
            raise ValueError("validate_adapter: pass config= with frozen=; fix: the adapter's LoraConfig "
                             "(restore_adapter returns it).")
        try:
            adapted(frozen, lora, config)
        except ValueError as e:
            raise ValueError(f"{where} does not fit the frozen model: {e}") from e


def restore_adapter(directory: str | os.PathLike, *, shardings: Any = None, like: Any = None,
                    frozen: Any = None, verify: bool = True) -> tuple[Any, LoraConfig, dict]:
    """Restores ``(lora, config, metadata)`` from ``save_adapter``; needs no config at hand.

    The checkpoint is checked first (complete, every file's sha256 as in its manifest) and
    never written to. Arrays are restored straight into the requested shardings, so an
    adapter saved on 8 devices restores on 1 and the reverse. If an overwriting save was
    killed between its renames, the adapter it had finished writing is restored.

    Args:
      directory: the adapter checkpoint.
      shardings: where to put the arrays: one ``jax.sharding.Sharding`` for every leaf, a
        tree with the lora structure (``jlora.sharding.lora_shardings``), or None: the
        shardings of ``like``'s leaves if it has them, else the first local device.
      like: a lora template (arrays or ``jax.eval_shape(...)`` of ``jlora.init`` on the
        target model): paths, shapes (so ranks) and dtypes must match.
      frozen: the base params to check the factors against (each pair must factor the
        kernel at its path).
      verify: check every file's sha256 (reads the checkpoint twice; small for adapters).

    Returns:
      ``(lora, config, metadata)``: the tree (nested dicts), the ``LoraConfig`` and the
      user metadata.

    Raises:
      ValueError: missing, incomplete (killed save) or corrupted checkpoint; a mismatch with
        ``like``/``frozen`` naming the path and both shapes.

    Example:
      >>> import tempfile, jax.numpy as jnp, jlora
      >>> d = tempfile.mkdtemp() + "/a"
      >>> _ = save_adapter(d, {"w": {"A": jnp.ones((4, 2)), "B": jnp.zeros((2, 3))}},
      ...                  jlora.LoraConfig(rank=2, targets=".*"), {"step": 3})
      >>> lora, cfg, meta = restore_adapter(d)
      >>> lora["w"]["A"].shape, cfg.rank, meta
      ((4, 2), 2, {'step': 3})
    """
    directory = Path(directory).absolute()
    flat_like = paths.flatten(like) if like is not None else None
    if shardings is not None and not isinstance(shardings, jax.sharding.Sharding):
        shardings = paths.flatten(shardings)
    return read_resolved(directory, "restore_adapter",
                         lambda where: _read_adapter(where, verify, shardings, flat_like, like, frozen))
