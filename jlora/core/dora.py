"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024; PEFT ``use_dora=True``).

With ``LoraConfig(use_dora=True)`` every adapted kernel ``W0`` (shape ``stack + in + out``) also
trains a magnitude ``m`` (shape ``stack + out``: one per output unit), stored as ``'m'`` beside
``'A'`` and ``'B'`` at the kernel's path in the lora tree. The model runs with

    W' = m * V / ||V||_in,     V = W0 + s * A ⊗ B,

where ``||V||_in`` is the L2 norm over the kernel's input axes (dense: over ``in``; conv: over
``(k..., cin)``; embedding table: over the vocabulary, as PEFT does), treated as a constant
(``stop_gradient``) exactly as PEFT (and the paper's section 4.3) do. At init ``B = 0`` and
``m = ||W0||_in``, so ``W' = W0``.

Unmerge: ``W'`` keeps only the direction of ``V``, so ``W0`` cannot be recovered from ``W'``,
``A``, ``B`` and ``m`` alone; PEFT keeps ``||V||`` in a cache at merge time. jlora is pure, so
:func:`norms` computes them (before merging, or from the frozen tree) and :func:`unmerge` takes
them; :func:`jlora.unmerge` refuses DoRA kernels and points here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core import _checks as checks
from jlora.core import paths
from jlora.core._config import LoraConfig
from jlora.core._describe import adapted
from jlora.core._extras import scatter_rows
from jlora.core._kinds import Factored, factors_delta

_HI = jax.lax.Precision.HIGHEST


def _check_plain(f: Factored, what: str) -> None:
    checks.factored(what, f)
    if f.fused is not None:
        raise ValueError(
            f"{what}: DoRA on the fused kernel {f.path!r} (LoraConfig.fused) is not supported: its magnitude "
            "would also rescale the groups LoRA leaves untouched. Fix: split the fused kernel into one kernel per "
            "projection, or leave it out of use_dora (exclude it, or drop the fused rule)"
        )


def _in_axes(f: Factored) -> tuple[int, ...]:
    """The input axes in the canonical order ``stack + in + out``."""
    checks.factored("jlora.dora", f)
    return tuple(range(f.n_stack, f.n_stack + f.n_in))


def _expand(v: jax.Array, f: Factored) -> jax.Array:
    """``stack + out`` (canonical) -> an array of the kernel's stored shape, constant along the inputs."""
    checks.factored("jlora.dora", f)
    lay = f.layout
    c = v.reshape(lay.stack_shape + (1,) * f.n_in + lay.out_shape)
    return lay.from_canonical(jnp.broadcast_to(c, lay.canonical_shape))


def magnitude_shape(f: Factored) -> tuple[int, ...]:
    """The shape of DoRA's magnitude ``m`` for a kernel: ``stack + out`` (canonical order).

    >>> from jlora.layout import Layout
    >>> magnitude_shape(Factored("conv/kernel", Layout((3, 3, 16, 32), "iiio", kind="conv"), 4, 1.0))
    (32,)
    """
    checks.factored("jlora.dora.magnitude_shape", f)
    return f.layout.stack_shape + f.layout.out_shape


def column_norm(v: jax.Array, f: Factored) -> jax.Array:
    """The L2 norm of a kernel-shaped (stored order) array over its input axes, in float32
    (shape ``stack + out``, canonical order).

    >>> from jlora.layout import Layout
    >>> f = Factored("d/kernel", Layout((2, 2), "io"), 1, 1.0)
    >>> column_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]), f).tolist()
    [5.0, 1.0]
    """
    checks.factored("jlora.dora.column_norm", f)
    v = f.layout.to_canonical(v.astype(jnp.float32))
    return jnp.sqrt(jnp.sum(v * v, axis=_in_axes(f)))


def magnitude(w0: jax.Array, A: jax.Array, B: jax.Array, f: Factored) -> jax.Array:
    """DoRA's initial magnitude ``m = ||W0 + s A ⊗ B||_in`` (float32; ``||W0||_in`` when B = 0).

    >>> from jlora.layout import Layout
    >>> f = Factored("d/kernel", Layout((2, 2), "io"), 1, 1.0)
    >>> magnitude(jnp.array([[3.0, 0.0], [4.0, 1.0]]), jnp.zeros((2, 1)), jnp.zeros((1, 2)), f).tolist()
    [5.0, 1.0]
    """
    _check_plain(f, "jlora.dora.magnitude")
    checks.factored("jlora.dora.magnitude", f, w0=w0)
    return column_norm(w0.astype(jnp.float32) + factors_delta(A, B, f), f)


def _safe(norm: jax.Array) -> jax.Array:
    # an all-zero column has m = 0 at init; keep it at zero instead of 0/0
    return jnp.where(norm == 0, 1.0, norm)


def dora_kernel(w0: jax.Array, delta: jax.Array, m: jax.Array, f: Factored) -> jax.Array:
    """The merged DoRA kernel ``m * V / stop_gradient(||V||_in)``, ``V = W0 + delta``, in W0's dtype.

    ``delta`` is ``s * A ⊗ B`` (from :func:`jlora.core._kinds.factors_delta`). The norm is detached, as in
    PEFT, so gradients through this kernel (merged-mode training) match PEFT's.

    >>> from jlora.layout import Layout
    >>> f = Factored("d/kernel", Layout((2, 2), "io"), 1, 1.0)
    >>> w0 = jnp.array([[3.0, 0.0], [4.0, 2.0]])
    >>> dora_kernel(w0, jnp.zeros((2, 2)), jnp.array([10.0, 1.0]), f).tolist()
    [[6.0, 0.0], [8.0, 1.0]]
    """
    _check_plain(f, "jlora.dora.dora_kernel")
    v = w0.astype(jnp.float32) + delta.astype(jnp.float32)
    norm = jax.lax.stop_gradient(_safe(column_norm(v, f)))
    factor = m.astype(jnp.float32) / norm
    return (v * _expand(factor, f)).astype(w0.dtype)


def kernel_sq_norm(w0: jax.Array, f: Factored) -> jax.Array:
    """``||W0||_in²`` per output unit (float32, no gradient): the constant part of DoRA's norm.

    Compute it once per step (or once per run: W0 is frozen) and pass it to :func:`dora_lazy_terms`.

    >>> from jlora.layout import Layout
    >>> f = Factored("d/kernel", Layout((2, 2), "io"), 1, 1.0)
    >>> kernel_sq_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]), f).tolist()
    [25.0, 1.0]
    """
    checks.factored("jlora.dora.kernel_sq_norm", f)
    w = f.layout.to_canonical(jax.lax.stop_gradient(w0).astype(jnp.float32))
    return jnp.sum(w * w, axis=_in_axes(f))


def dora_lazy_terms(w0: jax.Array, A: jax.Array, B: jax.Array, m: jax.Array, f: Factored, *,
                    w0_sq: jax.Array | None = None) -> jax.Array:
    """The per-output factor of lazy DoRA: ``y = factor ⊙ (x·W0 + s·(x·A)·B)`` (then add any bias).

    ``factor = m / stop_gradient(||W0 + s·A⊗B||_in)`` with shape ``stack + out`` (float32). The squared
    norm of each output column ``o`` is computed with low-rank identities, so no ``(in, out)`` product
    ``A⊗B`` is formed::

        ||V_o||² = ||W0_o||² + 2s·Σ_r (W0ᵀA)[o, r]·B[r, o] + s²·Σ_{r,r'} B[r, o]·(AᵀA)[r, r']·B[r', o]

    (``W0ᵀA`` is ``stack + out + (r,)``, ``AᵀA`` is ``stack + (r, r)``.) ``x`` is every use of the
    kernel: a matmul/einsum contracting ``in``, a conv (factor per output channel) or an embedding
    lookup (factor per embedding feature); the factor multiplies the output axes of that use.

    Args:
      w0: the frozen kernel (stored order; read through ``f.layout``).
      A: ``stack + in + (r,)``.
      B: ``stack + (r,) + out``.
      m: the magnitude, ``stack + out``.
      f: the kernel's :class:`jlora.Factored` (from :func:`jlora.adapted`).
      w0_sq: ``||W0||_in²`` from :func:`kernel_sq_norm`, if already computed.

    Returns:
      ``factor``, float32, ``stack + out``; gradients reach ``m`` only (the norm is detached).

    >>> from jlora.layout import Layout
    >>> f = Factored("d/kernel", Layout((2, 2), "io"), 1, 1.0)
    >>> w0 = jnp.array([[3.0, 0.0], [4.0, 2.0]])
    >>> dora_lazy_terms(w0, jnp.zeros((2, 1)), jnp.zeros((1, 2)), jnp.array([10.0, 1.0]), f).tolist()
    [2.0, 0.5]
    """
    _check_plain(f, "jlora.dora.dora_lazy_terms")
    lay = f.layout
    stack, n_in, out = lay.stack_shape, lay.fan_in, lay.out_shape
    r = A.shape[-1]
    w = lay.to_canonical(jax.lax.stop_gradient(w0).astype(jnp.float32)).reshape(stack + (n_in, -1))
    a = jax.lax.stop_gradient(A).astype(jnp.float32).reshape(stack + (n_in, r))
    b = jax.lax.stop_gradient(B).astype(jnp.float32).reshape(stack + (r, -1))
    if w0_sq is None:
        base = jnp.sum(w * w, axis=-2)
    else:
        base = jax.lax.stop_gradient(w0_sq).astype(jnp.float32).reshape(stack + (-1,))
    wta = jnp.einsum("...io,...ir->...or", w, a, precision=_HI)  # stack + (out, r)
    ata = jnp.einsum("...ir,...iq->...rq", a, a, precision=_HI)  # stack + (r, r)
    cross = jnp.einsum("...or,...ro->...o", wta, b, precision=_HI)
    quad = jnp.einsum("...ro,...rq,...qo->...o", b, ata, b, precision=_HI)
    s = f.scale
    sq = jnp.maximum(base + 2.0 * s * cross + (s * s) * quad, 0.0)
    norm = jax.lax.stop_gradient(_safe(jnp.sqrt(sq))).reshape(stack + out)
    return m.astype(jnp.float32) / norm


def _dora_kernels(frozen: Any, lora: Any, config: LoraConfig) -> tuple[dict[str, Factored], dict[str, Any]]:
    info = adapted(frozen, lora, config)
    flat = paths.flatten(lora)
    return {p: f for p, f in info.items() if f.dora}, flat


def norms(frozen: Any, lora: Any, config: LoraConfig) -> dict[str, jax.Array]:
    """``||W0 + s·A⊗B||_in`` per DoRA kernel (float32, ``stack + out``): what :func:`unmerge` needs.

    Compute it from the frozen tree with the same lora tree that is merged (PEFT caches the same
    values at merge time).

    >>> frozen = {"d": {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]])}}
    >>> lora = {"d": {"kernel": {"A": jnp.ones((2, 1)), "B": jnp.zeros((1, 2)), "m": jnp.ones(2)}}}
    >>> norms(frozen, lora, LoraConfig(rank=1, targets=".*", use_dora=True))["d/kernel"].tolist()
    [5.0, 1.0]
    """
    info, flat = _dora_kernels(frozen, lora, config)
    base = paths.flatten(frozen)
    out = {}
    for p, f in info.items():
        rows = flat.get(p + "/rows")
        w0 = base[p]
        if rows is not None:
            w0 = scatter_rows(w0, rows, config.rows_for(p), p)
        out[p] = column_norm(w0.astype(jnp.float32) + factors_delta(flat[p + "/A"], flat[p + "/B"], f), f)
    return out


def unmerge(params: Any, lora: Any, config: LoraConfig, norms: Mapping[str, jax.Array]) -> Any:
    """Inverts :func:`jlora.merge` for a DoRA adapter: ``W0 = W' * ||V||_in / m - s·A⊗B``.

    Plain LoRA kernels in the same tree are unmerged as :func:`jlora.unmerge` does; trained-whole
    leaves and trained rows stay as they are in ``params`` (their originals are not in ``lora``).

    Args:
      params: merged parameters (from :func:`jlora.merge`).
      lora: the lora tree that was merged.
      config: its config.
      norms: ``{path: ||V||_in}`` from :func:`norms` (computed before merging).

    >>> cfg = LoraConfig(rank=1, targets=".*", use_dora=True)
    >>> frozen = {"d": {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]])}}
    >>> lora = {"d": {"kernel": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2)), "m": jnp.ones(2)}}}
    >>> import jlora
    >>> merged = jlora.merge(frozen, lora, cfg)
    >>> unmerge(merged, lora, cfg, norms(frozen, lora, cfg))["d"]["kernel"].round(5).tolist()
    [[3.0, 0.0], [4.0, 1.0]]
    """
    info = adapted(params, lora, config)
    flat = paths.flatten(lora)
    for p in info:
        if info[p].dora and p not in norms:
            raise ValueError(
                f"jlora.dora.unmerge: no norm for the DoRA kernel {p!r} in `norms` (got paths {sorted(norms)}); "
                "fix: pass norms=jlora.dora.norms(frozen, lora, config), computed before merging"
            )

    def one(path: str, w: Any) -> Any:
        f = info.get(path)
        if f is None:
            return w
        d = factors_delta(flat[path + "/A"], flat[path + "/B"], f)
        if not f.dora:
            return (w.astype(jnp.float32) - d).astype(w.dtype)
        norm = jnp.asarray(norms[path], jnp.float32)
        want = magnitude_shape(f)
        if tuple(norm.shape) != want:
            raise ValueError(
                f"jlora.dora.unmerge: norms[{path!r}] has shape {tuple(norm.shape)}, expected {want} "
                "(stack + out); fix: pass the output of jlora.dora.norms for this lora tree"
            )
        factor = _safe(norm) / flat[path + "/m"].astype(jnp.float32)
        return (w.astype(jnp.float32) * _expand(factor, f) - d).astype(w.dtype)

    return paths.map_with_path(one, params)
