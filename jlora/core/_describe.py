"""What a lora tree holds: the role of each leaf, and each adapted kernel's description.

:func:`leaf_roles` says what every lora leaf is (a factor ``A``/``B``, a DoRA magnitude ``m``,
trained ``rows``, a leaf trained ``whole``), read from the tree's nodes; :func:`factor_rank` checks
a factor pair against its layout and the config (the one rank check); :func:`adapted` checks that a
lora tree fits its frozen tree and describes each adapted kernel as a :class:`~jlora.core._kinds.Factored`:
its layout (from the lora tree's :class:`~jlora.layout.LoraKernel` node, or, for a plain dict node,
the stored ``stack + in + out`` order its factor shapes imply), rank and scale. Modules that work on
lora leaves read these; none re-derives a leaf's role from its name or a kernel's roles from ``ndim``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp  # noqa: F401  (the doctests)

from jlora.core import _checks as checks
from jlora.core import paths
from jlora.core._config import LoraConfig
from jlora.core._kinds import Factored
from jlora.core.layout import Layout, LoraKernel, is_kernel_node

__all__ = ["Leaf", "adapted", "configured_rank", "factor_rank", "kernel_layouts", "leaf_roles", "nest", "plain_layout"]

A, B, MAGNITUDE, ROWS, WHOLE = "A", "B", "m", "rows", "whole"
PARTS = (A, B, MAGNITUDE, ROWS)
"""The names of an adapted kernel's parts in the lora tree (the keys of its node)."""


class Leaf(NamedTuple):
    """What one lora leaf is: its ``role`` (``'A'``, ``'B'``, ``'m'``, ``'rows'`` or ``'whole'``) and the
    path of the frozen leaf it belongs to (``owner``: the kernel, the table, or its own path when whole)."""

    owner: str
    role: str


def kernel_layouts(lora: Any, config: LoraConfig | None = None) -> dict[str, Layout]:
    """The :class:`~jlora.layout.Layout` of every :class:`~jlora.layout.LoraKernel` node, by path.

    With ``config``, a layout without fused groups gets the config's for its path (a node made
    before layouts carried them, or by a file reader that does not know them).

    >>> lora = {"w": LoraKernel({"A": jnp.ones((3, 1)), "B": jnp.ones((1, 2))}, Layout((2, 3), "oi"))}
    >>> kernel_layouts(lora)["w"].roles
    'oi'
    """
    if lora is None or isinstance(lora, (str, bytes, int, float)):
        raise TypeError(f"kernel_layouts: lora must be a lora tree (nested dicts from jlora.init), got "
                        f"{type(lora).__name__}; fix: pass the tree jlora.init returned")
    nodes = jax.tree_util.tree_flatten_with_path(lora, is_leaf=is_kernel_node)[0]
    out = {paths.path_str(k): n.layout for k, n in nodes if is_kernel_node(n)}
    if config is not None:
        out = {p: lay.with_fused(config.fused_for(p)) if lay.fused is None else lay for p, lay in out.items()}
    return out


def plain_layout(path: str, a_shape: Any, b_shape: Any, config: LoraConfig | None,
                 kernel_ndim: int | None = None) -> Layout:
    """The layout of a plain dict node (no :class:`LoraKernel`, e.g. a tree built by hand): the kernel
    stored ``stack + in + out``, the order its factor shapes imply, with the config's fused groups.

    The number of stack axes is ``A.ndim + B.ndim - 2 - kernel_ndim`` (one less for a fused kernel)
    when the kernel's ``kernel_ndim`` is known, else ``config.stack``'s (0 without a config).

    >>> plain_layout("w", (10, 4, 2), (10, 2, 3), None, kernel_ndim=3).roles
    'sio'
    """
    fused = config.fused_for(path) if config is not None else None
    extra = int(fused is not None)
    if kernel_ndim is not None:
        n_stack = len(a_shape) + len(b_shape) - 2 - extra - kernel_ndim
    else:
        n_stack = int(config.stack_for(path) or 0) if config is not None else 0
    n_in, n_out = len(a_shape) - 1 - n_stack, len(b_shape) - 1 - extra - n_stack
    if n_stack < 0 or n_in < 1 or n_out < 1:
        raise ValueError(
            f"lora factors of {path!r}: A {tuple(a_shape)} and B {tuple(b_shape)} do not factor a kernel of "
            f"{kernel_ndim if kernel_ndim is not None else 'unknown'} axes stored stack + in + out (expected A = "
            f"stack + in + (r,), B = stack + (r,) + out{', fused: B = stack + (enabled, r) + out with the last axis split into groups' if fused else ''}); "
            "fix: the lora tree must come from jlora.init on this frozen tree and config"
        )
    out = tuple(b_shape[n_stack + 1 + extra:])
    if fused is not None:
        out = out[:-1] + (out[-1] * len(fused),)
    return Layout.plain(tuple(a_shape[:-1]) + out, n_stack, n_in).with_fused(fused)


