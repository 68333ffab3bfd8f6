"""Resumable LoRA training on orbax's ``CheckpointManager``: lora, optimizer state, step, rng.

Each step directory holds the items ``lora`` (the factors), ``state`` (optimizer state) and
``jlora`` (config, the rng key as JSON, user metadata). Orbax writes a step to a temporary
directory and renames it when complete, so a killed save is never listed. jlora makes the
other end safe too: a step dropped by ``max_to_keep`` is not deleted in place (a kill there
would leave a half-deleted step under its name) but renamed, atomically, into the hidden
folder ``.jlora-deleted`` and removed from there; whatever a kill leaves in that folder is
never listed and is removed when the directory is next opened, together with unfinished saves
and any step directory that lacks a file every complete step has. One writer at a time: a
``TrainCheckpointer`` holds a lock (:class:`jlora.io._files.WriterLock`) until ``close``, and
a second one on the same directory is refused; ``read_only=True`` opens one that only restores.
"""

from __future__ import annotations

import dataclasses
import json
import re
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
from jlora.io._files import FORMAT, VERSION, WriterLock, is_primary, pause_point, short, sync

__all__ = ["TrainCheckpointer", "TrainState"]

TRASH = ".jlora-deleted"
LOCK = ".jlora-lock"
# Files every complete step has (orbax writes them before the step's final rename).
_REQUIRED = ("_CHECKPOINT_METADATA", "jlora/metadata", "lora/_METADATA", "lora/manifest.ocdbt",
             "state/_METADATA")
_STEP = re.compile(r"0|[1-9]\d*")


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


def _complete(step_dir: Path) -> bool:
    return all((step_dir / name).is_file() for name in _REQUIRED)


def _purge(root: Path) -> None:
    """Removes what ``.jlora-deleted`` holds (steps orbax renamed there, leftovers of a kill)."""
    trash = root / TRASH
    if trash.is_dir():
        for p in list(trash.iterdir()):
            pause_point("train-purging")
            shutil.rmtree(p, ignore_errors=True)
        try:
            trash.rmdir()
        except OSError:
            pass


def _ours(step_dir: Path) -> bool:
    """A step directory jlora wrote (what is left of one), not another program's: safe to remove."""
    meta = step_dir / "_CHECKPOINT_METADATA"
    return ((step_dir / "jlora").is_dir() or (step_dir / "lora").is_dir() or not any(step_dir.iterdir())
            or (meta.is_file() and b'"jlora"' in meta.read_bytes()[:4096]))


def _tidy(root: Path) -> None:
    """On open (lock held): moves incomplete steps and unfinished saves to the trash, empties it.

    An incomplete step directory that is not recognisably jlora's is left alone (never listed).
    """
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        if (_STEP.fullmatch(p.name) and not _complete(p) and _ours(p)) or ocp.step.is_tmp_checkpoint(p):
            (root / TRASH).mkdir(exist_ok=True)
            p.rename(root / TRASH / f"{p.name}-{uuid.uuid4().hex[:8]}")
    _purge(root)


def _match(saved: Any, template: Any, where: str, what: str, fix: str) -> None:
    """Raises ValueError unless the saved tree's leaf paths, shapes and dtypes are the template's."""
    got, want = paths.flatten(saved), paths.flatten(template)
    extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    if extra or missing:
        raise ValueError(f"TrainCheckpointer.restore: {where}: the {what} template has other leaves than the "
                         f"saved {what}: only in the checkpoint: {', '.join(extra[:4]) or 'none'}; only in "
                         f"the template: {', '.join(missing[:4]) or 'none'}; {fix}.")
    for p, x in got.items():
        if not hasattr(x, "shape"):
            continue
        g, w = tuple(x.shape), tuple(want[p].shape)
        if g != w:
            rg, rw = (f" (rank {g[-1]})", f" (rank {w[-1]})") if p.endswith("/A") and g and w else ("", "")
            raise ValueError(f"TrainCheckpointer.restore: {where}: {what} leaf '{p}': shape {g}{rg} does not "
                             f"match the target's {w}{rw}; {fix}.")
        if np.dtype(x.dtype) != np.dtype(want[p].dtype):
            raise ValueError(f"TrainCheckpointer.restore: {where}: {what} leaf '{p}': dtype "
                             f"{np.dtype(x.dtype).name} does not match the target's "
                             f"{np.dtype(want[p].dtype).name}; fix: pass a template of the saved dtype, "
                             "cast after restoring.")


