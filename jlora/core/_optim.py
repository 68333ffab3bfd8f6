"""optimizer: optax wiring so that optimizer state exists only for the trainable leaves."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jlora.core import paths
from jlora.core._describe import kernel_layouts


def _find(tree: Any, target: Any, prefix: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
    """The key path of the first subtree of ``tree`` with ``target``'s structure."""
    if jax.tree.structure(tree) == target:
        return prefix
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (tuple, list)):
        items = enumerate(tree)
    else:
        return None
    for k, sub in items:
        found = _find(sub, target, prefix + (k,))
        if found is not None:
            return found
    return None


def labels(params: Any, lora: Any) -> Any:
    """Labels each leaf of ``params`` 'A', 'B' (for LoRA+) or 'frozen'.

    As PEFT's LoRA+ does, 'B' marks the B factors and DoRA magnitudes (read from each adapted
    kernel's node: ``"B"``, ``"m"``), and every 1-D leaf trained whole (biases, norms: PEFT's
    ``param.ndim == 1`` rule, the one place a role is read from a shape); everything else is 'A'.

    ``params`` is the lora tree itself, or a tree holding it as a subtree (``(frozen, lora)``,
    ``{"frozen": ..., "lora": ...}``); leaves outside that subtree are 'frozen'. Trained-whole
    leaves of the lora tree are 'A'.

    >>> import jax.numpy as jnp
    >>> lora = {"k": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2))}, "bias": jnp.ones(2)}
    >>> labels((lora, lora), lora)
    ({'bias': 'B', 'k': {'A': 'A', 'B': 'B'}}, {'bias': 'frozen', 'k': {'A': 'frozen', 'B': 'frozen'}})
    """
    target = jax.tree.structure(lora)
    where = _find(params, target)
    if where is None:
        raise ValueError(
            "jlora.optimizer: the parameters given to init/update neither are the lora tree nor contain "
            f"it as a subtree (lora structure: {target}); fix: optimise the lora tree, or a container of "
            "(frozen, lora)"
        )
    prefix = paths.path_str(where)
    kernels = {(prefix + "/" + p) if prefix else p for p in kernel_layouts(lora)}

    def label(path: str, leaf: Any) -> str:
        if prefix and not (path == prefix or path.startswith(prefix + "/")):
            return "frozen"
        kernel, _, part = path.rpartition("/")
        if kernel in kernels or part in ("A", "B"):  # a factor pair's node (or a plain dict one)
            return "B" if part in ("B", "m") else "A"
        return "B" if leaf.ndim == 1 else "A"

    return paths.map_with_path(label, params)


def optimizer(tx: optax.GradientTransformation, lora: Any, *, b_lr_ratio: float | None = None
              ) -> optax.GradientTransformation:
    """An optax transformation that updates only the LoRA leaves and keeps state only for them.

    Args:
      tx: any optax transformation (``optax.adamw(1e-3)``, a chain, a schedule...).
      lora: the lora tree (or its shapes); the optimised tree is this tree, or contains it as a
        subtree (then every other leaf gets a zero update and no state: ``optax.set_to_zero``).
      b_lr_ratio: LoRA+ (Hayou et al., 2024): B's updates are scaled by this ratio (its learning
        rate is ``b_lr_ratio`` times A's; PEFT's ``loraplus_lr_ratio``, typically 16).

    >>> import jax.numpy as jnp, optax
    >>> lora = {"k": {"A": jnp.ones((3, 1)), "B": jnp.zeros((1, 3))}}
    >>> frozen = {"k": jnp.zeros((3, 3))}
    >>> tx = optimizer(optax.adam(1e-2), lora)
    >>> state = tx.init((frozen, lora))
    >>> sum(x.size for x in jax.tree.leaves(state))  # count + mu, nu of the 6 factor entries
    13
    """
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(
            f"jlora.optimizer: tx must be an optax GradientTransformation, got {type(tx).__name__} {tx!r}; "
            "fix: jlora.optimizer(optax.adamw(1e-3), lora) (the learning rate goes inside the optax optimizer)"
        )
    if b_lr_ratio is not None and not b_lr_ratio > 0:
        raise ValueError(f"jlora.optimizer: b_lr_ratio must be > 0, got {b_lr_ratio!r}; fix: e.g. 16 "
                         "(PEFT's loraplus_lr_ratio), or None for one learning rate")
    if b_lr_ratio is None:  # one inner optimizer for A and B
        return optax.multi_transform(
            {"A": tx, "frozen": optax.set_to_zero()},
            lambda params: jax.tree.map(lambda l: "A" if l == "B" else l, labels(params, lora)),
        )
    tx_b = optax.chain(tx, optax.scale(float(b_lr_ratio)))
    return optax.multi_transform(
        {"A": tx, "B": tx_b, "frozen": optax.set_to_zero()}, lambda params: labels(params, lora)
    )
