"""Adapter checkpoints on orbax: the lora tree, its config and user metadata, nothing else.

An adapter checkpoint is a directory written by orbax (``CompositeCheckpointHandler``:
item ``lora`` holds the factor arrays, item ``jlora`` a JSON header with the config,
the user metadata and every leaf's shape and dtype) plus ``jlora_manifest.json``, the
commit marker, which lists the sha256 and size of every file. A save goes to a hidden
sibling ``.<name>.jlora-partial-<id>`` and is renamed into place only once complete, so
a save killed midway never produces a directory that loads; ``restore_adapter`` checks
every file against the manifest before reading anything.

``TrainCheckpointer`` wraps ``orbax.checkpoint.CheckpointManager`` for resumable training
(lora, optimizer state, step, rng) with ``max_to_keep`` and asynchronous saves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jlora import paths
from jlora.describe import adapted, kernel_layouts, nest
from jlora.layout import Layout
from jlora.config import LoraConfig

__all__ = ["save_adapter", "restore_adapter", "read_adapter_header", "validate_adapter",
           "TrainCheckpointer", "TrainState"]

FORMAT = "jlora-adapter"
VERSION = 1
MANIFEST = "jlora_manifest.json"
PARTIAL = ".jlora-partial-"


# --------------------------------------------------------------------------- helpers


def _is_primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(root: Path) -> None:
    files = {str(p.relative_to(root)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
             for p in _files(root)}
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    _fsync_dir(root)


def _partials(directory: Path) -> list[Path]:
    prefix = f".{directory.name}.jlora-"  # -partial-<id> (a save) or -old-<id> (an overwrite)
    if not directory.parent.is_dir():
        return []
    return sorted(p for p in directory.parent.iterdir() if p.name.startswith(prefix))


def _check_complete(directory: Path, verify: bool) -> None:
    """Raises ValueError unless ``directory`` is a finished, intact adapter checkpoint."""
    if not directory.is_dir():
        partial = _partials(directory)
        hint = (f"; found incomplete save(s) {', '.join(str(p) for p in partial)} (a save or "
                "overwrite that did not finish, e.g. a killed process): they are never loaded; "
                "restore one explicitly by its path if it has a manifest, or delete them"
                if partial else "")
        raise ValueError(f"restore_adapter: no adapter checkpoint at '{directory}'{hint}.")
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise ValueError(
            f"restore_adapter: '{directory}' has no {MANIFEST} (the commit marker written last by "
            "save_adapter): it is an incomplete save or not a jlora adapter checkpoint. Save it "
            "again with jlora.checkpoint.save_adapter.")
    try:
        info = json.loads(manifest.read_text())
        files = info["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"restore_adapter: '{manifest}' is corrupted ({e}); the checkpoint "
                         "cannot be trusted. Restore from another copy.") from e
    if info.get("format") != FORMAT:
        raise ValueError(f"restore_adapter: '{directory}' is not a jlora adapter checkpoint "
                         f"(format {info.get('format')!r}, expected {FORMAT!r}).")
    if not verify:
        return
    have = {str(p.relative_to(directory)) for p in _files(directory)} - {MANIFEST}
    missing = sorted(set(files) - have)
    if missing:
        raise ValueError(f"restore_adapter: checkpoint '{directory}' is corrupted: missing file(s) "
                         f"{', '.join(missing[:5])}. Restore from another copy.")
    for name, want in files.items():
        path = directory / name
        size = path.stat().st_size
        if size != want["bytes"]:
            raise ValueError(f"restore_adapter: checkpoint '{directory}' is corrupted or truncated: "
                             f"'{name}' has {size} bytes, expected {want['bytes']}. Restore from "
                             "another copy.")
        if _sha256(path) != want["sha256"]:
            raise ValueError(f"restore_adapter: checkpoint '{directory}' is corrupted: '{name}' "
                             "does not match its sha256 in the manifest. Restore from another copy.")


def _leaf_table(lora: Any) -> dict[str, dict[str, Any]]:
    flat = paths.flatten(lora)
    table = {}
    for p, x in flat.items():
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"save_adapter: lora leaf '{p}' is a {type(x).__name__}, expected an "
                            "array; the lora tree holds only arrays (jlora.init).")
        table[p] = {"shape": [int(d) for d in x.shape], "dtype": np.dtype(x.dtype).name}
    return table


def _as_dtype(name: str):
    return jax.numpy.dtype(name)


def _sharding_for(path: str, shardings: Any, flat_like: Mapping[str, Any] | None):
    if isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if isinstance(shardings, Mapping):
        if path not in shardings:
            raise ValueError(f"restore_adapter: `shardings` has no entry for the saved leaf '{path}'; "
                             "pass a tree with the lora structure (jlora.sharding.lora_shardings) or "
                             "one Sharding for every leaf.")
        return shardings[path]
    if flat_like is not None and path in flat_like:
        s = getattr(flat_like[path], "sharding", None)
        if isinstance(s, jax.sharding.Sharding):
            return s
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


# --------------------------------------------------------------------------- adapters


def save_adapter(directory: str | os.PathLike, lora: Any, config: LoraConfig,
                 metadata: Mapping[str, Any] | None = None, *, overwrite: bool = False) -> int:
    """Saves a LoRA adapter (lora tree, config as JSON, user metadata) with orbax.

    The save is atomic: it is written to a hidden sibling directory, a manifest with the
    sha256 of every file is added last (the commit marker), then it is renamed to
    ``directory``. With ``overwrite=True`` an existing checkpoint is replaced only after
    the new one is complete. Only the lora tree is written, never the base model. Every
    process must call it in a multi-process run.

    Args:
      directory: the checkpoint directory to create (absent or empty unless ``overwrite``).
      lora: the lora tree (``jlora.init``), arrays of any sharding.
      config: the ``LoraConfig`` the tree was made with (stored as JSON).
      metadata: JSON-serialisable user metadata (base model name, step, metrics ...).
      overwrite: replace an existing adapter checkpoint at ``directory`` (never another
        kind of directory).

    Returns:
      The checkpoint's size on disk in bytes (factors + metadata).

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is False.
      TypeError: ``config`` is not a LoraConfig, ``metadata`` is not JSON-serialisable.

    Example:
      >>> import tempfile, jax.numpy as jnp, jlora
      >>> cfg = jlora.LoraConfig(rank=2, targets=".*")
      >>> lora = {"w": {"A": jnp.ones((4, 2)), "B": jnp.zeros((2, 3))}}
      >>> d = tempfile.mkdtemp() + "/adapter"
      >>> save_adapter(d, lora, cfg, {"step": 10}) > 0
      True
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"save_adapter: config must be a jlora.LoraConfig, got {type(config).__name__}.")
    directory = Path(directory).absolute()
    existing = directory.exists() and (not directory.is_dir() or any(directory.iterdir()))
    if existing and not overwrite:
        raise FileExistsError(f"save_adapter: '{directory}' already exists; pass overwrite=True to "
                              "replace it, or choose a new directory.")
    if existing and not (directory / MANIFEST).is_file():
        raise FileExistsError(f"save_adapter: '{directory}' exists and is not a jlora adapter "
                              f"checkpoint (no {MANIFEST}); refusing to replace it even with "
                              "overwrite=True. Choose a new directory or delete it yourself.")
    try:
        meta = json.loads(json.dumps(dict(metadata or {})))
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_adapter: metadata must be JSON-serialisable: {e}.") from e
    leaves = _leaf_table(lora)
    if not leaves:
        raise ValueError("save_adapter: the lora tree is empty; nothing to save.")
    header = {"format": FORMAT, "version": VERSION, "config": json.loads(config.to_json()),
              "metadata": meta, "leaves": leaves,
              "layouts": {p: lay.to_json() for p, lay in kernel_layouts(lora).items()}}
    directory.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12] if _is_primary() else ""
    if jax.process_count() > 1:
        token = str(multihost_utils.broadcast_one_to_all(
            np.frombuffer(token.encode().ljust(12, b"0"), np.uint8)).tobytes().decode())
    staging = directory.parent / f".{directory.name}{PARTIAL}{token}"
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(staging, ocp.args.Composite(lora=ocp.args.StandardSave(lora),
                                               jlora=ocp.args.JsonSave(header)))
    if _is_primary():
        _write_manifest(staging)
        if existing:  # overwrite: swap in the complete new one, then drop the old
            old = directory.parent / f".{directory.name}.jlora-old-{token}"
            os.rename(directory, old)
            os.rename(staging, directory)
            shutil.rmtree(old)
        else:
            os.rename(staging, directory)
        _fsync_dir(directory.parent)
    _sync(f"jlora_save_adapter_{token}")
    return sum(p.stat().st_size for p in _files(directory))