def leaf_roles(lora: Any, frozen_paths: Collection[str] = ()) -> dict[str, Leaf]:
    """What each leaf of a lora tree is, by path (the one place a lora leaf's role is read).

    A :class:`LoraKernel` node names its parts by role (``"A"``, ``"B"``, DoRA's ``"m"``, trained
    ``"rows"``); a plain dict node (a tree built by hand, a table's ``{"rows": ...}``) uses the same
    names, ``"m"`` counting only beside ``"A"``/``"B"``. Every other leaf is trained ``'whole'``, and so
    is any leaf at one of ``frozen_paths`` (the frozen tree's paths) whatever its name.

    >>> lora = {"w": LoraKernel({"A": jnp.ones((3, 1)), "B": jnp.ones((1, 2))}, Layout((3, 2), "io")),
    ...         "emb": {"rows": jnp.ones((1, 2))}, "bias": jnp.ones(2)}
    >>> {p: leaf.role for p, leaf in leaf_roles(lora).items()}
    {'bias': 'whole', 'emb/rows': 'rows', 'w/A': 'A', 'w/B': 'B'}
    """
    nodes = kernel_layouts(lora)
    flat = paths.flatten(lora)
    out: dict[str, Leaf] = {}
    for p in flat:
        owner, _, part = p.rpartition("/")
        if p in frozen_paths:
            out[p] = Leaf(p, WHOLE)
        elif owner in nodes and part in PARTS or part in (A, B, ROWS):
            out[p] = Leaf(owner, part)
        elif part == MAGNITUDE and (owner + "/" + A in flat or owner + "/" + B in flat):
            out[p] = Leaf(owner, MAGNITUDE)
        else:
            out[p] = Leaf(p, WHOLE)
    return out


def configured_rank(config: LoraConfig, path: str, layout: Layout) -> int:
    """The rank of A and B at ``path`` that ``config`` gives: ``config.rank_for(path)``, divided over a
    grouped conv's feature groups (PEFT's convention: the configured rank is the total over them).

    >>> configured_rank(LoraConfig(rank=4), "c", Layout((2, 3, 3, 3), "siio", kind="conv", feature_groups=2))
    2
    """
    configured = config.rank_for(path)
    if configured % layout.feature_groups:
        raise ValueError(
            f"LoraConfig.rank: {path!r} is a grouped conv with {layout.feature_groups} feature groups; its rank is the total "
            f"over the groups (PEFT's convention), so it must be a multiple of {layout.feature_groups}, got {configured}; "
            f"fix: rank_pattern={{{path!r}: {layout.feature_groups * max(1, configured // layout.feature_groups)}}}"
        )
    return layout.rank_per_stack(configured)


