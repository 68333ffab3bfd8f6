"""Training many adapters in one batch: one jitted step updates every adapter of a stack exactly as
training it alone on its own examples would.

The step (:func:`train_step`) runs a training stack (``jlora.multi.stack(..., fold_scales=False)``:
the adapters' own factors, padded to a common rank, and their scales beside them) on a mixed batch
with :func:`jlora.multi.mixed_apply`. Three things make each adapter's step its own:

- the loss is ``sum_k mean_{examples of k} loss_e`` (:func:`example_weights`), so adapter k's
  gradient is the gradient of its mean loss over its own examples;
- the optimizer is vmapped over the adapter axis (:func:`per_adapter`): every adapter has its own
  state, and transforms that reduce over a tree (``optax.clip_by_global_norm``, LAMB/LARS trust
  ratios, Adafactor's factored moments) see that adapter's leaves only. Purely elementwise
  transforms (sgd, momentum, adam, adamw's decoupled weight decay, ``clip``) would be per-adapter
  over the stacked tree too; global-norm clipping would not (tests/test_multi_train.py shows it);
- an adapter with no example in the batch keeps its factors and optimizer state (no step is
  taken, as when training alone), and the base entry never changes.

Padded ranks stay exactly zero: their gradients are zero (the partner factor's padding is zero)
and so are adam/adamw updates of zero parameters with zero gradients.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jlora.core._describe import configured_rank, kernel_layouts
from jlora.io.checkpoint import restore_adapter, save_adapter
from jlora.multi._serve import mixed_apply
from jlora.multi._stack import Stack, scaled, stack, unstack

__all__ = ["per_adapter", "example_weights", "train_step", "save_stack", "restore_stack"]


def per_adapter(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` applied to each adapter of a stacked tree separately (``jax.vmap`` over axis 0
    of every leaf): its state has the adapter axis too.

    >>> import optax
    >>> opt = per_adapter(optax.clip_by_global_norm(1.0))
    >>> g = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
    >>> [[round(float(v), 2) for v in row] for row in opt.update(g, opt.init(g))[0]["w"]]
    [[0.6, 0.8], [0.3, 0.4]]
    """
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"jlora.multi.per_adapter: optimizer must be an optax GradientTransformation, got "
                        f"{type(optimizer).__name__} {optimizer!r}; fix: e.g. per_adapter(optax.adamw(1e-3))")

    def init(params: Any) -> Any:
        return jax.vmap(optimizer.init)(params)

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        if params is None:
            return jax.vmap(lambda u, s: optimizer.update(u, s, None, **extra))(updates, state)
        return jax.vmap(lambda u, s, p: optimizer.update(u, s, p, **extra))(updates, state, params)

    return optax.GradientTransformation(init, update)


def example_weights(ids: jax.Array, n: int) -> jax.Array:
    """``1 / (examples of the same adapter)`` per example; 0 for the base id ``n - 1``.

    >>> example_weights(jnp.array([0, 0, 1, 2]), 3).tolist()
    [0.5, 0.5, 1.0, 0.0]
    """
    dtype = getattr(ids, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or jnp.ndim(ids) != 1:
        got = f"{dtype} {jnp.shape(ids)}" if dtype is not None else type(ids).__name__
        raise TypeError(f"jlora.multi.example_weights: ids must be an int array of shape (batch,), got {got}; fix: "
                        "one adapter id per example, e.g. jnp.array([stack.id('a'), stack.base_id])")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"jlora.multi.example_weights: n must be the number of stacked entries (an int >= 1), got "
                         f"{n!r}; fix: n = len(stack.names) + 1")
    counts = jnp.bincount(ids, length=n).astype(jnp.float32)
    return jnp.where(ids == n - 1, 0.0, 1.0 / jnp.maximum(counts[ids], 1.0))