def read_adapter_header(directory: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Reads a saved adapter's header: config, metadata and leaf shapes, without the arrays.

    Args:
      directory: an adapter checkpoint written by ``save_adapter``.
      verify: check every file against the manifest first.

    Returns:
      ``{"config": LoraConfig, "metadata": dict, "leaves": {path: {"shape", "dtype"}}}``.

    Raises:
      ValueError: missing, incomplete or corrupted checkpoint.

    Example:
      >>> import tempfile, jax.numpy as jnp, jlora
      >>> d = tempfile.mkdtemp() + "/a"
      >>> _ = save_adapter(d, {"w": {"A": jnp.ones((4, 2)), "B": jnp.zeros((2, 3))}},
      ...                  jlora.LoraConfig(rank=2, targets=".*"))
      >>> read_adapter_header(d)["leaves"]["w/B"]
      {'shape': [2, 3], 'dtype': 'float32'}
    """
    directory = Path(directory).absolute()
    _check_complete(directory, verify)
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            header = ckptr.restore(directory, ocp.args.Composite(jlora=ocp.args.JsonRestore()))["jlora"]
        config = LoraConfig.from_json(json.dumps(header["config"]))
    except Exception as e:  # orbax / json / config errors: one clear message
        raise ValueError(f"restore_adapter: cannot read the header of '{directory}': "
                         f"{type(e).__name__}: {e}") from e
    if header.get("format") != FORMAT or header.get("version", 0) > VERSION:
        raise ValueError(f"restore_adapter: '{directory}' has format {header.get('format')!r} "
                         f"version {header.get('version')}; this jlora reads {FORMAT!r} up to "
                         f"version {VERSION}. Upgrade jlora.")
    return {"config": config, "metadata": header.get("metadata") or {}, "leaves": header["leaves"],
            "layouts": header.get("layouts") or {}}


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
            raise ValueError("validate_adapter: pass config= with frozen=.")
        try:
            adapted(frozen, lora, config)
        except ValueError as e:
            raise ValueError(f"{where} does not fit the frozen model: {e}") from e


def restore_adapter(directory: str | os.PathLike, *, shardings: Any = None, like: Any = None,
                    frozen: Any = None, verify: bool = True) -> tuple[Any, LoraConfig, dict]:
    """Restores ``(lora, config, metadata)`` from ``save_adapter``; needs no config at hand.

    The checkpoint is checked first (complete, every file's sha256 as in its manifest) and
    never written to. Arrays are restored straight into the requested shardings, so an
    adapter saved on 8 devices restores on 1 and the reverse.

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
    header = read_adapter_header(directory, verify=verify)
    config = header["config"]
    flat_like = paths.flatten(like) if like is not None else None
    if shardings is not None and not isinstance(shardings, jax.sharding.Sharding):
        shardings = paths.flatten(shardings)
    abstract = {}
    for p, leaf in header["leaves"].items():
        abstract[p] = jax.ShapeDtypeStruct(tuple(leaf["shape"]), _as_dtype(leaf["dtype"]),
                                           sharding=_sharding_for(p, shardings, flat_like))
    abstract = paths.unflatten_dict(abstract)
    where = f"checkpoint '{directory}'"
    validate_adapter(abstract, like=like, frozen=frozen, config=config, where=where)
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            lora = ckptr.restore(directory, ocp.args.Composite(
                lora=ocp.args.StandardRestore(abstract)))["lora"]
    except Exception as e:  # tensorstore/orbax errors on damaged data
        raise ValueError(f"restore_adapter: cannot read the arrays of {where}: "
                         f"{type(e).__name__}: {e}") from e
    layouts = {p: Layout.from_json(v) for p, v in header.get("layouts", {}).items()}
    return nest(paths.flatten(lora), layouts), config, header["metadata"]


# --------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What ``TrainCheckpointer.restore`` returns.

    Attributes:
      step: the saved step.
      lora: the lora tree.
      opt_state: the optimizer state (same structure as the template).
      rng: the PRNG key (typed if a typed key was saved) or None.
      metadata: the user metadata saved with this step.

    Example:
      >>> TrainState(step=3, lora={}, opt_state=(), rng=None, metadata={}).step
      3
    """

    step: int
    lora: Any
    opt_state: Any
    rng: Any
    metadata: dict


def _rng_to_json(rng: Any) -> dict[str, Any] | None:
    """A PRNG key (typed or raw uint32) as JSON; it is tiny and the same on every host."""
    if rng is None:
        return None
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(rng) if typed else rng)
    return {"impl": str(jax.random.key_impl(rng)) if typed else None, "dtype": data.dtype.name,
            "shape": list(data.shape), "data": data.ravel().tolist()}


def _rng_from_json(info: Mapping[str, Any] | None) -> Any:
    if info is None:
        return None
    data = np.asarray(info["data"], info["dtype"]).reshape(info["shape"])
    if info["impl"] is None:
        return jax.numpy.asarray(data)
    return jax.random.wrap_key_data(data, impl=info["impl"])


def _abstract(tree: Any, shardings: Any = None) -> Any:
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(x, s=None):
        s = s if s is not None else getattr(x, "sharding", None)
        if not isinstance(s, jax.sharding.Sharding):
            s = default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    if shardings is None:
        return jax.tree.map(one, tree)
    return jax.tree.map(one, tree, shardings)


class TrainCheckpointer:
    """Resumable LoRA training on ``orbax.checkpoint.CheckpointManager``.

    Each step directory holds the items ``lora`` (the factors), ``state`` (optimizer
    state) and ``jlora`` (config, the rng key as JSON, user metadata). Orbax
    writes each step to a temporary directory and renames it when complete, so a killed
    save leaves the previous steps restorable and is never listed as a step.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, optax, jlora
      >>> cfg = jlora.LoraConfig(rank=2, targets=".*")
      >>> lora = {"w": {"A": jnp.ones((4, 2)), "B": jnp.zeros((2, 3))}}
      >>> opt = optax.adam(1e-3).init(lora)
      >>> with TrainCheckpointer(tempfile.mkdtemp(), cfg, max_to_keep=2) as ckpt:
      ...   for step in range(3):
      ...     _ = ckpt.save(step, lora, opt, jax.random.key(step))
      ...   ckpt.wait_until_finished()
      ...   state = ckpt.restore(lora, opt)
      ...   ckpt.all_steps(), state.step
      ([1, 2], 2)
    """

    def __init__(self, directory: str | os.PathLike, config: LoraConfig, *, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_save: bool = True) -> None:
        """Opens (or creates) a checkpoint directory for training.

        Args:
          directory: the root; step directories go below it.
          config: the LoraConfig of the run; restoring checks the saved one equals it.
          max_to_keep: keep the last N steps (None: all).
          save_interval_steps: save only every N steps (``save(..., force=True)`` overrides).
          async_save: write in a background thread; ``save`` returns once arrays are copied.
        """
        if not isinstance(config, LoraConfig):
            raise TypeError(f"TrainCheckpointer: config must be a jlora.LoraConfig, got "
                            f"{type(config).__name__}.")
        self.directory = Path(directory).absolute()
        self.config = config
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                               save_interval_steps=save_interval_steps,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("lora", "state", "jlora"))

    def save(self, step: int, lora: Any, opt_state: Any, rng: Any = None, *,
             metadata: Mapping[str, Any] | None = None, force: bool = False,
             overwrite: bool = False) -> bool:
        """Saves one step (asynchronously if enabled); returns whether a save started.

        Raises:
          FileExistsError: ``step`` is already saved and ``overwrite`` is False.
        """
        step = int(step)
        if step in self._manager.all_steps():
            if not overwrite:
                raise FileExistsError(f"TrainCheckpointer.save: step {step} already exists in "
                                      f"'{self.directory}'; pass overwrite=True or use a new step.")
            self._manager.wait_until_finished()
            self._manager.delete(step)
        header = {"format": FORMAT, "version": VERSION, "config": json.loads(self.config.to_json()),
                  "rng": _rng_to_json(rng), "metadata": json.loads(json.dumps(dict(metadata or {})))}
        return self._manager.save(step, args=ocp.args.Composite(
            lora=ocp.args.StandardSave(lora), state=ocp.args.StandardSave({"opt_state": opt_state}),
            jlora=ocp.args.JsonSave(header)), force=force)

    def restore(self, lora_like: Any, opt_state_like: Any, *,
                step: int | None = None, shardings: Any = None,
                opt_shardings: Any = None) -> TrainState:
        """Restores a step (default: the latest) into the templates' structures and shardings.

        Args:
          lora_like: lora template (arrays or ShapeDtypeStructs, shardings are used).
          opt_state_like: optimizer-state template (``jax.eval_shape(tx.init, lora_like)``).
          step: the step to restore; None for the latest.
          shardings: lora shardings overriding the template's.
          opt_shardings: optimizer-state shardings overriding the template's.

        Raises:
          ValueError: no step saved, a config or shape mismatch (naming the path).
        """
        self._manager.wait_until_finished()
        step = self._manager.latest_step() if step is None else int(step)
        if step is None or step not in self._manager.all_steps():
            raise ValueError(f"TrainCheckpointer.restore: no step {step if step is not None else ''} "
                             f"in '{self.directory}' (saved: {self._manager.all_steps()}).")
        header = self._manager.restore(step, args=ocp.args.Composite(jlora=ocp.args.JsonRestore()))["jlora"]
        saved = LoraConfig.from_json(json.dumps(header["config"]))
        if saved != self.config:
            raise ValueError(f"TrainCheckpointer.restore: step {step} was saved with config {saved}, "
                             f"this run uses {self.config}; fix: use the saved config "
                             "(read_adapter_header) or a new directory.")
        meta = self._manager.item_metadata(step)
        lora_meta = getattr(meta, "lora", None) if meta is not None else None
        lora_abs = _abstract(lora_like, shardings)
        tree_meta = getattr(lora_meta, "tree", lora_meta)
        if tree_meta is not None:
            validate_adapter(tree_meta, like=lora_abs, where=f"step {step} of '{self.directory}'")
        state_abs = {"opt_state": _abstract(opt_state_like, opt_shardings)}
        out = self._manager.restore(step, args=ocp.args.Composite(
            lora=ocp.args.StandardRestore(lora_abs), state=ocp.args.StandardRestore(state_abs)))
        return TrainState(step, out["lora"], out["state"]["opt_state"], _rng_from_json(header.get("rng")),
                          header.get("metadata") or {})

    def latest_step(self) -> int | None:
        """The latest finished step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The finished steps on disk (incomplete saves are never listed)."""
        return list(self._manager.all_steps())

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
