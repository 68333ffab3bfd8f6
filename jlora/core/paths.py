"""Canonical path strings for pytree leaves, regex matching, and the match report.

A leaf's path is its '/'-joined pytree keys (``params/encoder/layer_0/query/kernel``). NNX
``Variable`` wrappers do not appear: the state leaf ``kernel/value`` is ``kernel``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
from jax.tree_util import keystr

try:  # flax is a dependency, but keep paths usable on plain pytrees without importing nnx eagerly
    from flax import nnx as _nnx

    _VARIABLE: tuple[type, ...] = (_nnx.Variable,)
except ImportError:  # pragma: no cover
    _VARIABLE = ()


def is_variable(x: Any) -> bool:
    """True for an NNX ``Variable`` (a wrapped leaf)."""
    return bool(_VARIABLE) and isinstance(x, _VARIABLE)


class OpaqueLeaf:
    """Base of pytree nodes that jlora paths treat as ONE leaf (``jlora.quant.QuantizedArray``):
    :func:`flatten` and :func:`map_with_path` stop at them, at the kernel's own path."""


def _is_leaf(x: Any) -> bool:
    return is_variable(x) or isinstance(x, OpaqueLeaf)


def path_str(keypath: tuple[Any, ...]) -> str:
    """The canonical '/'-joined string of a jax key path.

    >>> import jax
    >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": {"b": 1, "c": [2]}})[0]]
    ['a/b', 'a/c/0']
    """
    return keystr(tuple(keypath), simple=True, separator="/")


def flatten(tree: Any) -> dict[str, Any]:
    """Maps each leaf's canonical path to the leaf (NNX Variables unwrapped to their value).

    >>> flatten({"params": {"dense": {"kernel": 1.0, "bias": 2.0}}})
    {'params/dense/bias': 2.0, 'params/dense/kernel': 1.0}
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0]
    out: dict[str, Any] = {}
    for keypath, leaf in leaves:
        out[path_str(keypath)] = leaf.get_value() if is_variable(leaf) else leaf
    return out


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """``jax.tree.map`` with the canonical path as first argument; NNX Variables keep their wrapper.

    >>> map_with_path(lambda p, x: p, {"a": {"b": 0}})
    {'a': {'b': 'a/b'}}
    """

    def one(keypath: tuple[Any, ...], leaf: Any) -> Any:
        if is_variable(leaf):
            return leaf.replace(value=fn(path_str(keypath), leaf.get_value()))
        return fn(path_str(keypath), leaf)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_leaf)


def unflatten_dict(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts from a ``{path: value}`` mapping (keys split on '/').

    >>> unflatten_dict({"a/b": 1, "a/c": 2})
    {'a': {'b': 1, 'c': 2}}
    """
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"unflatten_dict: path {path!r} passes through a leaf at {key!r}")
        node[last] = value
    return out


def matches(regexes: Iterable[str], path: str) -> bool:
    """True if any regex fully matches ``path``.

    >>> matches([r".*/kernel"], "params/dense/kernel"), matches(["kernel"], "params/dense/kernel")
    (True, False)
    """
    return any(re.fullmatch(r, path) for r in regexes)


def closest(pattern: str, paths: Iterable[str], n: int = 5) -> list[str]:
    """The paths that look most like ``pattern`` (for 'matched nothing' errors)."""
    paths = list(paths)
    plain = re.sub(r"[\\^$.*+?()\[\]{}|]", "", pattern)
    found = difflib.get_close_matches(plain, paths, n=n, cutoff=0.0)
    return found or paths[:n]


def check_rules_match(name: str, regexes: Iterable[str], paths: Iterable[str]) -> None:
    """Raises if any regex matches no path, listing the closest paths.

    >>> check_rules_match("targets", [r".*/qery/kernel"], ["p/query/kernel", "p/key/kernel"])
    Traceback (most recent call last):
      ...
    ValueError: LoraConfig.targets: '.*/qery/kernel' matched no parameter; closest paths: p/query/kernel, p/key/kernel. Fix the regex (it must match a whole path, re.fullmatch).
    """
    paths = list(paths)
    for regex in regexes:
        if not any(re.fullmatch(regex, p) for p in paths):
            near = ", ".join(closest(regex, paths))
            raise ValueError(
                f"LoraConfig.{name}: {regex!r} matched no parameter; closest paths: {near}. "
                "Fix the regex (it must match a whole path, re.fullmatch)."
            )