class TrainCheckpointer:
    """Resumable LoRA training on ``orbax.checkpoint.CheckpointManager``.

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

    def __init__(self, directory: str | Path, config: LoraConfig, *, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_save: bool = True, read_only: bool = False) -> None:
        """Opens (or creates) a checkpoint directory for training.

        Args:
          directory: the root; step directories go below it.
          config: the LoraConfig of the run; restoring checks the saved one equals it.
          max_to_keep: keep the last N steps (None: all).
          save_interval_steps: save only every N steps (``save(..., force=True)`` overrides).
          async_save: write in a background thread; ``save`` returns once arrays are copied.
          read_only: only restore: takes no lock, never writes or deletes (e.g. an evaluator
            reading the steps of a run that is still training).

        Raises:
          TypeError: ``config`` is not a LoraConfig.
          RuntimeError: another writer has this directory open.
        """
        if not isinstance(config, LoraConfig):
            raise TypeError(f"TrainCheckpointer: config must be a jlora.LoraConfig, got "
                            f"{type(config).__name__}; fix: pass the LoraConfig of the run.")
        self.directory = Path(directory).absolute()
        self.config = config
        self.read_only = bool(read_only)
        self._lock: WriterLock | None = None
        self._closed = False
        if not self.read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock = WriterLock(self.directory / LOCK, "TrainCheckpointer", self.directory,
                                    "close the other TrainCheckpointer on this directory (or let its run "
                                    "end), use another directory, or pass read_only=True to only restore")
        try:
            if self._lock is not None and is_primary():
                _tidy(self.directory)
            sync(f"jlora_train_open_{zlib.crc32(str(self.directory).encode())}")
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                enable_async_checkpointing=async_save, todelete_subdir=TRASH, read_only=self.read_only)
            handlers = {"lora": ocp.StandardCheckpointHandler(), "state": ocp.StandardCheckpointHandler(),
                        "jlora": ocp.JsonCheckpointHandler()}
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        except BaseException:
            self._release()
            raise

    def _open(self, name: str, write: bool = False) -> None:
        if self._closed:
            raise ValueError(f"TrainCheckpointer.{name}: this checkpointer of '{self.directory}' is closed; "
                             "fix: open a new TrainCheckpointer.")
        if write and self.read_only:
            raise ValueError(f"TrainCheckpointer.{name}: '{self.directory}' was opened with read_only=True; "
                             "fix: open it without read_only to save (one writer per directory).")

    def _tidy_after_wait(self) -> None:
        if self._lock is not None and is_primary():
            _purge(self.directory)

    def save(self, step: int, lora: Any, opt_state: Any, rng: Any = None, *,
             metadata: Mapping[str, Any] | None = None, force: bool = False,
             overwrite: bool = False) -> bool:
        """Saves one step (asynchronously if enabled); returns whether a save started.

        Args:
          step: the training step (steps only grow unless ``force``/``overwrite``).
          lora: the lora tree.
          opt_state: the optimizer state.
          rng: a PRNG key to resume with (typed or raw), or None.
          metadata: JSON-serialisable user metadata (loss, data position ...).
          force: save even if ``save_interval_steps`` says not to.
          overwrite: replace an existing ``step``.

        Raises:
          FileExistsError: ``step`` is already saved and ``overwrite`` is False.
          TypeError: ``metadata`` is not JSON-serialisable.
        """
        self._open("save", write=True)
        step = int(step)
        try:
            meta = json.loads(json.dumps(dict(metadata or {})))
        except (TypeError, ValueError) as e:
            raise TypeError(f"TrainCheckpointer.save: metadata must be JSON-serialisable: {e}; fix: pass "
                            "numbers, strings, lists and dicts only.") from e
        if step in self._manager.all_steps():
            if not overwrite:
                raise FileExistsError(f"TrainCheckpointer.save: step {step} already exists in "
                                      f"'{self.directory}'; pass overwrite=True or use a new step.")
            self._manager.wait_until_finished()
            self._manager.delete(step)
            force = True
        elif not force and not self._manager.should_save(step):
            return False
        # orbax's save waits for the previous one as well; in between, drop the steps it deleted
        self._manager.wait_until_finished()
        self._tidy_after_wait()
        header = {"format": FORMAT, "version": VERSION, "config": json.loads(self.config.to_json()),
                  "rng": _rng_to_json(rng), "metadata": meta}
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
          ValueError: no such step, a config or template mismatch (naming the path), a damaged
            step; each names the step, its directory and the fix.
        """
        self._open("restore")
        self.wait_until_finished()
        step, steps = self._pick_step(step)
        where = f"step {step} of '{self.directory}'"
        damaged = (f"fix: restore another step (saved: {steps}) with step=..., or delete "
                   f"'{self.directory / str(step)}'")
        header, rng = self._step_header(step, where, damaged)
        lora_abs = _abstract(lora_like, shardings)
        state_abs = {"opt_state": _abstract(opt_state_like, opt_shardings)}
        out = self._step_arrays(step, where, damaged, lora_abs, state_abs)
        return TrainState(step, out["lora"], out["state"]["opt_state"], rng, header.get("metadata") or {})

    def _pick_step(self, step: int | None) -> tuple[int, list[int]]:
        """The step to restore (None: the latest) and every saved step; a step not saved is refused."""
        steps = self.all_steps()
        if step is None and not steps:
            raise ValueError(f"TrainCheckpointer.restore: no step saved in '{self.directory}'; fix: save "
                             "one first, or open the directory the run saved to.")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise ValueError(f"TrainCheckpointer.restore: no step {step} in '{self.directory}' (saved: "
                             f"{steps}); fix: pass one of the saved steps, or step=None for the latest.")
        return step, steps

    def _step_header(self, step: int, where: str, damaged: str) -> tuple[dict[str, Any], Any]:
        """A step's header and rng; a damaged header, or one saved with another config, is refused."""
        try:
            header = self._manager.restore(step, args=ocp.args.Composite(jlora=ocp.args.JsonRestore()))["jlora"]
            saved = LoraConfig.from_json(header["config"])
            rng = _rng_from_json(header.get("rng"))
        except UnicodeDecodeError as e:
            raise ValueError(f"TrainCheckpointer.restore: {where}: its header 'jlora/metadata' is not UTF-8 "
                             f"text (byte {e.object[e.start]:#04x} at offset {e.start}): the step is damaged; "
                             f"{damaged}.") from e
        except Exception as e:  # orbax, JSON, config errors
            raise ValueError(f"TrainCheckpointer.restore: {where}: cannot read its header 'jlora/metadata' "
                             f"({short(e)}): the step is damaged; {damaged}.") from e
        if saved != self.config:
            raise ValueError(f"TrainCheckpointer.restore: step {step} was saved with config {saved}, "
                             f"this run uses {self.config}; fix: use the saved config "
                             "(read_adapter_header) or a new directory.")
        return header, rng

    def _step_arrays(self, step: int, where: str, damaged: str, lora_abs: Any, state_abs: Any) -> Any:
        """A step's arrays restored into the templates, whose structures must match the saved ones."""
        try:
            meta = self._manager.item_metadata(step)
            trees = [getattr(meta[k], "tree", meta[k]) for k in ("lora", "state")]
        except Exception as e:
            raise ValueError(f"TrainCheckpointer.restore: {where}: cannot read its metadata ({short(e)}): "
                             f"the step is damaged; {damaged}.") from e
        _match(trees[0], lora_abs, where, "lora", "fix: restore into a model of the same architecture, "
               "LoRA targets and rank (lora_like = jax.eval_shape of jlora.init with the saved config)")
        _match(trees[1], state_abs, where, "optimizer-state", "fix: pass opt_state_like = "
               "jax.eval_shape(tx.init, lora_like) with the optimizer the run was saved with")
        try:
            return self._manager.restore(step, args=ocp.args.Composite(
                lora=ocp.args.StandardRestore(lora_abs), state=ocp.args.StandardRestore(state_abs)))
        except Exception as e:
            if "tree structures do not match" in str(e):
                raise ValueError(f"TrainCheckpointer.restore: {where}: the optimizer-state template has "
                                 f"another structure than the saved state ({short(e, 120)}); fix: pass "
                                 "opt_state_like = jax.eval_shape(tx.init, lora_like) with the optimizer "
                                 "the run was saved with.") from e
            raise ValueError(f"TrainCheckpointer.restore: {where}: cannot read its arrays ({short(e)}): the "
                             f"step is damaged; {damaged}.") from e

    def latest_step(self) -> int | None:
        """The latest finished step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """The finished, complete steps on disk (unfinished or half-deleted ones are never listed)."""
        if self.read_only:
            self._manager.reload()  # a writer may have saved or dropped steps since
        return sorted(s for s in self._manager.all_steps() if _complete(self.directory / str(s)))

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves (and the removal of dropped steps) are done."""
        self._open("wait_until_finished")
        self._manager.wait_until_finished()
        self._tidy_after_wait()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        """Waits for pending saves, releases the manager and the directory's lock (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._manager.wait_until_finished()
            self._tidy_after_wait()
            self._manager.close()
        finally:
            self._release()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
