"""optimizer: optax wiring so that optimizer state exists only for the trainable leaves.

Each leaf gets a label: ``'base_lr'`` (the optimizer's learning rate), ``'boosted_lr'`` (LoRA+: the
learning rate times ``b_lr_ratio``) or ``'frozen'`` (no update, no state).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from jlora.core import paths
from jlora.core._describe import MAGNITUDE, WHOLE, B, leaf_roles

BASE_LR, BOOSTED_LR, FROZEN = "base_lr", "boosted_lr", "frozen"


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
    """Labels each leaf of ``params`` ``'base_lr'``, ``'boosted_lr'`` (LoRA+'s larger rate) or ``'frozen'``.

    As PEFT's LoRA+ does, ``'boosted_lr'`` marks the B factors and DoRA magnitudes (their roles from
    :func:`jlora.core._describe.leaf_roles`), and every 1-D leaf trained whole (biases, norms: PEFT's
    ``param.ndim == 1`` rule, the one place a role is read from a shape); every other leaf of the lora
    tree (A factors, trained rows, other trained-whole leaves) is ``'base_lr'``.

    ``params`` is the lora tree itself, or a tree holding it as a subtree (``(frozen, lora)``,
    ``{"frozen": ..., "lora": ...}``); leaves outside that subtree are ``'frozen'``.

    >>> import jax.numpy as jnp
    >>> lora = {"k": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2))}, "bias": jnp.ones(2)}
    >>> labels((lora, lora), lora)[0]
    {'bias': 'boosted_lr', 'k': {'A': 'base_lr', 'B': 'boosted_lr'}}
    >>> labels((lora, lora), lora)[1]["k"]
    {'A': 'frozen', 'B': 'frozen'}
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
    roles = {(prefix + "/" + p) if prefix else p: leaf.role for p, leaf in leaf_roles(lora).items()}

    def label(path: str, leaf: Any) -> str:
        role = roles.get(path) if not prefix or path.startswith(prefix + "/") else None
        if role is None:
            return FROZEN
        if role in (B, MAGNITUDE) or (role == WHOLE and leaf.ndim == 1):
            return BOOSTED_LR
        return BASE_LR

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
    if b_lr_ratio is None:  # one learning rate for every trained leaf
        return optax.multi_transform(
            {BASE_LR: tx, FROZEN: optax.set_to_zero()},
            lambda params: jax.tree.map(lambda l: BASE_LR if l == BOOSTED_LR else l, labels(params, lora)),
        )
    boosted = optax.chain(tx, optax.scale(float(b_lr_ratio)))
    return optax.multi_transform(
        {BASE_LR: tx, BOOSTED_LR: boosted, FROZEN: optax.set_to_zero()}, lambda params: labels(params, lora)
    )
