"""Token routing for the example mixture-of-experts model: grouping routed tokens by expert and
checking the group sizes (moved here from the library: only the example model routes tokens).

jlora adapts expert kernels ``(E, in, out)`` (any stored order, e.g. PyTorch's ``(E, out, in)``)
with one factor pair per expert: ``A (E, in, r)``, ``B (E, r, out)``. :func:`jlora.init` reads the
expert axis as a *stack* axis from the model's trace when the kernel is consumed by

- ``jax.lax.ragged_dot`` / ``ragged_dot_general`` (tokens sorted by expert, ``group_sizes``),
- an einsum with the expert axis as a batch dimension (dense dispatch: every expert on its
  dispatched tokens, then a combine with the routing weights),
- indexing one expert at a time (``W[e]``, ``jnp.take``, ``lax.dynamic_index_in_dim``),

and the lazy rewrite (:func:`jlora.lora_apply`) runs each form factored: ``ragged_dot(x, W0) +
ragged_dot(ragged_dot(x, A), s·B)`` with the same group sizes, batched ``(x·A)·B`` per expert, or
``A[e]``, ``B[e]`` picked like ``W[e]``: an ``(E, in, out)`` delta or weight gradient is never formed.

``jax.lax.ragged_dot`` does not check its ``group_sizes``: rows past their sum come out zero and a
sum past the number of rows reads out of range. :func:`check_group_sizes` checks them: eagerly
(a ``ValueError``) when they are concrete, and through ``jax.experimental.checkify`` when they are
traced (``jax.jit``): wrap the jitted function in ``checkify.checkify`` and call ``err.throw()``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_group_sizes", "group_tokens"]


def group_tokens(expert_ids: jax.Array, n_experts: int) -> tuple[jax.Array, jax.Array]:
    """Sorts routed token slots by expert: the order and the group sizes ``ragged_dot`` needs.

    Args:
      expert_ids: ``(n,)`` int expert index of every routed slot (a token's top-k choices
        flattened: ``ids.reshape(-1)``), each in ``[0, n_experts)``.
      n_experts: the number of experts E.

    Returns:
      ``(order, group_sizes)``: ``order`` ``(n,)`` sorts the slots by expert (stable), and
      ``group_sizes`` ``(E,)`` int32 counts them, so ``lax.ragged_dot(x[order], W, group_sizes)``
      applies expert e to its slots; ``jnp.argsort(order)`` undoes the sort.

    >>> order, sizes = group_tokens(jnp.array([2, 0, 2, 1]), 3)
    >>> order.tolist(), sizes.tolist()
    ([1, 3, 0, 2], [1, 1, 2])
    """
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"group_tokens: n_experts must be an int >= 1, got {n_experts!r}")
    ids = jnp.asarray(expert_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(
            f"group_tokens: expert_ids must be a 1-D int array (one expert per routed slot), got shape "
            f"{tuple(ids.shape)} dtype {ids.dtype}; fix: pass top_k_ids.reshape(-1)"
        )
    order = jnp.argsort(ids, stable=True)
    sizes = jnp.bincount(ids, length=n_experts).astype(jnp.int32)
    return order, sizes


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_group_sizes(group_sizes: Any, n_tokens: int, *, n_experts: int | None = None,
                      name: str = "group_sizes") -> Any:
    """Checks ``ragged_dot`` group sizes: 1-D ints, one per expert, each >= 0, summing to ``n_tokens``.

    Shapes and dtypes are checked at trace time (``ValueError``/``TypeError``). The values are
    checked eagerly when concrete (a ``ValueError`` naming the sum and the token count); when
    traced (inside ``jax.jit``) they are checked with ``jax.experimental.checkify.check``, so the
    caller wraps the jitted function in ``checkify.checkify`` (JAX refuses an un-functionalized check
    under ``jit`` with a message saying so), e.g.
    ``err, out = checkify.checkify(jax.jit(step))(...); err.throw()``.

    Args:
      group_sizes: ``(E,)`` int array, the rows of each group (expert) in order.
      n_tokens: the number of rows of the ``ragged_dot`` input (its ragged axis).
      n_experts: the expert count E of the kernel, if known (its group axis); checked against the
        length of ``group_sizes``.
      name: the argument's name in error messages.

    Returns:
      ``group_sizes`` unchanged (so it can be used inline).

    >>> check_group_sizes(jnp.array([2, 0, 3]), 5).tolist()
    [2, 0, 3]
    >>> check_group_sizes(jnp.array([2, 0, 2]), 5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: group_sizes: the group sizes [2, 0, 2] sum to 4 but the ragged_dot input has 5 rows ...
    """
    shape = tuple(np.shape(group_sizes))
    dtype = group_sizes.dtype if hasattr(group_sizes, "dtype") else np.asarray(group_sizes).dtype
    if len(shape) != 1 or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{name}: expected a 1-D int array (one size per expert), got shape {shape} dtype {dtype}; "
            "fix: jnp.bincount(expert_ids, length=n_experts)"
        )
    if n_experts is not None and shape[0] != n_experts:
        raise ValueError(
            f"{name}: {shape[0]} group sizes for an expert kernel of {n_experts} experts (its group axis); "
            f"fix: one size per expert, jnp.bincount(expert_ids, length={n_experts})"
        )
    if _is_traced(group_sizes):
        from jax.experimental import checkify

        total = jnp.sum(group_sizes)
        checkify.check(jnp.all(group_sizes >= 0), f"{name}: a group size is negative: {{sizes}}", sizes=group_sizes)
        checkify.check(total == n_tokens, f"{name}: the group sizes sum to {{total}} but the ragged_dot input has "
                       f"{n_tokens} rows (tokens x top-k); fix: count every routed row once", total=total)
        return group_sizes
    sizes = np.asarray(group_sizes)
    if (sizes < 0).any():
        raise ValueError(f"{name}: group sizes must be >= 0, got {sizes.tolist()}")
    if int(sizes.sum()) != int(n_tokens):
        raise ValueError(
            f"{name}: the group sizes {sizes.tolist()} sum to {int(sizes.sum())} but the ragged_dot input has "
            f"{int(n_tokens)} rows (tokens x top-k); ragged_dot would silently zero (or misread) rows. Fix: count "
            "every routed row once, e.g. jnp.bincount(expert_ids, length=n_experts) over all top-k slots"
        )
    return group_sizes
