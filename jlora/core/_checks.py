"""Argument and value checks shared by the public functions: each raises with the argument, expected vs
got, and the fix.

Ground floor: imports only :mod:`jlora.core._config` and :mod:`jlora.paths` from jlora.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import paths
from jlora.core._config import LoraConfig


def is_concrete(x: Any) -> bool:
    """True if ``x`` holds values now (not a tracer, not a ``jax.ShapeDtypeStruct``).

    >>> is_concrete(jnp.ones(2)), is_concrete(jax.ShapeDtypeStruct((2,), jnp.float32))
    (True, False)
    """
    if isinstance(x, jax.core.Tracer):
        return False
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def prng_key(where: str, name: str, key: Any) -> None:
    """Raises a TypeError unless ``key`` is a PRNG key (a typed ``jax.random.key`` or a raw uint32 (2,)).

    >>> prng_key("jlora.init", "key", jax.random.key(0))
    >>> prng_key("jlora.init", "key", 0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    TypeError: jlora.init: `key` must be a PRNG key, got int 0; fix: pass ...
    """
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return
    if dtype is not None and dtype == jnp.uint32 and tuple(key.shape)[-1:] == (2,):  # legacy jax.random.PRNGKey
        return
    got = f"{type(key).__name__} {key!r}" if dtype is None else f"an array of dtype {dtype}, shape {tuple(key.shape)}"
    raise TypeError(
        f"{where}: `{name}` must be a PRNG key, got {got}; fix: pass {name}=jax.random.key(0) "
        "(or split one you already have)"
    )


def float_dtype(where: str, dtype: Any) -> Any:
    """``dtype`` as a jnp float dtype, or a TypeError naming ``dtype=`` (None stays None).

    >>> float_dtype("jlora.init", "bfloat16")
    dtype(bfloat16)
    >>> float_dtype("jlora.init", "foo")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    TypeError: jlora.init: dtype= must be a float dtype or None, got 'foo'; fix: ...
    """
    if dtype is None:
        return None
    try:
        out = jnp.dtype(dtype)
    except (TypeError, ValueError):
        out = None
    if out is None or not jnp.issubdtype(out, jnp.floating):
        raise TypeError(
            f"{where}: dtype= must be a float dtype or None, got {dtype!r}; fix: e.g. dtype=jnp.float32 "
            "(the default) or dtype=jnp.bfloat16"
        )
    return out


def none_leaves(tree: Any) -> list[str]:
    """The paths of ``None`` leaves of ``tree`` (jax drops them from its leaves, so regexes never see them).

    >>> none_leaves({"a": {"kernel": None, "bias": 1.0}})
    ['a/kernel']
    """
    found = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return [paths.path_str(k) for k, leaf in found if leaf is None]


def no_none_targets(where: str, params: Any, config: LoraConfig) -> None:
    """Raises if a target or trainable regex matches a ``None`` leaf of ``params`` (an uninitialised tree).

    >>> no_none_targets("jlora.init", {"d": {"kernel": None}}, LoraConfig(targets=".*kernel"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: jlora.init: params leaf 'd/kernel' is None (matched by ...
    """
    nones = none_leaves(params)
    for name in ("targets", "trainable"):
        for regex in getattr(config, name):
            hit = next((p for p in nones if re.fullmatch(regex, p)), None)
            if hit is not None:
                raise ValueError(
                    f"{where}: params leaf {hit!r} is None (matched by LoraConfig.{name} {regex!r}); LoRA needs "
                    "the kernel's array or jax.ShapeDtypeStruct; fix: pass initialised parameters (e.g. "
                    "model.init(key, x)), or jax.eval_shape of them"
                )


def pattern_keys_match(config: LoraConfig, target_paths: Iterable[str]) -> None:
    """Raises if a ``rank_pattern``/``alpha_pattern`` key matches no adapted path (a typo), listing the closest.

    >>> cfg = LoraConfig(targets=".*", rank_pattern={"p/qery/kernel": 2})
    >>> pattern_keys_match(cfg, ["p/query/kernel"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: LoraConfig.rank_pattern: 'p/qery/kernel' matched no parameter; ...
    """
    target_paths = list(target_paths)
    for name in ("rank_pattern", "alpha_pattern"):
        keys = [k for k, _ in getattr(config, name)]
        if keys:
            paths.check_rules_match(name, keys, target_paths)


def cast_checked(where: str, path: str, w: jax.Array, dtype: Any) -> jax.Array:
    """``w.astype(dtype)``; with concrete values, raises if a finite entry of ``w`` overflows ``dtype``.

    Under ``jax.jit`` the values are not known: the cast happens unchecked (an overflowing entry
    becomes ``inf``, as ``astype`` does).

    >>> cast_checked("jlora.merge", "d/kernel", jnp.array([1.0, 7e4]), jnp.float16)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: jlora.merge: 'd/kernel': max |W0 + delta| = 7e+04 overflows float16 ...
    """
    dtype = jnp.dtype(dtype)
    if not is_concrete(w) or not jnp.issubdtype(dtype, jnp.floating) or jnp.dtype(w.dtype).itemsize <= dtype.itemsize:
        return w.astype(dtype)
    finite = jnp.where(jnp.isfinite(w), jnp.abs(w), 0)
    biggest = float(jnp.max(finite)) if w.size else 0.0  # one scalar to the host
    limit = float(jnp.finfo(dtype).max)
    if biggest > limit:
        raise ValueError(
            f"{where}: {path!r}: max |W0 + delta| = {biggest:.3g} overflows {dtype.name} (max {limit:.3g}); the "
            "merged kernel would hold inf; fix: keep the adapter lazy (jlora.lora_apply(...)(frozen, lora, x) adds "
            "the branch in float32 and casts the output), or merge a float32 copy of the base: "
            "jlora.merge(jax.tree.map(lambda w: w.astype(jnp.float32), frozen), lora, config)"
        )
    return w.astype(dtype)


def _raise_ids(where: str, name: str, n: int, ids: np.ndarray) -> None:
    ids = np.asarray(ids)
    bad = ids[(ids < 0) | (ids >= n)]
    if bad.size:
        raise ValueError(
            f"{where}: {name} must be in [0, {n - 1}] (the adapters' indices, {n - 1} = Stack.base_id for the base "
            f"model alone), got {sorted(set(bad.tolist()))[:8]}; negative ids are not wrapped and large ones not "
            "clamped; fix: use Stack.id(name) / Stack.base_id"
        )


def adapter_ids(where: str, name: str, ids: Any, n: int) -> None:
    """Checks adapter indices against ``n`` stacked entries (valid: ``0 .. n-1``; nothing wraps or clamps).

    Concrete ids raise a ValueError now. Traced ids (under ``jax.jit``) are checked when the
    computation runs, by a ``jax.debug.callback`` that raises the same ValueError on the host: the
    call then fails with a ``JaxRuntimeError`` carrying this message (on the first use of the result).

    >>> adapter_ids("jlora.multi.select", "index", 3, 3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: jlora.multi.select: index must be in [0, 2] (the adapters' indices, 2 ...
    """
    dtype = getattr(ids, "dtype", None)
    is_int = isinstance(ids, (int, np.integer)) or (dtype is not None and jnp.issubdtype(dtype, jnp.integer))
    if isinstance(ids, bool) or not is_int:
        raise TypeError(f"{where}: {name} must be an int or an int array, got {type(ids).__name__} {ids!r}; "
                        "fix: use Stack.id(name) / Stack.base_id")
    if isinstance(ids, (int, np.integer)) or is_concrete(ids):
        _raise_ids(where, name, n, np.asarray(ids))
    else:
        jax.debug.callback(lambda v: _raise_ids(where, name, n, v), ids)


def lora_tree(where: str, lora: Any) -> None:
    """Raises a TypeError unless ``lora`` is a pytree of arrays (or ``jax.ShapeDtypeStruct``) with at least one leaf.

    >>> lora_tree("jlora.merge", {"k": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2))}})
    >>> lora_tree("jlora.merge", None)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    TypeError: jlora.merge: `lora` must be the lora tree (a dict of arrays from ...
    >>> lora_tree("jlora.merge", {"k": {"A": [[1.0]], "B": jnp.ones((1, 2))}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    TypeError: jlora.merge: lora leaf 'k/A' is a Python list, not an array; ...
    """
    leaves = jax.tree.leaves(lora, is_leaf=paths.is_variable)
    if lora is None or hasattr(lora, "shape") or not leaves:
        got = f"{type(lora).__name__} {lora!r}"
        raise TypeError(
            f"{where}: `lora` must be the lora tree (a dict of arrays from jlora.init), got {got[:120]}; fix: pass "
            "the lora tree returned by frozen, lora = jlora.init(key, params, config)"
        )
    bad = _first_non_array(lora)
    if bad is not None and bad[0] == "":  # the whole argument is one non-array value (a list of numbers, ...)
        raise TypeError(
            f"{where}: `lora` must be the lora tree (a dict of arrays from jlora.init), got {type(lora).__name__} "
            f"{lora!r}"[:160] + "; fix: pass the lora tree returned by frozen, lora = jlora.init(key, params, config)"
        )
    if bad is not None:
        path, what = bad
        raise TypeError(
            f"{where}: lora leaf {path!r} is {what[:120]}, not an array; every leaf of the lora tree is a jax/NumPy "
            f"array (or jax.ShapeDtypeStruct); fix: jnp.asarray it (lora[...] = jnp.asarray(value)), or pass the "
            "lora tree returned by frozen, lora = jlora.init(key, params, config)"
        )


def _first_non_array(tree: Any) -> tuple[str, str] | None:
    """``(path, description)`` of the first leaf that is not an array; a list or tuple of Python values
    (a factor given as nested lists) is named whole."""
    def numbers(x: Any) -> bool:
        return isinstance(x, (list, tuple)) and not hasattr(x, "_fields") and bool(jax.tree.leaves(x)) and not any(
            hasattr(v, "shape") for v in jax.tree.leaves(x))

    found = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: paths.is_variable(x) or numbers(x))[0]
    for keypath, x in found:
        if paths.is_variable(x) or (hasattr(x, "shape") and hasattr(x, "dtype")):
            continue
        what = f"a Python {type(x).__name__}" if isinstance(x, (list, tuple)) else f"{type(x).__name__} {x!r}"
        return paths.path_str(keypath), what
    return None


def factored(where: str, f: Any, **arrays: Any) -> None:
    """Raises unless ``f`` is a :class:`jlora.Factored` description and each named array has its kernel's shape.

    >>> factored("jlora.dora.magnitude", "d/kernel")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    TypeError: jlora.dora.magnitude: `f` must be a jlora.Factored (a kernel's ...
    """
    if not all(hasattr(f, a) for a in ("path", "kernel_shape", "n_stack", "n_in", "rank", "scale")):
        raise TypeError(
            f"{where}: `f` must be a jlora.Factored (a kernel's description), got {type(f).__name__}; fix: take it "
            "from jlora.adapted(frozen, lora, config)[path]"
        )
    for name, x in arrays.items():
        if tuple(x.shape) != tuple(f.kernel_shape):
            raise ValueError(
                f"{where}: `{name}` of {f.path!r} has shape {tuple(x.shape)}, expected the kernel's shape "
                f"{tuple(f.kernel_shape)}; fix: pass the frozen kernel at {f.path!r} (and its Factored description)"
            )