def train_step(apply_fn: Callable[..., Any], s: Stack, loss_fn: Callable[..., jax.Array],
               optimizer: optax.GradientTransformation, *, mode: str = "lazy",
               unit_batch: bool = True) -> Callable[..., Any]:
    """``step(frozen, lora, opt_state, ids, inputs, targets) -> (lora, opt_state, losses)`` for a training stack.

    Args:
      apply_fn: ``apply_fn(params, *inputs)`` of the model.
      s: a training stack (``jlora.multi.stack(frozen, adapters, fold_scales=False)``).
      loss_fn: ``loss_fn(outputs, targets) -> (batch,)`` per-example losses (e.g. each sequence's
        token mean).
      optimizer: an optax transformation for one adapter; it runs per adapter (:func:`per_adapter`).
        Initialise its state with ``jlora.multi.per_adapter(optimizer).init(s.lora)``.
      mode: as in :func:`jlora.multi.mixed_apply`.
      unit_batch: as in :func:`jlora.multi.mixed_apply`.

    ``lora`` is ``s.lora`` (then the step's result), ``ids`` the adapter index per example (the base
    id: the example trains nothing), ``inputs`` a tuple of batched arrays. ``losses`` (N + 1,) is
    each adapter's mean loss over its examples (0 where it had none). Jit it; any mix of ids runs
    with one compilation. LoRA dropout is not supported here (a mask per example and adapter would
    not match training alone).

    >>> import jlora, optax
    >>> frozen = {"w": jnp.eye(2)}
    >>> cfg = jlora.LoraConfig(rank=1, alpha=1, targets="w")
    >>> ad = {k: ({"w": {"A": jnp.ones((2, 1)), "B": jnp.zeros((1, 2))}}, cfg) for k in ("a", "b")}
    >>> s = stack(frozen, ad, fold_scales=False)
    >>> step = train_step(lambda p, x: x @ p["w"], s, lambda y, t: ((y - t) ** 2).sum(-1), optax.sgd(0.1))
    >>> lora, st, losses = step(frozen, s.lora, per_adapter(optax.sgd(0.1)).init(s.lora), jnp.array([0, 0]),
    ...                         (jnp.ones((2, 2)),), jnp.zeros((2, 2)))
    >>> losses.tolist(), float(lora["w"]["B"][1].sum())   # adapter b had no example: unchanged
    ([2.0, 0.0, 0.0], 0.0)
    """
    if s.folded:
        raise ValueError("jlora.multi.train_step: this stack has its scales folded into B (serving); its gradients "
                         "would not be each adapter's own; fix: jlora.multi.stack(frozen, adapters, fold_scales=False)")
    fwd = mixed_apply(apply_fn, s.config, mode=mode, unit_batch=unit_batch)
    opt = per_adapter(optimizer)
    scales = {p: jnp.asarray(v) for p, v in s.scales.items()}
    n = len(s.names) + 1

    def step(frozen: Any, lora: Any, opt_state: Any, ids: jax.Array, inputs: tuple[Any, ...],
             targets: Any) -> tuple[Any, Any, jax.Array]:
        ids = jnp.asarray(ids)
        w = example_weights(ids, n)

        def total(tr: Any) -> tuple[jax.Array, jax.Array]:
            per = loss_fn(fwd(frozen, scaled(tr, scales), ids, *inputs), targets)
            if jnp.shape(per) != ids.shape:
                raise ValueError(f"jlora.multi.train_step: loss_fn must return one loss per example, shape "
                                 f"{ids.shape}, got {jnp.shape(per)}; fix: reduce over tokens only, not the batch")
            return jnp.sum(w * per), jax.ops.segment_sum(w * per, ids, n)

        grads, losses = jax.grad(total, has_aux=True)(lora)
        updates, new_state = opt.update(grads, opt_state, lora)
        new_lora = optax.apply_updates(lora, updates)
        present = (jnp.bincount(ids, length=n) > 0).at[n - 1].set(False)

        def keep(new: Any, old: Any) -> Any:
            if jnp.ndim(new) == 0 or jnp.shape(new)[0] != n:
                return new
            return jnp.where(present.reshape((n,) + (1,) * (jnp.ndim(new) - 1)), new, old)

        return jax.tree.map(keep, new_lora, lora), jax.tree.map(keep, new_state, opt_state), losses

    return step


def _safe(name: str) -> str:
    if not name or name.startswith(".") or "/" in name or "\\" in name or name == "stack.json":
        raise ValueError(f"jlora.multi.save_stack: adapter name {name!r} cannot be a directory name; fix: rename it "
                         "(letters, digits, '-', '_')")
    return name


def save_stack(directory: str | os.PathLike, s: Stack, metadata: Mapping[str, Any] | None = None, *,
               overwrite: bool = False) -> int:
    """Saves every adapter of ``s`` with ``jlora.save_adapter`` (its own ranks and config) under
    ``directory/<name>``, then ``stack.json`` (names, stack ranks, folded). Returns bytes written.

    Each ``directory/<name>`` is an ordinary adapter checkpoint (``jlora.restore_adapter``).

    >>> import tempfile, jlora
    >>> frozen = {"w": jnp.zeros((4, 4))}
    >>> cfg = jlora.LoraConfig(rank=1, alpha=2, targets="w")
    >>> s = stack(frozen, {"a": ({"w": {"A": jnp.ones((4, 1)), "B": jnp.ones((1, 4))}}, cfg)}, rank=2)
    >>> d = tempfile.mkdtemp() + "/stack"
    >>> save_stack(d, s) > 0, restore_stack(d, frozen).lora["w"]["A"].shape
    (True, (2, 4, 2))
    >>> jlora.restore_adapter(d + "/a")[0]["w"]["A"].shape   # one adapter, its own rank
    (4, 1)
    """
    root = pathlib.Path(directory)
    if (root / "stack.json").exists() and not overwrite:
        raise FileExistsError(f"jlora.multi.save_stack: {root} already holds a stack; fix: overwrite=True or another "
                              "directory")
    root.mkdir(parents=True, exist_ok=True)
    size = 0
    for i, (name, (lora, cfg)) in enumerate(unstack(s).items()):
        meta = dict(metadata or {}, stack_index=i)
        size += save_adapter(root / _safe(name), lora, cfg, meta, overwrite=overwrite)
    ranks = {p: configured_rank(s.config, p, lay) for p, lay in kernel_layouts(s.lora).items()}
    text = json.dumps({"names": list(s.names), "ranks": ranks, "folded": s.folded}, indent=1)
    (root / "stack.json").write_text(text)
    return size + len(text)


def restore_stack(directory: str | os.PathLike, frozen: Any) -> Stack:
    """The stack saved by :func:`save_stack`, with the same names, order, shapes and scale folding.

    One adapter alone: ``jlora.restore_adapter(directory + "/" + name)`` (see :func:`save_stack`).
    """
    root = pathlib.Path(directory)
    if not (root / "stack.json").is_file():
        raise FileNotFoundError(f"jlora.multi.restore_stack: no stack at {str(root)!r} (expected {root / 'stack.json'}); "
                                "fix: pass the directory given to jlora.multi.save_stack")
    meta = json.loads((root / "stack.json").read_text())
    adapters = {}
    for name in meta["names"]:
        lora, cfg, _ = restore_adapter(root / _safe(name), frozen=frozen)
        adapters[name] = (lora, cfg)
    return stack(frozen, adapters, fold_scales=bool(meta["folded"]), rank={p: int(r) for p, r in meta["ranks"].items()})
