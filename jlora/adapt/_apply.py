"""lora_apply: run a model's apply function with LoRA, lazily (low-rank path) or merged."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from jlora.adapt._tree import merge
from jlora.core import _checks as checks
from jlora.core import paths
from jlora.core._config import LoraConfig
from jlora.core._describe import ROWS, A, B, adapted, kernel_layouts, leaf_roles, nest
from jlora.quant._quant import dequantize_leaf, is_quantized
from jlora.trace import _lazy as lazy

MODES = ("lazy", "merged")


def lora_apply(apply_fn: Callable[..., Any], config: LoraConfig, mode: str = "lazy", *,
               strict: bool = False) -> Callable[..., Any]:
    """Wraps ``apply_fn(params, *args, **kwargs)`` into ``fn(frozen, lora, *args, lora_rng=None, lora_scale=None,
    **kwargs)``.

    ``fn`` is a drop-in for ``apply_fn(merge(frozen, lora, config), *args, **kwargs)``: rngs, mutable
    collections and train flags pass through. It is pure and jit-able (``config`` is static).

    Args:
      apply_fn: the model's apply function (``model.apply``, an NNX merge-and-call, any function of
        a parameter tree).
      config: the :class:`LoraConfig` the lora tree was made with.
      mode: ``'lazy'`` computes ``base(x) + s * ((x A) B)`` and never forms a full-size delta or
        full-size kernel gradient (training); ``'merged'`` forms ``W0 + delta`` and calls the plain
        apply function (always correct; for inference, merge once with :func:`jlora.merge`).
      strict: lazy mode only: raise instead of falling back to the merged kernel (with a warning)
        for a kernel use the rewrite does not know.

    ``lora_rng`` (a PRNG key) turns LoRA dropout on, for training; without it dropout is off.

    ``lora_scale`` (a float or a traced scalar) runs ``W0 + lora_scale * s * A ⊗ B``: ``0.0`` is the
    base model (a reference model, zero-shot scores) and ``1.0`` the adapter, from the same tree and,
    passed as a jit argument, the same compiled program. It scales factor pairs only: a tree with
    DoRA magnitudes, trained rows or trained-whole leaves raises a ValueError.

    >>> import jax, jax.numpy as jnp, jlora
    >>> cfg = jlora.LoraConfig(rank=1, targets=".*")
    >>> f = lambda p, x: x @ p["w"]
    >>> frozen, lora = {"w": jnp.eye(2)}, {"w": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2))}}
    >>> lora_apply(f, cfg, "merged")(frozen, lora, jnp.ones(2)).tolist()
    [33.0, 33.0]
    >>> lora_apply(f, cfg)(frozen, lora, jnp.ones(2), lora_scale=0.0).tolist()  # the base: x @ W0
    [1.0, 1.0]
    """
    if mode not in MODES:
        raise ValueError(f"lora_apply: mode must be one of {MODES}, got {mode!r}; "
                         "fix: mode='lazy' (training) or 'merged'")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"lora_apply: config must be a jlora.LoraConfig, got {type(config).__name__}; "
                        "fix: pass the jlora.LoraConfig the lora tree was made with")
    if not callable(apply_fn):
        raise TypeError(f"lora_apply: apply_fn must be callable, got {type(apply_fn).__name__}; fix: pass the model's apply "
                        "function (model.apply), not its output")

    def check(lora: Any, lora_rng: Any) -> None:
        if lora is None:
            raise TypeError("lora_apply: `lora` is None; fix: fn(frozen, lora, x) with the lora tree from "
                            "jlora.init; for the base model alone call apply_fn(frozen, x)")
        checks.lora_tree("lora_apply", lora)
        if lora_rng is not None:
            checks.prng_key("lora_apply", "lora_rng", lora_rng)

    if mode == "merged":
        def fn(frozen: Any, lora: Any, *args: Any, lora_rng: Any = None, **kwargs: Any) -> Any:
            check(lora, lora_rng)
            if lora_rng is not None and config.dropout > 0:
                raise ValueError(
                    "lora_apply(mode='merged'): LoRA dropout acts on the input of A, which merged weights "
                    "cannot express; fix: use mode='lazy' for training with dropout"
                )
            if any(is_quantized(w) for w in paths.flatten(frozen).values()):
                # a quantized base: W0 + delta formed inside each use from the codes (lazy.lazy_call,
                # merged=True), so no float kernel is kept from the forward to the backward pass
                frozen, lora = lazy_fallback(frozen, lora, config)
                return lazy.lazy_call(apply_fn, frozen, lora, config, args, kwargs, merged=True)
            return apply_fn(merge(frozen, lora, config), *args, **kwargs)
    else:
        def fn(frozen: Any, lora: Any, *args: Any, lora_rng: Any = None, **kwargs: Any) -> Any:
            check(lora, lora_rng)
            # a quantized base stays quantized: each use dequantizes inside the op (jlora.trace._quant)
            frozen, lora = lazy_fallback(frozen, lora, config)  # tables with trained rows: merged
            return lazy.lazy_call(apply_fn, frozen, lora, config, args, kwargs, strict=strict, rng=lora_rng)

    unscaled = fn

    def fn(frozen: Any, lora: Any, *args: Any, lora_scale: Any = None, **kwargs: Any) -> Any:
        if lora_scale is not None:
            lora = _scale_updates(frozen, lora, config, lora_scale)
        return unscaled(frozen, lora, *args, **kwargs)

    functools.update_wrapper(fn, apply_fn, assigned=("__module__", "__name__", "__qualname__"), updated=())
    return fn


def _scale_updates(frozen: Any, lora: Any, config: LoraConfig, scale: Any) -> Any:
    """``lora`` with every B times ``scale`` (a scalar, traced or not): the updates ``scale * s * A ⊗ B``."""
    checks.lora_tree("lora_apply", lora)
    info = adapted(frozen, lora, config)
    roles = leaf_roles(lora, paths.flatten(frozen))
    for p, (kernel, part) in roles.items():
        if part not in (A, B) or kernel not in info or info[kernel].dora:
            what = "a DoRA kernel's leaf" if kernel in info else "a trained-whole leaf or trained rows"
            raise ValueError(f"lora_apply: lora_scale scales factor pairs (s * A ⊗ B) only; lora leaf {p!r} is {what}, "
                             "whose update is not a scaled product; fix: call without lora_scale, or for the base "
                             "model alone apply_fn(frozen, ...)")
    scale = jnp.asarray(scale, jnp.float32)
    if scale.ndim != 0:
        raise ValueError(f"lora_apply: lora_scale must be a scalar, got shape {scale.shape}; fix: one float "
                         "(0.0: the base model, 1.0: the adapter)")
    return paths.map_with_path(lambda p, x: (x.astype(jnp.float32) * scale).astype(x.dtype) if roles[p].role == B
                               else x, lora)


def quantized_apply(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps ``apply_fn(params, *args, **kwargs)`` so that each use of a quantized leaf of ``params``
    dequantizes inside the operation, in the forward pass and again in the backward pass.

    What :func:`lora_apply` does for the base kernels, for a function with no adapter (a model trained
    in some other way on a quantized base, an evaluation, a reference model): the compiled step keeps
    the codes and scales, never a float copy of the kernels, from the forward to the backward pass
    (calling :func:`jlora.dequantize` inside ``apply_fn`` instead keeps every float kernel alive for
    the backward pass). ``fn(params, *args, **kwargs)`` equals
    ``apply_fn(jlora.dequantize(params, dtype=None), *args, **kwargs)``.

    >>> import jax, jax.numpy as jnp, jlora
    >>> q = jlora.quantize({"w": jnp.eye(64)}, "w", scheme="int8")
    >>> quantized_apply(lambda p, x: x @ p["w"])(q, jnp.ones(64))[:3].tolist()
    [1.0, 1.0, 1.0]
    """
    if not callable(apply_fn):
        raise TypeError(f"quantized_apply: apply_fn must be callable, got {type(apply_fn).__name__}; fix: pass the "
                        "model's apply function (model.apply), not its output")

    def fn(params: Any, *args: Any, **kwargs: Any) -> Any:
        return lazy.lazy_call(apply_fn, params, {}, None, args, kwargs, factored={})

    functools.update_wrapper(fn, apply_fn, assigned=("__module__", "__name__", "__qualname__"), updated=())
    return fn