def factor_rank(path: str, layout: Layout, a_shape: Any, b_shape: Any, config: LoraConfig | None) -> int:
    """The rank of the factor pair at ``path`` (per stack entry) after checking that their shapes factor
    ``layout`` and that the rank is the one ``config`` gives there (so the scale alpha/r is right; no
    config: the shapes only).

    >>> factor_rank("w", Layout((4, 3), "io"), (4, 2), (2, 3), LoraConfig(rank=2))
    2
    """
    rank = a_shape[-1] // layout.n_enabled
    if rank < 1 or (tuple(a_shape), tuple(b_shape)) != layout.factor_shapes(rank):
        raise ValueError(
            f"lora factors of {path!r}: A {tuple(a_shape)} and B {tuple(b_shape)} do not factor the frozen "
            f"kernel of shape {layout.shape} (axis roles {layout.describe()}; expected A = stack + in + (r,), B = "
            f"stack + (r,) + out{', fused: B = stack + (enabled, r) + out with the last axis split into groups' if layout.fused else ''}); "
            "fix: the lora tree must come from jlora.init on this frozen tree and config"
        )
    if config is not None and rank * layout.feature_groups != config.rank_for(path):
        raise ValueError(
            f"lora factors of {path!r} have rank {rank * layout.feature_groups} (A {tuple(a_shape)}) but the config gives rank "
            f"{config.rank_for(path)} there, so the scale alpha/r would be wrong; fix: pass the LoraConfig the lora "
            "tree was made with (or rank_pattern for this path)"
        )
    return rank


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
    for p, leaf in leaf_roles(lora, base).items():
        if leaf.role == WHOLE and p in base:
            ref, got = base[p], flat[p]
            if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
                raise ValueError(
                    f"lora leaf {p!r}: expected shape {tuple(ref.shape)} dtype {ref.dtype} (the frozen leaf it "
                    f"replaces), got shape {tuple(got.shape)} dtype {got.dtype}; fix: make the lora tree with "
                    "jlora.init on this frozen tree"
                )
            continue
        kernel, part = leaf
        if part in (MAGNITUDE, ROWS) and kernel in base:
            extra[kernel] = extra.get(kernel, ()) + (part,)
            continue
        if part not in (A, B) or kernel not in base:
            raise ValueError(
                f"lora leaf {p!r} has no counterpart in the frozen tree (expected '<kernel path>/A', "
                f"'<kernel path>/B' or a frozen leaf's path); closest frozen paths: {_closest_msg(kernel, base)}. "
                "Fix: the lora tree must come from jlora.init on this frozen tree"
            )
        if kernel in out:
            continue
        other = kernel + ("/B" if part == A else "/A")
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
    fused = config.fused_for(path)
    if layout is None:  # a plain dict node: the factors' shapes tell a stored stack + in + out kernel
        try:
            layout = plain_layout(path, A.shape, B.shape, config, len(shape))
        except ValueError:
            layout = None
        if layout is None or layout.shape != shape:
            raise ValueError(
                f"lora factors of {path!r}: A {tuple(A.shape)} and B {tuple(B.shape)} do not factor the frozen "
                f"kernel of shape {shape} (stored stack + in + out; expected A = stack + in + (r,), B = stack + (r,) + "
                f"out{', fused: B = stack + (enabled, r) + out with the last axis split into groups' if fused else ''}); "
                "fix: the lora tree must come from jlora.init on this frozen tree and config"
            )
    elif tuple(layout.shape) != shape:
        raise ValueError(
            f"lora node of {path!r}: its layout is for a kernel of shape {tuple(layout.shape)}, the frozen kernel "
            f"has shape {shape}; fix: make the lora tree with jlora.init on this frozen tree"
        )
    if layout.fused is None and fused is not None:  # a plain node, or a layout saved without its groups
        try:
            layout = layout.with_fused(fused)
        except ValueError as err:
            raise ValueError(f"lora node of {path!r}: {err}") from None
    elif layout.fused != fused:
        raise ValueError(
            f"lora node of {path!r}: its layout has fused groups {layout.fused}, the config {fused}; fix: pass the "
            "LoraConfig the lora tree was made with"
        )
    targeted = paths.matches(config.targets, path) and not paths.matches(config.exclude, path)
    rank = factor_rank(path, layout, A.shape, B.shape, config if targeted else None)
    if not targeted:
        raise ValueError(
            f"lora factors at {path!r}, but the config does not target it (targets {list(config.targets)}, exclude "
            f"{list(config.exclude)}): its rank and scale would be guesses; fix: pass the LoraConfig the lora tree was "
            "made with"
        )
    return Factored(path, layout, rank, config.scale_for(path, rank * layout.feature_groups))
