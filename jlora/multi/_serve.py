"""Mixed batches: every example of one batch runs its own adapter of a stack.

:func:`mixed_apply` wraps any apply function (a Linen ``model.apply``, an NNX call, a decode step
with a KV cache) into ``fn(frozen, stacked_lora, adapter_ids, *args)``: the factors are gathered
per example and the model runs once, vectorised with ``jax.vmap`` over the examples, so every
low-rank product is one batched contraction (the BGMV form) and the frozen kernels are shared
(never copied, also for scan-stacked layers). :func:`gathered_lowrank` and
:func:`grouped_lowrank` are the two low-rank kernels for hand-written layers: factors gathered per
row (BGMV), or rows sorted by adapter and ``jax.lax.ragged_dot`` over the adapter groups (SGMV).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora.adapt._apply import lora_apply
from jlora.core import _checks as checks
from jlora.core._config import LoraConfig
from jlora.core._describe import adapted
from jlora.trace._rows import rows_call

__all__ = ["mixed_apply", "gathered_lowrank", "grouped_lowrank"]


def mixed_apply(apply_fn: Callable[..., Any], s_config: LoraConfig, mode: str = "lazy", *,
                strict: bool = False, unit_batch: bool = True) -> Callable[..., Any]:
    """``fn(frozen, stacked_lora, adapter_ids, *args, **kwargs)``: each example runs its own adapter.

    Positional ``args`` are batched along axis 0 and ``adapter_ids`` is an int array of shape
    ``(batch,)`` (``Stack.base_id`` for the base model alone); keyword arguments are shared by all
    examples (a decode position, ``mutable=[...]``, ``train=False``). One compilation serves any mix.

    Args:
      apply_fn: any ``apply_fn(params, *args, **kwargs)``.
      s_config: the stack's config (``Stack.config``).
      mode: ``'lazy'`` (low-rank products, never a per-example kernel), ``'merged'``, or ``'rows'``:
        no vmap, the model runs once on the batch and each matmul reading an adapted kernel adds
        ``(x·A[ids])·B[ids]`` (plain 2-D kernels whose input has the examples on axis 0; anything
        else raises a ValueError naming the path; see :mod:`jlora.trace._rows`). ``unit_batch`` does
        not apply to it.
      strict: lazy mode: raise instead of falling back to the merged kernel for an unknown use.
      unit_batch: give ``apply_fn`` each example with a leading axis of size 1 (models that need a
        batch axis). ``False`` gives the example as it is (models that take any leading axes, e.g.
        token-wise MLPs and Linen attention over ``(..., seq, d)``): measured faster on XLA:CPU,
        which copies activations with a unit axis under ``vmap`` (benchmarks/multi_adapter.py).

    Ids must be in ``[0, n]`` (``n = Stack.base_id``): negative ids are not wrapped and large ones
    not clamped. Concrete ids out of range raise a ValueError at once. Traced ids (``fn`` under
    ``jax.jit``) are checked on the device's values by a ``jax.debug.callback`` that raises the same
    ValueError on the host: the call fails with a ``JaxRuntimeError`` carrying that message, never
    with a result from another adapter (the check costs one tiny host callback per call).

    >>> import jlora
    >>> from jlora.multi._stack import stack
    >>> frozen = {"w": jnp.eye(2)}
    >>> s = stack(frozen, {"a": ({"w": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2))}}, LoraConfig(rank=1, alpha=1, targets="w"))})
    >>> fn = mixed_apply(lambda p, x: x @ p["w"], s.config, mode="merged")
    >>> fn(frozen, s.lora, jnp.array([0, 1]), jnp.ones((2, 2))).tolist()
    [[3.0, 3.0], [1.0, 1.0]]
    """
    single = None if mode == "rows" else lora_apply(apply_fn, s_config, mode=mode, strict=strict)

    def fn(frozen: Any, stacked: Any, adapter_ids: jax.Array, *args: Any, **kwargs: Any) -> Any:
        ids = jnp.asarray(adapter_ids)
        if ids.ndim != 1:
            raise ValueError(f"mixed_apply: adapter_ids must have shape (batch,), got {ids.shape}; fix: one id per "
                             "example, e.g. jnp.array([stack.id('sql'), stack.base_id])")
        for keypath, a in jax.tree_util.tree_flatten_with_path(args)[0]:
            if jnp.shape(a)[:1] != ids.shape:
                raise ValueError(
                    f"mixed_apply: argument args{jax.tree_util.keystr(keypath)} has batch {jnp.shape(a)[:1]} but "
                    f"adapter_ids has shape {ids.shape}; fix: one adapter id per example (axis 0 of every positional "
                    "argument); pass shared values as keyword arguments"
                )
        n = jax.tree.leaves(stacked)[0].shape[0] if jax.tree.leaves(stacked) else 1
        checks.adapter_ids("mixed_apply", "adapter_ids", ids, n)
        if single is None:  # the check lazy and merged modes make on each example's factors (rank, shapes)
            adapted(frozen, jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], x.dtype), stacked), s_config)
            return rows_call(apply_fn, frozen, stacked, ids, args, kwargs)
        per_example = jax.tree.map(lambda x: x[ids], stacked)

        def one(lora: Any, *example: Any) -> Any:
            if not unit_batch:
                return single(frozen, lora, *example, **kwargs)
            batched = jax.tree.map(lambda x: x[None], example)
            return jax.tree.map(lambda y: y[0], single(frozen, lora, *batched, **kwargs))

        return jax.vmap(one)(per_example, *args)

    return fn


def _check_rows(where: str, x: Any, ids: Any, a: Any, b: Any) -> None:
    if x.ndim != 2 or ids.shape != x.shape[:1] or a.ndim != 3 or b.ndim != 3 or a.shape[1] != x.shape[1] \
            or a.shape[::2] != b.shape[:2]:
        raise ValueError(
            f"{where}: expected x (rows, in), ids (rows,), a (adapters, in, r), b (adapters, r, out); got x "
            f"{x.shape}, ids {ids.shape}, a {a.shape}, b {b.shape}; fix: flatten the tokens to rows (x.reshape(-1, "
            "in)) with one adapter id per row, and pass a stack's factors of one kernel (scale folded into B)"
        )


def gathered_lowrank(x: jax.Array, ids: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``y[t] = x[t] · a[ids[t]] · b[ids[t]]`` by gathering factors per row (BGMV).

    ``x`` (rows, in); ``ids`` (rows,); ``a`` (adapters, in, r); ``b`` (adapters, r, out) with the
    scale folded in (a serving stack's factors of one plain kernel). For rows that share an id in
    blocks (tokens of one sequence), gather per block and use ``einsum`` instead: this is the
    per-row reference.

    >>> a, b = jnp.ones((2, 3, 1)), jnp.stack([jnp.ones((1, 2)), 2 * jnp.ones((1, 2))])
    >>> gathered_lowrank(jnp.ones((2, 3)), jnp.array([0, 1]), a, b).tolist()
    [[3.0, 3.0], [6.0, 6.0]]
    """
    _check_rows("jlora.multi.gathered_lowrank", x, ids, a, b)
    low = jnp.einsum("ti,tir->tr", x.astype(a.dtype), a[ids])
    return jnp.einsum("tr,tro->to", low, b[ids])


def grouped_lowrank(x: jax.Array, ids: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``y[t] = x[t] · a[ids[t]] · b[ids[t]]`` with rows sorted by adapter and ``jax.lax.ragged_dot``
    on A and on B, group sizes = rows per adapter (the SGMV form), then unsorted.

    Same arguments as :func:`gathered_lowrank`; the stacked factors are the ragged_dot's rhs as they
    are (the adapter axis is the group axis), nothing is gathered.

    >>> a, b = jnp.ones((2, 3, 1)), jnp.stack([jnp.ones((1, 2)), 2 * jnp.ones((1, 2))])
    >>> grouped_lowrank(jnp.ones((3, 3)), jnp.array([1, 0, 1]), a, b).tolist()
    [[6.0, 6.0], [3.0, 3.0], [6.0, 6.0]]
    """
    _check_rows("jlora.multi.grouped_lowrank", x, ids, a, b)
    order = jnp.argsort(ids, stable=True)
    sizes = jnp.bincount(ids, length=a.shape[0]).astype(jnp.int32)
    low = lax.ragged_dot(x[order].astype(a.dtype), a, sizes)
    y = lax.ragged_dot(low, b, sizes)
    return jnp.zeros_like(y).at[order].set(y, unique_indices=True)
