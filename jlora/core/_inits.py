"""Base-changing inits (PiSSA, OLoRA) and their conversion back to a plain adapter.

``LoraConfig(init="pissa")`` (Meng et al., 2024; PEFT ``init_lora_weights="pissa"``) starts A and
B from the top-r singular triplets of each kernel and trains them on the residual base;
``"pissa_niter_K"`` uses a randomized SVD with K subspace iterations (PEFT's ``svd_lowrank``);
``"olora"`` (Büyükakyüz, 2024) starts them from a QR decomposition. In each case
:func:`jlora.init` returns a *modified* ``frozen`` tree, ``W_res = W0 - s·A0⊗B0``, so the output
is unchanged at init.

Every kernel is treated as the matrix ``(prod(in), prod(out))`` per stack entry (the same rule as
the factors: a conv kernel ``(k..., cin, cout)`` is ``(k·…·cin, cout)``). jlora's A is PEFT's
``lora_A.weight.T`` and B is ``lora_B.weight.T``, so the factors equal PEFT's up to the signs of
the singular vectors, and the residual base equals PEFT's.

An adapter trained on a residual base applies only to that base. :func:`to_plain_adapter`
rewrites it as a rank-2r adapter of the original base (PEFT's ``path_initial_model_for_weight_conversion``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core import paths
from jlora.core._config import LoraConfig
from jlora.core._describe import adapted, nest
from jlora.core.layout import Layout

_NITER = re.compile(r"pissa_niter_(\d+)")
_HI = jax.lax.Precision.HIGHEST


def changes_base(init: str) -> bool:
    """True for the inits that move part of W0 into the factors (and return a residual ``frozen``).

    >>> changes_base("pissa"), changes_base("pissa_niter_4"), changes_base("olora"), changes_base("kaiming")
    (True, True, True, False)
    """
    return init in ("pissa", "olora") or _NITER.fullmatch(init) is not None


def _qr(x: jax.Array) -> jax.Array:
    return jnp.linalg.qr(x)[0]


def _svd_lowrank(key: jax.Array, w: jax.Array, rank: int, niter: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Randomized truncated SVD (Halko et al.; ``torch.svd_lowrank`` with ``q = rank``), batched."""
    t = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731
    omega = jax.random.normal(key, w.shape[:-1][:-1] + (w.shape[-1], rank), jnp.float32)
    q = _qr(jnp.matmul(w, omega, precision=_HI))
    for _ in range(niter):
        q = _qr(jnp.matmul(t(w), q, precision=_HI))
        q = _qr(jnp.matmul(w, q, precision=_HI))
    u, s, vh = jnp.linalg.svd(jnp.matmul(t(q), w, precision=_HI), full_matrices=False)
    return jnp.matmul(q, u, precision=_HI), s, vh


