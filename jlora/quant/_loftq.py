"""LoftQ (Li et al., 2023; PEFT ``init_lora_weights="loftq"``): a quantized base and factors that fit it.

``LoraConfig(init="loftq", loftq_bits=4 or 8, loftq_iter=T)``. Plain QLoRA starts training from the
quantized kernel ``Q = quantize(W)`` with ``B = 0``: the model starts with W's whole quantization
error. LoftQ alternates, for each adapted kernel W::

    target = W
    T times:
        Q      = quantize(target)                       # NF4 (4 bits) or int8 (8 bits), the stored kernel
        s·A⊗B  = the best rank-r approximation of W - Q   # truncated SVD
        target = W - s·A⊗B

and :func:`jlora.init` returns ``frozen`` with ``Q`` (a :class:`~jlora.QuantizedArray`) at the
kernel's path and ``lora`` with ``A, B``, so the model starts at ``Q + s·A⊗B ≈ W``. The kernel is
seen as ``(prod(in), prod(out))`` matrices per stack entry (the factors' view, any layout), the
factors split the singular values as PiSSA does (``A = U_r·sqrt(S_r/s)``, ``B = sqrt(S_r/s)·V_rᵀ``).

Against PEFT 0.21 (``peft.utils.loftq_utils.loftq_init``), which runs on CUDA/XPU only:

- **scale**: PEFT's factors multiply to the residual (``lora_B @ lora_A ≈ W - Q``) while its forward
  adds ``s·lora_B @ lora_A``, so PEFT starts at ``Q + s·(W - Q)_r``: close to W only when
  ``s = alpha / r = 1``. jlora divides by ``s`` so that ``Q + s·A⊗B ≈ W`` for every alpha; at
  ``s = 1`` its A, B are PEFT's ``lora_A.weight.T``, ``lora_B.weight.T`` up to the sign of each
  singular pair, and for any s, ``s·A⊗B`` is PEFT's ``(lora_B @ lora_A).T``.
- **quantizer**: PEFT quantizes the ``(out, in)`` torch weight with bitsandbytes: NF4 in blocks of 64
  consecutive values of the row-major weight, no double quantization; int8 with one absmax per
  output row. jlora quantizes the stored kernel with :func:`jlora.quantize`: NF4 blocks of 64
  consecutive values in the kernel's own memory order (bit-identical to bitsandbytes on that order:
  a PyTorch-style ``(out, in)`` kernel gets PEFT's blocks, a Flax ``(in, out)`` kernel blocks along
  its output axis), int8 one absmax per output unit as bitsandbytes (codes ``round(w / (absmax/127))``
  where bitsandbytes rounds ``w * (127/absmax)``: a code may differ by one at an exact half).
- **base**: PEFT writes the dequantized Q back as a float weight (quantized again when loaded);
  jlora's ``frozen`` holds the :class:`~jlora.QuantizedArray` itself (no float copy, per-use
  dequantization in :func:`jlora.lora_apply`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import _inits as inits
from jlora.core.layout import Layout
from jlora.quant import _quant as quant

__all__ = ["SCHEMES", "loftq_kernel", "loftq_steps", "reconstruction_error"]

#: The quantization scheme of each ``loftq_bits``.
SCHEMES = {4: "nf4", 8: "int8"}
_HI = jax.lax.Precision.HIGHEST


def _quantize(w: jax.Array, layout: Layout, scheme: str, dtype: Any) -> quant.QuantizedArray:
    q = quant.quantize({"w": w}, "w", scheme=scheme, layouts={"w": layout})["w"]
    return dataclasses.replace(q, dtype=np.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _top(residual: jax.Array, rank: int, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """PiSSA's split of the top-r singular triplets of ``residual`` (stack + (in, out)) over ``s`` (jitted:
    an eager SVD dispatches several times slower on the CPU)."""
    u, s, vh = jnp.linalg.svd(residual, full_matrices=False)
    root = jnp.sqrt(s[..., :rank] / scale)
    return u[..., :, :rank] * root[..., None, :], root[..., :, None] * vh[..., :rank, :]


def _check(w0: Any, path: str, groups: tuple[bool, ...] | None) -> None:
    if groups is not None:
        raise ValueError(
            f"LoraConfig.init='loftq': kernel {path!r} is fused (LoraConfig.fused); LoftQ fits the whole kernel, "
            "not one group. Fix: init='kaiming' for fused kernels (and jlora.quantize the base), or drop the fused rule"
        )
    if isinstance(w0, jax.ShapeDtypeStruct):
        raise ValueError(
            f"LoraConfig.init='loftq' needs the values of kernel {path!r}, got a jax.ShapeDtypeStruct; fix: pass "
            "arrays (under jax.eval_shape, pass the arrays and let eval_shape abstract them)"
        )
    if quant.is_quantized(w0):
        raise ValueError(
            f"LoraConfig.init='loftq': kernel {path!r} is already quantized ({w0!r}); LoftQ quantizes the float "
            "kernel itself. Fix: pass the float params (LoftQ returns the quantized base)"
        )
    if not jnp.issubdtype(w0.dtype, jnp.floating):
        raise TypeError(f"LoraConfig.init='loftq': kernel {path!r} has dtype {w0.dtype}, expected a float dtype")


def loftq_steps(w0: jax.Array, layout: Layout, rank: int, scale: float, bits: int, iters: int, *,
                path: str = "kernel", groups: tuple[bool, ...] | None = None
                ) -> Iterator[tuple[jax.Array, jax.Array, quant.QuantizedArray]]:
    """LoftQ's alternation, one ``(A, B, Q)`` per step (float32 factors): step t is what ``loftq_iter=t`` gives.

    Args: as :func:`loftq_kernel` (no dtype).

    >>> w = jax.random.normal(jax.random.key(0), (64, 64))
    >>> lay = Layout((64, 64), "io")
    >>> errs = [float(reconstruction_error(w, Q, A, B, 2.0, lay)) for A, B, Q in loftq_steps(w, lay, 8, 2.0, 4, 3)]
    >>> len(errs), errs[-1] < errs[0] < float(reconstruction_error(w, quant.quantize({"w": w}, "w")["w"]))
    (3, True)
    """
    _check(w0, path, groups)
    if bits not in SCHEMES or isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"loftq_kernel: bits must be 4 or 8 and iters an int >= 1, got bits={bits!r}, "
                         f"iters={iters!r}; fix: LoraConfig(init='loftq', loftq_bits=4, loftq_iter=1)")
    w = jnp.asarray(w0, jnp.float32)
    stack, ins, outs = layout.stack_shape, layout.in_shape, layout.out_shape
    matrix = inits._matrix(w, layout)[0]
    target = w
    for step in range(iters):
        q = _quantize(target, layout, SCHEMES[bits], w0.dtype)
        residual = matrix - inits._matrix(quant.dequantize(q), layout)[0]
        a, b = _top(residual, rank, jnp.float32(scale))
        yield a.reshape(stack + ins + (rank,)), b.reshape(stack + (rank,) + outs), q
        if step + 1 < iters:
            low = jnp.matmul(a, b, precision=_HI).reshape(layout.canonical_shape)
            target = w - scale * layout.from_canonical(low)


def loftq_kernel(w0: jax.Array, layout: Layout, rank: int, scale: float, bits: int, iters: int, dtype: Any, *,
                 path: str = "kernel", groups: tuple[bool, ...] | None = None
                 ) -> tuple[jax.Array, jax.Array, quant.QuantizedArray]:
    """A, B and the quantized base of one kernel, with ``Q + s·A⊗B ≈ W0`` (LoftQ's alternation).

    Args:
      w0: the float kernel, ``stack + in + out`` in its stored order (values needed).
      layout: its :class:`jlora.layout.Layout`.
      rank: r. scale: s. bits: 4 (NF4, blocks of 64) or 8 (int8 per output unit). iters: T >= 1.
      dtype: the factors' dtype. path: for errors. groups: fused groups (not supported: raises).

    Returns:
      ``(A, B, Q)``: A ``stack + in + (r,)``, B ``stack + (r,) + out`` in ``dtype``, and ``Q`` the
      :class:`~jlora.QuantizedArray` of the last step (``dequantize(Q, None)`` has W0's dtype).

    >>> w = jax.random.normal(jax.random.key(0), (64, 64))
    >>> A, B, Q = loftq_kernel(w, Layout((64, 64), "io"), 8, 2.0, 4, 2, jnp.float32)
    >>> Q, A.shape, B.shape
    (QuantizedArray(nf4, shape=(64, 64), dtype=float32, block_size=64), (64, 8), (8, 64))
    >>> bool(reconstruction_error(w, Q, A, B, 2.0, Layout((64, 64), "io")) < reconstruction_error(w, Q))
    True
    """
    a, b, q = collections.deque(loftq_steps(w0, layout, rank, scale, bits, iters, path=path, groups=groups), 1)[0]
    return a.astype(dtype), b.astype(dtype), q


def reconstruction_error(w: jax.Array, q: quant.QuantizedArray, a: jax.Array | None = None,
                         b: jax.Array | None = None, scale: float = 1.0, layout: Layout | None = None) -> jax.Array:
    """``||W - (Q + s·A⊗B)||_F / ||W||_F`` in float32; without A, B the plain QLoRA start (B = 0).

    >>> w = jnp.ones((2, 64))
    >>> float(reconstruction_error(w, quant.quantize({"w": w}, "w")["w"]))
    0.0
    """
    w = jnp.asarray(w, jnp.float32)
    approx = quant.dequantize(q, jnp.float32)
    if a is not None:
        if layout is None or b is None:
            raise ValueError("reconstruction_error: A needs B and the kernel's layout; fix: pass a, b, scale, layout")
        low = jnp.matmul(a.reshape(a.shape[:layout.n_stack] + (-1, a.shape[-1])).astype(jnp.float32),
                         b.reshape(b.shape[:layout.n_stack + 1] + (-1,)).astype(jnp.float32), precision=_HI)
        approx = approx + scale * layout.from_canonical(low.reshape(layout.canonical_shape))
    return jnp.linalg.norm((w - approx).reshape(-1)) / jnp.linalg.norm(w.reshape(-1))

