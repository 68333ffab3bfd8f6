"""Reading a ``(frozen, lora)`` pair into :class:`~jlora.core._kinds.Factored` descriptions.

:func:`adapted` checks that a lora tree fits its frozen tree and describes each adapted kernel:
its layout (from the lora tree's :class:`~jlora.layout.LoraKernel` node, or, for a plain dict
node, the stored ``stack + in + out`` order its factor shapes imply), rank and scale. Every module
that works on adapted kernels reads these descriptions; none re-derives a kernel's roles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core import _checks as checks
from jlora.core import _kinds as kinds
from jlora.core import paths
from jlora.core._config import LoraConfig
from jlora.core._kinds import Factored
from jlora.core.layout import Layout, LoraKernel, is_kernel_node

__all__ = ["adapted", "kernel_layouts", "nest"]


def kernel_layouts(lora: Any) -> dict[str, Layout]:
    """The :class:`~jlora.layout.Layout` of every :class:`~jlora.layout.LoraKernel` node, by path.

    >>> lora = {"w": LoraKernel({"A": jnp.ones((3, 1)), "B": jnp.ones((1, 2))}, Layout((2, 3), "oi"))}
    >>> kernel_layouts(lora)["w"].roles
    'oi'
    """
    if lora is None or isinstance(lora, (str, bytes, int, float)):
        raise TypeError(f"kernel_layouts: lora must be a lora tree (nested dicts from jlora.init), got "
                        f"{type(lora).__name__}; fix: pass the tree jlora.init returned")
    nodes = jax.tree_util.tree_flatten_with_path(lora, is_leaf=is_kernel_node)[0]
    return {paths.path_str(k): n.layout for k, n in nodes if is_kernel_node(n)}


def nest(flat: Mapping[str, Any], layouts: Mapping[str, Layout]) -> dict[str, Any]:
    """Nested dicts from ``{path: leaf}``, each adapted kernel's parts in a :class:`LoraKernel`
    carrying ``layouts[path]``.

    >>> t = nest({"w/A": jnp.ones((3, 1)), "w/B": jnp.ones((1, 2))}, {"w": Layout((2, 3), "oi")})
    >>> type(t["w"]).__name__, t["w"].layout.roles
    ('LoraKernel', 'oi')
    """
    tree = paths.unflatten_dict(dict(flat))
    for p, lay in layouts.items():
        keys = p.split("/")
        node = tree
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), Mapping) and "A" in node[keys[-1]]:
            node[keys[-1]] = LoraKernel(node[keys[-1]], lay)
    return tree


def _closest_msg(path: str, flat: Mapping[str, Any]) -> str:
    return ", ".join(paths.closest(path, flat, 3))


def adapted(frozen: Any, lora: Any, config: LoraConfig) -> dict[str, Factored]:
    """Checks that ``lora`` fits ``frozen`` and describes each adapted kernel.

    Raises a ValueError naming the path and both shapes for a missing or extra path, a factor of
    the wrong shape or a trained-whole leaf of the wrong shape or dtype.

    >>> frozen = {"d": {"kernel": jnp.ones((4, 3))}}
    >>> lora = {"d": {"kernel": {"A": jnp.ones((4, 2)), "B": jnp.zeros((2, 3))}}}
    >>> adapted(frozen, lora, LoraConfig(rank=2, alpha=4, targets=".*"))["d/kernel"].scale
    2.0
    """
    checks.lora_tree("jlora.adapted", lora)
    base = paths.flatten(frozen)
    flat = paths.flatten(lora)
    layouts = kernel_layouts(lora)
    out: dict[str, Factored] = {}
    extra: dict[str, tuple[str, ...]] = {}
    for p, leaf in flat.items():
        if p in base:
            ref = base[p]
            if tuple(leaf.shape) != tuple(ref.shape) or leaf.dtype != ref.dtype:
                raise ValueError(
                    f"lora leaf {p!r}: expected shape {tuple(ref.shape)} dtype {ref.dtype} (the frozen leaf it "
                    f"replaces), got shape {tuple(leaf.shape)} dtype {leaf.dtype}; fix: make the lora tree with "
                    "jlora.init on this frozen tree"
                )
            continue
        kernel, _, part = p.rpartition("/")
        if part in ("m", "rows") and kernel in base:
            extra[kernel] = extra.get(kernel, ()) + (part,)
            continue
        if part not in ("A", "B") or kernel not in base:
            raise ValueError(
                f"lora leaf {p!r} has no counterpart in the frozen tree (expected '<kernel path>/A', "
                f"'<kernel path>/B' or a frozen leaf's path); closest frozen paths: {_closest_msg(kernel, base)}. "
                "Fix: the lora tree must come from jlora.init on this frozen tree"
            )
        if kernel in out:
            continue
        other = kernel + ("/B" if part == "A" else "/A")
        if other not in flat:
            raise ValueError(f"lora tree: {p!r} has no partner {other!r}; an adapted kernel needs both A and B; "
                             "fix: make the lora tree with jlora.init (or restore both factors)")
        out[kernel] = _describe(kernel, base[kernel], flat[kernel + "/A"], flat[kernel + "/B"], config,
                                layouts.get(kernel))
    for kernel, parts in extra.items():
        if "m" in parts:
            f = out.get(kernel)
            if f is None:
                raise ValueError(
                    f"lora leaf {kernel + '/m'!r}: a DoRA magnitude needs the factors {kernel + '/A'!r} and "
                    f"{kernel + '/B'!r} beside it; fix: make the lora tree with jlora.init(use_dora=True)"
                )
            want, got = f.layout.stack_shape + f.layout.out_shape, tuple(flat[kernel + "/m"].shape)
            if got != want:
                raise ValueError(
                    f"lora leaf {kernel + '/m'!r}: expected the DoRA magnitude shape {want} (stack + out of the "
                    f"kernel {f.kernel_shape}), got {got}; fix: make the lora tree with jlora.init and this config"
                )
            out[kernel] = dataclasses.replace(f, dora=True)
        if "rows" in parts:
            rows, table = config.rows_for(kernel), base[kernel]
            want = None if rows is None else (len(rows),) + tuple(table.shape[1:])
            got = tuple(flat[kernel + "/rows"].shape)
            if got != want:
                raise ValueError(
                    f"lora leaf {kernel + '/rows'!r}: expected shape {want} (LoraConfig.embedding_rows of the "
                    f"table {tuple(table.shape)}), got {got}; fix: make the lora tree with jlora.init and this config"
                )
    return out


def _describe(path: str, kernel: Any, A: Any, B: Any, config: LoraConfig, layout: Layout | None) -> Factored:
    shape = tuple(kernel.shape)
    groups = config.groups_for(path)
    extra = 1 if groups is not None else 0
    if layout is None:  # a plain dict node: the factors' shapes tell a stored stack + in + out kernel
        n_stack = A.ndim + B.ndim - 2 - extra - len(shape)
        n_in = A.ndim - 1 - n_stack
        ok = n_stack >= 0 and n_in >= 1 and n_stack + n_in < len(shape)
        layout = Layout.plain(shape, n_stack, n_in) if ok else None
    elif tuple(layout.shape) != shape:
        raise ValueError(
            f"lora node of {path!r}: its layout is for a kernel of shape {tuple(layout.shape)}, the frozen kernel "
            f"has shape {shape}; fix: make the lora tree with jlora.init on this frozen tree"
        )
    bad = layout is None
    rank = 0
    if not bad:
        rank = A.shape[-1] // (sum(groups) if groups is not None else 1)
        bad = rank < 1 or (tuple(A.shape), tuple(B.shape)) != kinds.factor_shapes(layout, rank, groups)
    if bad:
        roles = f"axis roles {layout.describe()}" if layout is not None else "stored stack + in + out"
        raise ValueError(
            f"lora factors of {path!r}: A {tuple(A.shape)} and B {tuple(B.shape)} do not factor the frozen "
            f"kernel of shape {shape} ({roles}; expected A = stack + in + (r,), B = stack + (r,) + out"
            f"{', fused: B = stack + (enabled, r) + out with the last axis split into groups' if groups else ''}); "
            "fix: the lora tree must come from jlora.init on this frozen tree and config"
        )
    if not paths.matches(config.targets, path) or paths.matches(config.exclude, path):
        raise ValueError(
            f"lora factors at {path!r}, but the config does not target it (targets {list(config.targets)}, exclude "
            f"{list(config.exclude)}): its rank and scale would be guesses; fix: pass the LoraConfig the lora tree was "
            "made with"
        )
    total = int(rank) * layout.groups
    if total != config.rank_for(path):
        raise ValueError(
            f"lora factors of {path!r} have rank {total} (A {tuple(A.shape)}) but the config gives rank "
            f"{config.rank_for(path)} there, so the scale alpha/r would be wrong; fix: pass the LoraConfig the lora "
            "tree was made with (or rank_pattern for this path)"
        )
    return Factored(path, layout, int(rank), config.scale_for(path, total), groups)
