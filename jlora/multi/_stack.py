"""Stacks of adapters over one frozen base: build, select one, unstack, put one in a slot.

A *stack* holds N adapters in one lora tree with a leading adapter axis on every leaf. Each
path's rank is padded with zeros to the largest rank among the adapters at that path (or to a
fixed ``rank=``), so every adapter of the stack has the same shapes: which adapter runs is then an
array (an index), never a Python value, and switching adapters or changing the mix of a batch
never retraces. The last entry of a stack is all zeros: the id ``len(names)`` (also
``stack.base_id``) means "base model only".

Scales: a serving stack (``fold_scales=True``, the default) folds each adapter's ``alpha/r`` into
its B, so its config has scale 1 everywhere. A training stack (``fold_scales=False``) keeps the
factors as each adapter was made and ``Stack.scales`` per path and adapter, so that gradients and
optimizer updates are those of the adapter alone (see :mod:`jlora.multi._train`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import _checks as checks
from jlora.core import paths
from jlora.core._config import LoraConfig
from jlora.core._describe import (MAGNITUDE, ROWS, WHOLE, A, B, adapted, configured_rank, factor_rank, kernel_layouts,
                                  leaf_roles, nest)
from jlora.core._kinds import Factored
from jlora.core.layout import Layout

__all__ = ["Stack", "stack", "select", "unstack", "put", "scaled"]


@dataclasses.dataclass(frozen=True)
class Stack:
    """N named adapters over one base: ``lora`` has a leading adapter axis (N + 1, the last all zeros).

    Attributes:
      lora: the stacked lora tree (a pytree of arrays).
      config: a config with scale 1 at every adapted path (per-path ranks: the padded ranks).
      names: the adapters' names, in stack order.
      configs: each adapter's own config (for :func:`unstack`), in stack order.
      leaves: each adapter's own leaf paths (for :func:`unstack`), in stack order.
      scales: ``{kernel path: (N + 1,) float32}``, each adapter's scale there (0 where it has no
        factors, and for the base entry).
      folded: True when the scales are folded into the stacked B (serving); False when the stacked
        factors are the adapters' own (training; use :func:`scaled` to run them).
    """

    lora: Any
    config: LoraConfig
    names: tuple[str, ...]
    configs: tuple[LoraConfig, ...] = ()
    leaves: tuple[tuple[str, ...], ...] = ()
    scales: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    folded: bool = True

    @property
    def base_id(self) -> int:
        """The id meaning 'no adapter' (the all-zero entry)."""
        return len(self.names)

    def id(self, name: str) -> int:
        """The index of adapter ``name``.

        >>> Stack({}, LoraConfig(targets=".*"), ("sql", "chat")).id("chat")
        1
        """
        if name not in self.names:
            raise ValueError(f"Stack.id: no adapter named {name!r}; the stack holds {list(self.names)}; "
                             "fix: use one of these names (stack.names)")
        return self.names.index(name)

    def replace(self, **changes: Any) -> Stack:
        """A copy with some fields changed (e.g. ``lora=`` after a training step)."""
        return dataclasses.replace(self, **changes)


def _unit_config(ranks: Mapping[str, int], trainable: Sequence[str], layouts: Mapping[str, Layout]) -> LoraConfig:
    """A config with scale 1 at each kernel of ``ranks`` (ranks per stack entry) and its fused groups."""
    exact = {re.escape(p): r * layouts[p].feature_groups for p, r in ranks.items()}  # grouped convs: total rank
    return LoraConfig(
        rank=max(ranks.values()) if ranks else 1,
        alpha=float(max(ranks.values()) if ranks else 1),
        targets=tuple(exact) or (".*",),
        rank_pattern=exact,
        alpha_pattern={p: float(r) for p, r in exact.items()},
        trainable=tuple(re.escape(p) for p in trainable),
        fused={re.escape(p): layouts[p].fused for p in ranks if layouts[p].fused is not None},
    )


def _pad_rank(x: jax.Array, axis: int, rank: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, rank - x.shape[axis])
    return jnp.pad(x, pad)


def _resize_rank(a: Any, b: Any, lay: Layout, rank: int) -> tuple[Any, Any]:
    """A and B of a kernel of layout ``lay`` with the rank padded with zeros (or cut) to ``rank`` per stack
    entry (per enabled group of a fused kernel: A's last axis is ``(enabled, r)`` flattened)."""
    b_axis, e = lay.b_rank_axis, lay.n_enabled
    a = a.reshape(a.shape[:-1] + (e, a.shape[-1] // e))
    a = _pad_rank(a, a.ndim - 1, rank) if rank >= a.shape[-1] else a[..., :rank]
    a = a.reshape(a.shape[:-2] + (e * rank,))
    if rank >= b.shape[b_axis]:
        b = _pad_rank(b, b_axis, rank)
    else:
        b = jax.lax.slice_in_dim(b, 0, rank, axis=b_axis)
    return a, b


def _described(frozen: Any, lora: Any, config: LoraConfig) -> tuple[dict[str, Factored], dict[str, Any]]:
    """The adapter's kernels and its leaves by path; an adapter with DoRA magnitudes or trained rows is
    refused (stacks and combinations assume ``delta = s·A⊗B``). Every leaf that is no factor is whole."""
    info = adapted(frozen, lora, config)
    for p, (owner, role) in leaf_roles(lora, paths.flatten(frozen)).items():
        if role in (MAGNITUDE, ROWS):
            what = "a DoRA magnitude" if role == MAGNITUDE else "trained embedding rows"
            raise ValueError(
                f"jlora.multi: {owner!r} carries {what}, which stacking and combination do not support (they "
                "assume delta = s·A⊗B); fix: merge that adapter with jlora.merge and serve it alone"
            )
    return info, dict(paths.flatten(lora))


def _whole(described: Sequence[tuple[Mapping[str, Factored], Mapping[str, Any]]]) -> list[str]:
    """The trained-whole leaves of some described adapters: every leaf that is not a kernel's A or B."""
    kernels = {p for info, _ in described for p in info}
    factors = {f"{p}/{part}" for p in kernels for part in (A, B)}
    return sorted({p for _, flat in described for p in flat if p not in factors})


def _fold(b: Any, scale: float) -> Any:
    """``scale * B`` in float32, rounded once to B's dtype: how a serving stack holds B."""
    return (b.astype(jnp.float32) * scale).astype(b.dtype)


def _unfold(folded: Any, scale: float) -> Any:
    """A B with ``_fold(B, scale) == folded`` bit for bit: ``folded / scale``, then moved by an ulp while
    folding it again lands below or above (the division alone is off by an ulp wherever ``scale`` is not
    a power of two, and a saved-and-restored stack would differ from the one in memory).

    >>> b = jnp.linspace(-1.0, 1.0, 101)
    >>> bool((_fold(_unfold(_fold(b, 7 / 3), 7 / 3), 7 / 3) == _fold(b, 7 / 3)).all())
    True
    """
    x = (folded.astype(jnp.float32) / scale).astype(folded.dtype)
    toward = jnp.asarray(jnp.inf if scale > 0 else -jnp.inf, folded.dtype)
    for _ in range(4):  # the preimage is within ~2 ulps of the quotient
        y = _fold(x, scale)
        x = jnp.where(y < folded, jnp.nextafter(x, toward), jnp.where(y > folded, jnp.nextafter(x, -toward), x))
    return x


def _scaled_factors(frozen: Any, lora: Any, config: LoraConfig) -> tuple[dict[str, Factored], dict[str, Any]]:
    """The adapter with each scale folded into its B (the returned descriptions have scale 1)."""
    info, flat = _described(frozen, lora, config)
    for p, f in info.items():
        flat[p + "/B"] = _fold(flat[p + "/B"], f.scale)
    return {p: dataclasses.replace(f, scale=1.0) for p, f in info.items()}, flat


def stack(frozen: Any, adapters: Mapping[str, tuple[Any, LoraConfig]], *, fold_scales: bool = True,
          rank: int | Mapping[str, int] | None = None) -> Stack:
    """Stacks named adapters ``{name: (lora, config)}`` made on the same frozen tree.

    Adapters may target different paths, ranks and alphas: a path an adapter lacks gets zero
    factors for it. Trained-whole leaves must be present in all adapters or none.

    Args:
      frozen: the base params.
      adapters: ``{name: (lora, config)}``.
      fold_scales: fold each scale into B (serving); False keeps the adapters' factors and puts the
        scales in ``Stack.scales`` (training with :func:`jlora.multi.train_step`).
      rank: pad every path to this rank (per stack entry) instead of the adapters' largest: stacks
        made with the same ``rank`` have the same shapes, so swapping one for another never
        recompiles. An adapter with a larger rank raises a ValueError. A mapping gives it per path.

    >>> frozen = {"w": jnp.zeros((4, 4))}
    >>> a = ({"w": {"A": jnp.ones((4, 1)), "B": jnp.ones((1, 4))}}, LoraConfig(rank=1, alpha=2, targets="w"))
    >>> b = ({"w": {"A": jnp.ones((4, 2)), "B": jnp.ones((2, 4))}}, LoraConfig(rank=2, alpha=2, targets="w"))
    >>> s = stack(frozen, {"a": a, "b": b})
    >>> s.lora["w"]["A"].shape, s.names, s.base_id, stack(frozen, {"a": a}, rank=4).lora["w"]["A"].shape
    ((3, 4, 2), ('a', 'b'), 2, (2, 4, 4))
    """
    if not adapters:
        raise ValueError("jlora.multi.stack: no adapters given; expected {name: (lora, config)}; fix: "
                         "jlora.multi.stack(frozen, {'sql': (lora_sql, config_sql)})")
    names = tuple(adapters)
    described = {n: _described(frozen, lora, cfg) for n, (lora, cfg) in adapters.items()}
    scales_by = {n: {p: f.scale for p, f in info.items()} for n, (info, _) in described.items()}
    if fold_scales:
        described = {n: _scaled_factors(frozen, lora, cfg) for n, (lora, cfg) in adapters.items()}
    kernels = sorted({p for info, _ in described.values() for p in info})
    whole = _whole(list(described.values()))
    base = paths.flatten(frozen)
    ranks: dict[str, int] = {}
    for p in kernels:
        fs = [info[p] for info, _ in described.values() if p in info]
        want = rank.get(p) if isinstance(rank, Mapping) else rank
        ranks[p] = max(f.rank for f in fs) if want is None else int(want)
        if ranks[p] < max(f.rank for f in fs):
            big = {n: info[p].rank for n, (info, _) in described.items() if p in info}
            raise ValueError(f"jlora.multi.stack: rank={rank} but adapters have larger ranks at {p!r}: {big}; fix: "
                             "rank >= the largest adapter rank (or rank=None)")
        if any(f.layout != fs[0].layout for f in fs):
            seen = {n: (info[p].layout.describe(), info[p].fused) for n, (info, _) in described.items() if p in info}
            raise ValueError(
                f"jlora.multi.stack: adapters disagree on the layout of {p!r} (adapter: (axis roles, fused groups)): "
                f"{seen}; fix: make every adapter with jlora.init on this frozen tree and the same layout/fused "
                "rules for this path, or serve them from separate stacks"
            )
    out: dict[str, Any] = {}
    for p in kernels:
        ref_info, ref_flat = next((info, flat) for info, flat in described.values() if p in info)
        ref = ref_info[p]
        parts_a, parts_b = [], []
        for n in names:
            info, flat = described[n]
            if p in info:
                a, b = _resize_rank(flat[p + "/A"], flat[p + "/B"], info[p].layout, ranks[p])
            else:
                a, b = _resize_rank(ref_flat[p + "/A"], ref_flat[p + "/B"], ref.layout, ranks[p])
                a, b = jnp.zeros_like(a), jnp.zeros_like(b)
            parts_a.append(a)
            parts_b.append(b)
        parts_a.append(jnp.zeros_like(parts_a[0]))
        parts_b.append(jnp.zeros_like(parts_b[0]))
        out[p + "/A"], out[p + "/B"] = jnp.stack(parts_a), jnp.stack(parts_b)
    for p in whole:
        missing = [n for n in names if p not in described[n][1]]
        if missing:
            raise ValueError(
                f"jlora.multi.stack: trained-whole leaf {p!r} is in some adapters but not in {missing}; "
                "fix: train it in all adapters or in none"
            )
        out[p] = jnp.stack([described[n][1][p] for n in names] + [base[p]])
    layouts = {p: next(info[p] for info, _ in described.values() if p in info).layout for p in kernels}
    scales = {p: np.array([scales_by[n].get(p, 0.0) for n in names] + [0.0], np.float32) for p in kernels}
    return Stack(nest(out, layouts), _unit_config(ranks, whole, layouts), names,
                 tuple(cfg for _, cfg in adapters.values()),
                 tuple(tuple(paths.flatten(lora)) for lora, _ in adapters.values()), scales, fold_scales)


def select(s: Stack, index: jax.Array | int) -> Any:
    """The lora tree of adapter ``index`` (an int or a traced int: no retrace), for ``s.config``.

    ``index`` must be in ``[0, s.base_id]``: nothing wraps or clamps. An out-of-range int raises a
    ValueError; a traced one fails when the computation runs (see :func:`jlora.multi.mixed_apply`).
    A training stack (``folded=False``) is scaled first (:func:`scaled`), so the result always
    runs with ``s.config``.

    >>> frozen = {"w": jnp.zeros((2, 2))}
    >>> s = stack(frozen, {"a": ({"w": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2))}}, LoraConfig(rank=1, alpha=1, targets="w"))})
    >>> select(s, 0)["w"]["B"].tolist(), select(s, s.base_id)["w"]["B"].tolist()
    ([[1.0, 1.0]], [[0.0, 0.0]])
    """
    n = len(s.names) + 1
    checks.adapter_ids("jlora.multi.select", "index", index, n)
    lora = s.lora if s.folded else scaled(s.lora, s.scales)
    return jax.tree.map(lambda x: x[index], lora)


def scaled(lora: Any, scales: Mapping[str, Any]) -> Any:
    """A training stack's lora tree with each adapter's scale folded into its B (runs with the stack's
    config); differentiable, so gradients reach the unscaled factors.

    >>> lora = {"w": {"A": jnp.ones((2, 3, 1)), "B": jnp.ones((2, 1, 3))}}
    >>> scaled(lora, {"w": jnp.array([2.0, 0.0])})["w"]["B"][:, 0, 0].tolist()
    [2.0, 0.0]
    """
    roles = leaf_roles(lora)
    kernels = {owner for owner, role in roles.values() if role == B}
    unknown = sorted(set(scales) - kernels)
    if unknown:
        raise ValueError(f"jlora.multi.scaled: scales has paths that are no kernel of the stacked lora tree: "
                         f"{unknown[:4]}; expected a subset of {sorted(kernels)[:4]}; fix: pass the stack's own "
                         "scales (Stack.scales) with its lora tree")

    def one(path: str, x: Any) -> Any:
        kernel, part = roles[path]
        if part != B or kernel not in scales:
            return x
        s = jnp.asarray(scales[kernel], jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        return (x.astype(jnp.float32) * s).astype(x.dtype)

    return paths.map_with_path(one, lora)


def unstack(s: Stack, frozen: Any = None) -> dict[str, tuple[Any, LoraConfig]]:
    """Each adapter as ``{name: (lora, config)}`` with its own ranks, paths and config, as
    :func:`stack` received it (for ``jlora.save_adapter``). A serving stack's B is divided by
    the folded scale again (:func:`_unfold`: within an ulp of the original, and chosen so that
    folding it again gives the stack's B bit for bit: a stack saved with ``save_stack`` restores
    bit-identical); a training stack's factors are returned as they are. ``frozen`` (optional)
    checks each result with ``jlora.adapted``.

    >>> frozen = {"w": jnp.zeros((4, 4))}
    >>> a = ({"w": {"A": jnp.ones((4, 1)), "B": jnp.ones((1, 4))}}, LoraConfig(rank=1, alpha=2, targets="w"))
    >>> lora, cfg = unstack(stack(frozen, {"a": a}, rank=3, fold_scales=False))["a"]
    >>> lora["w"]["A"].shape, cfg.rank
    ((4, 1), 1)
    """
    if not s.configs:
        raise ValueError("jlora.multi.unstack: this Stack does not record its adapters' configs; fix: make it "
                         "with jlora.multi.stack")
    flat = paths.flatten(s.lora)
    layouts = kernel_layouts(s.lora, s.config)
    roles = leaf_roles(s.lora)
    out: dict[str, tuple[Any, LoraConfig]] = {}
    for i, (name, cfg, leaves) in enumerate(zip(s.names, s.configs, s.leaves)):
        mine: dict[str, Any] = {}
        for p in leaves:
            kernel, part = roles[p] if p in roles else (p, WHOLE)
            if part not in (A, B) or kernel not in layouts:
                mine[p] = flat[p][i]
                continue
            if part == B:
                continue
            lay = layouts[kernel]
            r = configured_rank(cfg, kernel, lay)
            a, b = _resize_rank(flat[kernel + "/A"][i], flat[kernel + "/B"][i], lay, r)
            if s.folded:
                b = _unfold(b, float(s.scales[kernel][i]))
            try:
                factor_rank(kernel, lay, a.shape, b.shape, cfg)
            except ValueError as err:
                raise ValueError(f"jlora.multi.unstack: {kernel!r} of adapter {name!r} does not fit its config "
                                 f"(rank {r}): {err}") from None
            mine[kernel + "/A"], mine[kernel + "/B"] = a, b
        lora = nest(mine, {p: lay for p, lay in layouts.items() if p + "/A" in mine})
        if frozen is not None:
            adapted(frozen, lora, cfg)
        out[name] = (lora, cfg)
    return out


def put(s: Stack, name: str, frozen: Any, lora: Any, config: LoraConfig) -> Stack:
    """A copy of ``s`` whose slot ``name`` holds another adapter, with the same shapes (so a jitted
    server keeps its compilation). Its paths must be among the stack's and its ranks at most the
    stack's; the slot's other paths get zeros.

    >>> frozen = {"w": jnp.zeros((4, 4))}
    >>> a = ({"w": {"A": jnp.ones((4, 1)), "B": jnp.ones((1, 4))}}, LoraConfig(rank=1, alpha=1, targets="w"))
    >>> s = put(stack(frozen, {"a": a}, rank=2), "a", frozen, {"w": {"A": 2 * jnp.ones((4, 2)), "B": jnp.ones((2, 4))}},
    ...         LoraConfig(rank=2, alpha=2, targets="w"))
    >>> s.lora["w"]["A"].shape, float(s.lora["w"]["A"][0, 0, 1])
    ((2, 4, 2), 2.0)
    """
    i = s.id(name)
    one = stack(frozen, {name: (lora, config)}, fold_scales=s.folded)
    new, mine = paths.flatten(one.lora), dict(paths.flatten(s.lora))
    layouts = kernel_layouts(s.lora, s.config)
    extra = sorted(set(new) - set(mine))
    if extra:
        raise ValueError(f"jlora.multi.put: adapter {name!r} has leaves the stack lacks: {extra[:4]}; fix: make a "
                         "new stack with jlora.multi.stack (its shapes change, so a jitted server recompiles)")
    info = one.config
    for p in layouts:
        if p + "/A" not in new:
            mine[p + "/A"], mine[p + "/B"] = mine[p + "/A"].at[i].set(0), mine[p + "/B"].at[i].set(0)
            continue
        r_stack, r_new = configured_rank(s.config, p, layouts[p]), configured_rank(info, p, layouts[p])
        if r_new > r_stack:
            raise ValueError(f"jlora.multi.put: adapter {name!r} has rank {r_new} at {p!r}, the stack {r_stack}; fix: "
                             "make the stack with a larger rank= (jlora.multi.stack(..., rank=...))")
        a, b = _resize_rank(new[p + "/A"][0], new[p + "/B"][0], layouts[p], r_stack)
        mine[p + "/A"], mine[p + "/B"] = mine[p + "/A"].at[i].set(a), mine[p + "/B"].at[i].set(b)
    for p, (owner, _) in leaf_roles(one.lora).items():
        if owner not in layouts:
            mine[p] = mine[p].at[i].set(new[p][0])
    scales = {p: np.asarray(v).copy() for p, v in s.scales.items()}
    for p in scales:
        scales[p][i] = one.scales[p][0] if p in one.scales else 0.0
    configs = tuple(config if k == i else c for k, c in enumerate(s.configs))
    leaves = tuple(tuple(paths.flatten(lora)) if k == i else lv for k, lv in enumerate(s.leaves))
    return s.replace(lora=nest(mine, layouts), configs=configs, leaves=leaves, scales=scales)
