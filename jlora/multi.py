"""Many adapters over one frozen base: stack, select, mixed batches, and combination.

A *stack* holds N adapters in one lora tree with a leading adapter axis on every leaf. Each
path's rank is padded with zeros to the largest rank among the adapters at that path, and each
adapter's scale is folded into its B, so the stack's config has scale 1 everywhere. Which adapter
runs is then an array (an index), never a Python value: switching adapters or changing the mix
of a batch never retraces. The last entry of a stack is all zeros: the id ``len(names)`` (also
``stack.base_id``) means "base model only".
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import checks, paths
from jlora.apply import lora_apply
from jlora.config import LoraConfig
from jlora.describe import adapted, nest
from jlora.kinds import Factored, canonical_delta
from jlora.layout import Layout


@dataclasses.dataclass(frozen=True)
class Stack:
    """N named adapters over one base: ``lora`` has a leading adapter axis (N + 1, the last all zeros).

    Attributes:
      lora: the stacked lora tree (a pytree of arrays).
      config: a config with scale 1 at every adapted path (scales live in B).
      names: the adapters' names, in stack order.
    """

    lora: Any
    config: LoraConfig
    names: tuple[str, ...]

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


def _unit_config(ranks: Mapping[str, int], trainable: Sequence[str], groups: Mapping[str, Any],
                 layouts: Mapping[str, Layout]) -> LoraConfig:
    exact = {re.escape(p): r * layouts[p].groups for p, r in ranks.items()}  # grouped convs: total rank
    return LoraConfig(
        rank=max(ranks.values()) if ranks else 1,
        alpha=float(max(ranks.values()) if ranks else 1),
        targets=tuple(exact) or (".*",),
        rank_pattern=exact,
        alpha_pattern={p: float(r) for p, r in exact.items()},
        trainable=tuple(re.escape(p) for p in trainable),
        fused={re.escape(p): g for p, g in groups.items() if g is not None},
    )


def _pad_rank(x: jax.Array, axis: int, rank: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, rank - x.shape[axis])
    return jnp.pad(x, pad)


def _scaled_factors(frozen: Any, lora: Any, config: LoraConfig) -> tuple[dict[str, Factored], dict[str, Any]]:
    """The adapter with each scale folded into its B (the returned descriptions have scale 1)."""
    info = adapted(frozen, lora, config)
    flat = dict(paths.flatten(lora))
    for p, f in info.items():
        if f.dora or p + "/rows" in flat:
            what = "a DoRA magnitude" if f.dora else "trained embedding rows"
            raise ValueError(
                f"jlora.multi: {p!r} carries {what}, which stacking and combination do not support (they "
                "assume delta = s·A⊗B); fix: merge that adapter with jlora.merge and serve it alone"
            )
        flat[p + "/B"] = (flat[p + "/B"].astype(jnp.float32) * f.scale).astype(flat[p + "/B"].dtype)
    return {p: dataclasses.replace(f, scale=1.0) for p, f in info.items()}, flat


def stack(frozen: Any, adapters: Mapping[str, tuple[Any, LoraConfig]]) -> Stack:
    """Stacks named adapters ``{name: (lora, config)}`` made on the same frozen tree.

    Adapters may target different paths, ranks and alphas: a path an adapter lacks gets zero
    factors for it. Trained-whole leaves must be present in all adapters or none.

    >>> frozen = {"w": jnp.zeros((4, 4))}
    >>> a = ({"w": {"A": jnp.ones((4, 1)), "B": jnp.ones((1, 4))}}, LoraConfig(rank=1, alpha=2, targets="w"))
    >>> b = ({"w": {"A": jnp.ones((4, 2)), "B": jnp.ones((2, 4))}}, LoraConfig(rank=2, alpha=2, targets="w"))
    >>> s = stack(frozen, {"a": a, "b": b})
    >>> s.lora["w"]["A"].shape, s.names, s.base_id
    ((3, 4, 2), ('a', 'b'), 2)
    """
    if not adapters:
        raise ValueError("jlora.multi.stack: no adapters given; expected {name: (lora, config)}; fix: "
                         "jlora.multi.stack(frozen, {'sql': (lora_sql, config_sql)})")
    names = tuple(adapters)
    described = {n: _scaled_factors(frozen, lora, cfg) for n, (lora, cfg) in adapters.items()}
    kernels = sorted({p for info, _ in described.values() for p in info})
    whole = sorted({p for _, flat in described.values() for p in flat
                    if not p.endswith(("/A", "/B")) or p.rsplit("/", 1)[0] not in kernels})
    base = paths.flatten(frozen)
    ranks: dict[str, int] = {}
    groups: dict[str, Any] = {}
    for p in kernels:
        fs = [info[p] for info, _ in described.values() if p in info]
        ranks[p] = max(f.rank for f in fs)
        groups[p] = fs[0].groups
        if any(f.groups != fs[0].groups or f.layout != fs[0].layout for f in fs):
            seen = {n: (info[p].layout.describe(), info[p].groups) for n, (info, _) in described.items() if p in info}
            raise ValueError(
                f"jlora.multi.stack: adapters disagree on the layout of {p!r} (adapter: (axis roles, fused groups)): "
                f"{seen}; fix: make every adapter with jlora.init on this frozen tree and the same layout/fused "
                "rules for this path, or serve them from separate stacks"
            )
    out: dict[str, Any] = {}
    for p in kernels:
        ref = next(info[p] for info, _ in described.values() if p in info)
        a_axis = ref.n_stack + ref.n_in
        b_axis = ref.n_stack + (1 if ref.groups else 0)
        parts_a, parts_b = [], []
        for n in names:
            info, flat = described[n]
            if p in info:
                a, b = flat[p + "/A"], flat[p + "/B"]
                if ref.groups is not None:  # fused: A's last axis is (enabled * r)
                    e = sum(ref.groups)
                    a = a.reshape(a.shape[:-1] + (e, info[p].rank))
                    a = _pad_rank(a, a.ndim - 1, ranks[p]).reshape(a.shape[:-2] + (e * ranks[p],))
                else:
                    a = _pad_rank(a, a_axis, ranks[p])
                b = _pad_rank(b, b_axis, ranks[p])
            else:
                like = next(flat for info, flat in described.values() if p in info)
                a = jnp.zeros(like[p + "/A"].shape[:-1] + (like[p + "/A"].shape[-1] // ref.rank * ranks[p],), like[p + "/A"].dtype)
                shape_b = list(like[p + "/B"].shape)
                shape_b[b_axis] = ranks[p]
                b = jnp.zeros(shape_b, like[p + "/B"].dtype)
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
    return Stack(nest(out, layouts), _unit_config(ranks, whole, groups, layouts), names)


def select(s: Stack, index: jax.Array | int) -> Any:
    """The lora tree of adapter ``index`` (an int or a traced int: no retrace), for ``s.config``.

    ``index`` must be in ``[0, s.base_id]``: nothing wraps or clamps. An out-of-range int raises a
    ValueError; a traced one fails when the computation runs (see :func:`mixed_apply`).

    >>> frozen = {"w": jnp.zeros((2, 2))}
    >>> s = stack(frozen, {"a": ({"w": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2))}}, LoraConfig(rank=1, alpha=1, targets="w"))})
    >>> select(s, 0)["w"]["B"].tolist(), select(s, s.base_id)["w"]["B"].tolist()
    ([[1.0, 1.0]], [[0.0, 0.0]])
    """
    n = len(s.names) + 1
    checks.adapter_ids("jlora.multi.select", "index", index, n)
    return jax.tree.map(lambda x: x[index], s.lora)


def mixed_apply(apply_fn: Callable[..., Any], s_config: LoraConfig, mode: str = "lazy", *,
                strict: bool = False) -> Callable[..., Any]:
    """``fn(frozen, stacked_lora, adapter_ids, *args)``: each example of a batch runs its own adapter.

    ``args`` are batched along axis 0 and ``adapter_ids`` is an int array of shape ``(batch,)``
    (``Stack.base_id`` for the base model alone). The factors are gathered per example and the
    model runs once, vectorised with ``jax.vmap`` over the examples: every low-rank product is one
    batched contraction and the frozen kernels are shared. One compilation serves any mix.

    Ids must be in ``[0, n]`` (``n = Stack.base_id``): negative ids are not wrapped and large ones
    not clamped. Concrete ids out of range raise a ValueError at once. Traced ids (``fn`` under
    ``jax.jit``) are checked on the device's values by a ``jax.debug.callback`` that raises the same
    ValueError on the host: the call fails with a ``JaxRuntimeError`` carrying that message, never
    with a result from another adapter (the check costs one tiny host callback per call).

    >>> import jlora
    >>> frozen = {"w": jnp.eye(2)}
    >>> s = stack(frozen, {"a": ({"w": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2))}}, LoraConfig(rank=1, alpha=1, targets="w"))})
    >>> fn = mixed_apply(lambda p, x: x @ p["w"], s.config, mode="merged")
    >>> fn(frozen, s.lora, jnp.array([0, 1]), jnp.ones((2, 2))).tolist()
    [[3.0, 3.0], [1.0, 1.0]]
    """
    single = lora_apply(apply_fn, s_config, mode=mode, strict=strict)

    def fn(frozen: Any, stacked: Any, adapter_ids: jax.Array, *args: Any, **kwargs: Any) -> Any:
        ids = jnp.asarray(adapter_ids)
        if ids.ndim != 1:
            raise ValueError(f"mixed_apply: adapter_ids must have shape (batch,), got {ids.shape}; fix: one id per "
                             "example, e.g. jnp.array([stack.id('sql'), stack.base_id])")
        for keypath, a in jax.tree_util.tree_flatten_with_path(args)[0]:
            if a.shape[:1] != ids.shape:
                raise ValueError(
                    f"mixed_apply: argument args{jax.tree_util.keystr(keypath)} has batch {a.shape[:1]} but "
                    f"adapter_ids has shape {ids.shape}; fix: one adapter id per example (axis 0 of every argument)"
                )
        n = jax.tree.leaves(stacked)[0].shape[0] if jax.tree.leaves(stacked) else 1
        checks.adapter_ids("mixed_apply", "adapter_ids", ids, n)
        per_example = jax.tree.map(lambda x: x[ids], stacked)

        def one(lora: Any, *example: Any) -> Any:
            batched = jax.tree.map(lambda x: x[None], example)
            return jax.tree.map(lambda y: y[0], single(frozen, lora, *batched, **kwargs))

        return jax.vmap(one)(per_example, *args)

    return fn


# --- combination ----------------------------------------------------------------------------


def _flat2d(d: np.ndarray, f: Factored) -> np.ndarray:
    """A canonical delta as ``stack + (prod(in), prod(out))`` matrices."""
    return d.reshape(f.layout.stack_shape + (f.layout.fan_in, -1))


def combine(frozen: Any, adapters: Sequence[tuple[Any, LoraConfig]], weights: Sequence[float],
            method: str = "cat", rank: int | None = None) -> tuple[Any, LoraConfig, dict[str, float]]:
    """One adapter from several: ``delta = sum_i w_i * delta_i`` exactly (cat) or approximately.

    Methods:
      ``cat``: concatenates the ranks (rank = sum of ranks); exact, no cross terms.
      ``svd``: the best rank-``rank`` approximation of the weighted sum of deltas per kernel
        (Eckart-Young); the returned errors are the Frobenius norms of the discarded singular values.
      ``linear``: ``A = sum w_i s_i A_i``, ``B = sum B_i`` (same rank required): cheap but NOT the
        weighted sum: it adds the cross terms ``w_i s_i A_i B_j`` (PEFT's linear has the same
        approximation, PEFT issue #3004). The returned errors measure it (Frobenius, per kernel).

    Trained-whole leaves (a head) are averaged with the weights (normalised to sum 1).

    Returns ``(lora, config, errors)``; the config carries per-path ranks and alphas (scale folded
    into B, alpha = rank at every path), so it is exact whatever the adapters' patterns were.

    >>> import jlora
    >>> frozen = {"w": jnp.zeros((3, 3))}
    >>> a = ({"w": {"A": jnp.ones((3, 1)), "B": jnp.ones((1, 3))}}, LoraConfig(rank=1, alpha=1, targets="w"))
    >>> lora, cfg, err = combine(frozen, [a, a], [0.5, 0.25], "cat")
    >>> lora["w"]["A"].shape, float(jlora.delta(frozen, lora, cfg)["w"][0, 0])
    ((3, 2), 0.75)
    """
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"combine: expected one weight per adapter, got {len(adapters)} adapters, {len(weights)} weights; fix: "
                         "one float per (lora, config) pair")
    if method not in ("cat", "svd", "linear"):
        raise ValueError(f"combine: method must be 'cat', 'svd' or 'linear', got {method!r}; fix: 'cat' (exact)")
    if method == "svd" and (rank is None or rank <= 0):
        raise ValueError(f"combine(method='svd'): give the target rank, e.g. rank=8; got {rank!r}")
    described = [_scaled_factors(frozen, lora, cfg) for lora, cfg in adapters]
    kernels = sorted({p for info, _ in described for p in info})
    out: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    groups: dict[str, Any] = {}
    errors: dict[str, float] = {}
    for p in kernels:
        present = [(w, info[p], flat) for w, (info, flat) in zip(weights, described) if p in info]
        f0 = present[0][1]
        groups[p] = f0.groups
        if method == "cat" or (method == "linear" and f0.groups is not None):
            if f0.groups is not None and method == "linear":
                raise ValueError(f"combine(method='linear'): fused kernel {p!r} is not supported; use 'cat'")
            a_axis = -1
            b_axis = f0.n_stack + (1 if f0.groups else 0)
            if f0.groups is not None:
                e = sum(f0.groups)
                parts_a = [flat[p + "/A"].reshape(flat[p + "/A"].shape[:-1] + (e, f.rank)) for _, f, flat in present]
                a = jnp.concatenate(parts_a, axis=-1)
                a = a.reshape(a.shape[:-2] + (-1,))
            else:
                a = jnp.concatenate([flat[p + "/A"] for _, _, flat in present], axis=a_axis)
            b = jnp.concatenate([w * flat[p + "/B"] for w, _, flat in present], axis=b_axis)
            out[p + "/A"], out[p + "/B"] = a, b
            ranks[p] = sum(f.rank for _, f, _ in present)
            errors[p] = 0.0
        elif method == "linear":
            if len({f.rank for _, f, _ in present}) != 1:
                raise ValueError(f"combine(method='linear'): {p!r} has different ranks {[f.rank for _, f, _ in present]}; use 'cat' or 'svd'")
            a = sum(w * flat[p + "/A"] for w, _, flat in present)
            b = sum(flat[p + "/B"] for _, _, flat in present)
            out[p + "/A"], out[p + "/B"] = a, b
            ranks[p] = f0.rank
            exact = sum(w * _np_delta(flat[p + "/A"], flat[p + "/B"], f) for w, f, flat in present)
            got = _np_delta(a, b, f0)
            errors[p] = float(np.linalg.norm(exact - got))
        else:
            if f0.groups is not None:
                raise ValueError(f"combine(method='svd'): fused kernel {p!r} is not supported; use 'cat'")
            total = sum(w * _np_delta(flat[p + "/A"], flat[p + "/B"], f) for w, f, flat in present)
            m = _flat2d(total, f0)
            u, sv, vt = np.linalg.svd(m, full_matrices=False)
            k = min(rank, sv.shape[-1])
            root = np.sqrt(sv[..., :k])
            a = u[..., :, :k] * root[..., None, :]
            b = root[..., :, None] * vt[..., :k, :]
            dtype = present[0][2][p + "/A"].dtype
            lay = f0.layout
            out[p + "/A"] = jnp.asarray(a.reshape(lay.stack_shape + lay.in_shape + (k,)), dtype)
            out[p + "/B"] = jnp.asarray(b.reshape(lay.stack_shape + (k,) + lay.out_shape), dtype)
            ranks[p] = k
            errors[p] = float(np.sqrt(np.sum(sv[..., k:] ** 2)))
    whole = sorted({p for _, flat in described for p in flat if p.rsplit("/", 1)[0] not in kernels})
    for p in whole:
        vals = [(w, flat[p]) for w, (_, flat) in zip(weights, described) if p in flat]
        if len(vals) != len(adapters):
            raise ValueError(f"combine: trained-whole leaf {p!r} is not in every adapter; fix: train it in all or none")
        out[p] = sum(w * v for w, v in vals) / sum(w for w, _ in vals)
    layouts = {p: next(info[p] for info, _ in described if p in info).layout for p in kernels}
    return nest(out, layouts), _unit_config(ranks, whole, groups, layouts), errors


def _np_delta(a: Any, b: Any, f: Factored) -> np.ndarray:
    """``s·A⊗B`` in float64, canonical order."""
    g = dataclasses.replace(f, rank=a.shape[-1] if f.groups is None else f.rank)
    return np.asarray(canonical_delta(a, b, g), np.float64)
