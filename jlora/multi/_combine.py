"""Combination of adapters: one adapter from a weighted sum of several (cat, svd, linear)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora.core._config import LoraConfig
from jlora.core._describe import nest
from jlora.core._kinds import Factored, canonical_delta
from jlora.multi._stack import _scaled_factors, _unit_config, _whole

__all__ = ["combine"]


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
        raise ValueError(f"combine(method='svd'): needs a positive target rank, got {rank!r}; fix: e.g. rank=8")
    described = [_scaled_factors(frozen, lora, cfg) for lora, cfg in adapters]
    kernels = sorted({p for info, _ in described for p in info})
    out: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    for p in kernels:
        present = [(w, info[p], flat) for w, (info, flat) in zip(weights, described) if p in info]
        if present[0][1].fused is not None and method != "cat":
            raise ValueError(f"combine(method={method!r}): fused kernel {p!r} is not supported; fix: method='cat'")
        a, b, ranks[p], errors[p] = _METHODS[method](p, present, rank)
        out[p + "/A"], out[p + "/B"] = a, b
    whole = _whole(described)
    for p in whole:
        vals = [(w, flat[p]) for w, (_, flat) in zip(weights, described) if p in flat]
        if len(vals) != len(adapters):
            raise ValueError(f"combine: trained-whole leaf {p!r} is not in every adapter; fix: train it in all or none")
        out[p] = sum(w * v for w, v in vals) / sum(w for w, _ in vals)
    layouts = {p: next(info[p] for info, _ in described if p in info).layout for p in kernels}
    return nest(out, layouts), _unit_config(ranks, whole, layouts), errors


def _cat(p: str, present: Sequence[tuple[float, Factored, Mapping[str, Any]]], rank: int | None):
    """Ranks side by side (per enabled group of a fused kernel), B scaled by the weights: exact."""
    lay = present[0][1].layout
    e = lay.n_enabled
    parts_a = [flat[p + "/A"].reshape(flat[p + "/A"].shape[:-1] + (e, f.rank)) for _, f, flat in present]
    a = jnp.concatenate(parts_a, axis=-1)
    a = a.reshape(a.shape[:-2] + (-1,))
    b = jnp.concatenate([w * flat[p + "/B"] for w, _, flat in present], axis=lay.b_rank_axis)
    return a, b, sum(f.rank for _, f, _ in present), 0.0


def _linear(p: str, present: Sequence[tuple[float, Factored, Mapping[str, Any]]], rank: int | None):
    """``A = sum w_i A_i``, ``B = sum B_i`` and the Frobenius error of the cross terms."""
    if len({f.rank for _, f, _ in present}) != 1:
        raise ValueError(f"combine(method='linear'): {p!r} has different ranks {[f.rank for _, f, _ in present]}; "
                         "fix: method='cat' (exact) or 'svd'")
    a = sum(w * flat[p + "/A"] for w, _, flat in present)
    b = sum(flat[p + "/B"] for _, _, flat in present)
    f0 = present[0][1]
    exact = sum(w * _np_delta(flat[p + "/A"], flat[p + "/B"], f) for w, f, flat in present)
    return a, b, f0.rank, float(np.linalg.norm(exact - _np_delta(a, b, f0)))


def _svd(p: str, present: Sequence[tuple[float, Factored, Mapping[str, Any]]], rank: int | None):
    """The best rank-``rank`` approximation of the weighted sum and the norm of what it drops."""
    f0 = present[0][1]
    total = sum(w * _np_delta(flat[p + "/A"], flat[p + "/B"], f) for w, f, flat in present)
    u, sv, vt = np.linalg.svd(_flat2d(total, f0), full_matrices=False)
    k = min(rank, sv.shape[-1])
    root = np.sqrt(sv[..., :k])
    a = u[..., :, :k] * root[..., None, :]
    b = root[..., :, None] * vt[..., :k, :]
    dtype = present[0][2][p + "/A"].dtype
    lay = f0.layout
    a = jnp.asarray(a.reshape(lay.stack_shape + lay.in_shape + (k,)), dtype)
    b = jnp.asarray(b.reshape(lay.stack_shape + (k,) + lay.out_shape), dtype)
    return a, b, k, float(np.sqrt(np.sum(sv[..., k:] ** 2)))


_METHODS = {"cat": _cat, "linear": _linear, "svd": _svd}


def _np_delta(a: Any, b: Any, f: Factored) -> np.ndarray:
    """``s·A⊗B`` in float64, canonical order."""
    g = dataclasses.replace(f, rank=a.shape[-1] if f.fused is None else f.rank)
    return np.asarray(canonical_delta(a, b, g), np.float64)