def lazy_fallback(frozen: Any, lora: Any, config: Any) -> tuple[Any, dict[str, Any]]:
    """Folds the tables with trained rows into ``frozen``: the kernels the lazy rewrite cannot run
    factored (the merged fallback, correct and differentiable, not lazy).

    Returns ``(frozen2, lora2)``: ``frozen2`` is ``merge(frozen, part, config)`` for ``part`` = each
    such table's ``{rows, A, B}`` (and ``m`` for DoRA); ``lora2`` is the rest of the lora tree.
    ``lazy_call(apply_fn, frozen2, lora2, ...)`` then equals the merged model, and gradients reach the
    folded leaves through the merge. Trees without rows are returned as they are (DoRA kernels run
    factored in :mod:`jlora.trace._lazy`).

    >>> import jax.numpy as jnp
    >>> from jlora import LoraConfig
    >>> cfg = LoraConfig(rank=1, targets=r"d/kernel", embedding_rows={"emb": (1,)})
    >>> frozen = {"d": {"kernel": jnp.ones((2, 2))}, "emb": jnp.zeros((3, 2))}
    >>> lora = {"d": {"kernel": {"A": jnp.ones((2, 1)), "B": jnp.zeros((1, 2))}},
    ...         "emb": {"rows": jnp.ones((1, 2))}}
    >>> f2, l2 = lazy_fallback(frozen, lora, cfg)
    >>> f2["emb"].tolist(), list(l2)
    ([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]], ['d'])
    """
    flat = paths.flatten(lora)
    roles = leaf_roles(lora, paths.flatten(frozen))
    folded = {owner for owner, role in roles.values() if role == ROWS}
    if not folded:
        return frozen, lora
    layouts = kernel_layouts(lora)
    frozen = paths.map_with_path(lambda p, w: dequantize_leaf(w) if p in folded and is_quantized(w) else w, frozen)
    part = {p: v for p, v in flat.items() if roles[p].owner in folded}
    rest = {p: v for p, v in flat.items() if p not in part}
    return merge(frozen, nest(part, layouts), config), nest(rest, layouts)