def _matrix(w: Any, layout: Layout) -> tuple[jax.Array, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The kernel as ``stack + (prod(in), prod(out))`` float32 matrices, and the three shapes."""
    stack, ins, outs = layout.stack_shape, layout.in_shape, layout.out_shape
    c = layout.to_canonical(jnp.asarray(w, jnp.float32))
    return c.reshape(stack + (math.prod(ins), math.prod(outs))), stack, ins, outs


def init_from_kernel(key: jax.Array, w0: jax.Array, layout: Layout, rank: int, scale: float, init: str,
                     dtype: Any, *, path: str = "kernel") -> tuple[jax.Array, jax.Array, jax.Array]:
    """A, B and the residual kernel for a base-changing init, with ``W_res + s·A⊗B = W0``.

    PiSSA (``W0 = U S Vᵀ`` as an ``(in, out)`` matrix): ``A = U_r·sqrt(S_r/s)``,
    ``B = sqrt(S_r/s)·V_rᵀ``, so ``s·A⊗B`` is W0's top-r part (PEFT divides S by the scale).
    OLoRA (``W0ᵀ = Q R``, as PEFT on ``(out, in)`` weights): ``A = R_rᵀ``, ``B = Q_rᵀ``.

    Args:
      key: PRNG key (used by ``pissa_niter_K`` only).
      w0: the kernel, ``stack + in + out`` (values needed: not a ShapeDtypeStruct).
      layout: its :class:`jlora.layout.Layout`.
      rank: r. scale: s. init: ``'pissa'``, ``'pissa_niter_K'`` or ``'olora'``.
      dtype: the factors' dtype. path: for errors. A fused ``layout`` (``layout.fused``) raises.

    Returns:
      ``(A, B, W_res)``: A ``stack + in + (r,)``, B ``stack + (r,) + out`` in ``dtype``; ``W_res`` in
      W0's dtype, computed in float32 from the cast factors.

    >>> w = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
    >>> A, B, res = init_from_kernel(jax.random.key(0), w, Layout((3, 3), "io"), 1, 1.0, "pissa", jnp.float32)
    >>> res.round(5).tolist()
    [[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]
    """
    if layout.fused is not None:
        raise ValueError(
            f"LoraConfig.init={init!r}: kernel {path!r} is fused (LoraConfig.fused); {init} factors the whole "
            "kernel, not one group. Fix: use init='kaiming' or 'gaussian' for fused kernels, or drop the fused rule"
        )
    if not changes_base(init):
        raise ValueError(f"init_from_kernel: {init!r} does not change the base; expected 'pissa', 'pissa_niter_K' "
                         "or 'olora'")
    if isinstance(w0, jax.ShapeDtypeStruct):
        raise ValueError(
            f"LoraConfig.init={init!r} needs the values of kernel {path!r}, got a jax.ShapeDtypeStruct; fix: pass "
            "arrays (under jax.eval_shape, pass the arrays and let eval_shape abstract them)"
        )
    if not jnp.issubdtype(w0.dtype, jnp.floating):
        raise TypeError(f"LoraConfig.init={init!r}: kernel {path!r} has dtype {w0.dtype}, expected a float dtype")
    w, stack, ins, outs = _matrix(w0, layout)
    t = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731
    if init == "olora":
        q, r_ = jnp.linalg.qr(t(w))  # (out, k), (k, in)
        a = t(r_[..., :rank, :])
        b = t(q[..., :, :rank])
    else:
        m = _NITER.fullmatch(init)
        if m is None:
            u, s, vh = jnp.linalg.svd(w, full_matrices=False)
        else:
            u, s, vh = _svd_lowrank(key, w, rank, int(m.group(1)))
        root = jnp.sqrt(s[..., :rank] / scale)
        a = u[..., :, :rank] * root[..., None, :]
        b = root[..., :, None] * vh[..., :rank, :]
    a, b = a.astype(dtype), b.astype(dtype)
    low = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=_HI)
    residual = layout.from_canonical((w - scale * low).reshape(layout.canonical_shape)).astype(w0.dtype)
    return a.reshape(stack + ins + (rank,)), b.reshape(stack + (rank,) + outs), residual


def _scaled(value: float, rslora: bool) -> float:
    return value * (math.sqrt(2.0) if rslora else 2.0)


def to_plain_adapter(original_frozen: Any, frozen_residual: Any, lora: Any, config: LoraConfig
                     ) -> tuple[dict[str, Any], LoraConfig]:
    """Rewrites an adapter trained on a residual base (PiSSA/OLoRA) as a plain adapter of the original base.

    With ``s·A0⊗B0 = W0 - W_res`` (the init's part, recovered per kernel by a rank-r SVD of the
    difference) and the trained ``A, B``: ``W_res + s·A⊗B = W0 + s·(A⊗B - A0⊗B0)
    = W0 + s·[A | A0] ⊗ [B ; -B0]`` (PEFT's ``subtract_mutated_init``). The result has rank 2r and
    alpha doubled (``sqrt(2)`` times with rslora) so the scale is unchanged; rank and alpha patterns are
    doubled alike, and the init becomes ``'kaiming'``. Trained-whole leaves and rows pass through.

    Args:
      original_frozen: the base before init (``params``).
      frozen_residual: the ``frozen`` tree :func:`jlora.init` returned.
      lora: the trained lora tree.
      config: its config.

    Returns:
      ``(lora, config)`` with ``merge(original_frozen, lora, config) == merge(frozen_residual, trained, ...)``
      up to float rounding.

    >>> import jlora
    >>> w = {"d": {"kernel": jnp.diag(jnp.array([3.0, 2.0, 1.0]))}}
    >>> cfg = jlora.LoraConfig(rank=1, alpha=1, targets=".*", init="pissa")
    >>> res, lora = jlora.init(jax.random.key(0), w, cfg)
    >>> plain, cfg2 = to_plain_adapter(w, res, lora, cfg)
    >>> plain["d"]["kernel"]["A"].shape, cfg2.rank, cfg2.alpha, cfg2.init
    ((3, 2), 2, 2.0, 'kaiming')
    """
    if config.init == "loftq":
        raise ValueError(
            "to_plain_adapter: a LoftQ adapter (init='loftq') trains on the quantized base Q; W0 - Q is the full-rank "
            "quantization error, so no low-rank adapter of the original base equals it. Fix: keep the quantized "
            "base, or merge: jlora.merge(frozen, lora, config, into='float')"
        )
    if config.use_dora:
        raise ValueError(
            "to_plain_adapter: a DoRA adapter is not linear in its factors (W' = m·V/||V||), so it has no plain "
            "low-rank form on the original base; fix: merge it with jlora.merge(frozen_residual, lora, config)"
        )
    info = adapted(frozen_residual, lora, config)
    orig = paths.flatten(original_frozen)
    res = paths.flatten(frozen_residual)
    flat = paths.flatten(lora)
    out = dict(flat)
    for p, f in info.items():
        if f.fused is not None:
            raise ValueError(f"to_plain_adapter: kernel {p!r} is fused (LoraConfig.fused), which is not supported; "
                             "fix: merge the adapter (jlora.merge(frozen_residual, lora, config)), or init it with "
                             "init='kaiming' for a portable adapter")
        if p not in orig or tuple(orig[p].shape) != tuple(res[p].shape):
            got = tuple(orig[p].shape) if p in orig else "missing"
            raise ValueError(
                f"to_plain_adapter: original_frozen[{p!r}] is {got}, expected shape {tuple(res[p].shape)} (the "
                "residual's); fix: pass the params given to jlora.init as original_frozen"
            )
        diff, stack, ins, outs = _matrix(orig[p], f.layout)
        diff = diff - _matrix(res[p], f.layout)[0]
        u, s, vh = jnp.linalg.svd(diff, full_matrices=False)
        root = jnp.sqrt(s[..., : f.rank] / f.scale)
        a0 = (u[..., :, : f.rank] * root[..., None, :]).reshape(stack + ins + (f.rank,))
        b0 = (root[..., :, None] * vh[..., : f.rank, :]).reshape(stack + (f.rank,) + outs)
        a, b = flat[p + "/A"], flat[p + "/B"]
        out[p + "/A"] = jnp.concatenate([a, a0.astype(a.dtype)], axis=-1)
        out[p + "/B"] = jnp.concatenate([b, -b0.astype(b.dtype)], axis=f.n_stack)
    new = config.replace(
        rank=2 * config.rank,
        alpha=_scaled(config.alpha, config.rslora),
        rank_pattern=tuple((k, 2 * v) for k, v in config.rank_pattern),
        alpha_pattern=tuple((k, _scaled(v, config.rslora)) for k, v in config.alpha_pattern),
        init="kaiming",
    )
    return nest(out, {p: f.layout for p, f in info.items()}), new
