"""Tensor layouts of one adapted module: PEFT/PyTorch tensors <-> jlora factors (see :mod:`jlora.peft`).

Layouts (PyTorch on the left, jlora on the right)::

    Linear     lora_A.weight (r, in)           A (in..., r)     multi-axis kernels flattened, C order
               lora_B.weight (out, r)          B (r, out...)
               lora_magnitude_vector (out,)    m (out...)       DoRA
    Embedding  lora_embedding_A (r, vocab)     A (vocab, r)
               lora_embedding_B (d, r)         B (r, d)
               lora_magnitude_vector (d,)      m (d,)
    Conv       lora_A.weight (r, cin, k...)    A (k..., cin, r)  a conv to r channels
               lora_B.weight (cout, r, 1...)   B (r, cout)       a 1x1 conv
               lora_magnitude_vector (1, cout, 1...)  m (cout,)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def _find_split(path: str, shape: tuple[int, ...], n_in_flat: int, n_out_flat: int) -> int | None:
    for n_in in range(1, len(shape)):
        if math.prod(shape[:n_in]) == n_in_flat and math.prod(shape[n_in:]) == n_out_flat:
            return n_in
    return None


def factors_to_torch(path: str, A: np.ndarray, B: np.ndarray, m: np.ndarray | None, is_conv: bool
                     ) -> dict[str, np.ndarray]:
    """PEFT tensors (key suffix after the module name -> array) of one module's jlora factors.

    Args:
      path: the kernel's jlora path (for errors; an ``.../embedding`` path is an ``nn.Embedding``).
      A: ``(in..., r)``; B: ``(r, out...)``; m: the DoRA magnitude ``(out...)`` or None.
      is_conv: the kernel is a convolution ``(k..., cin, cout)``.

    >>> t = factors_to_torch("d/kernel", np.ones((4, 2)), np.ones((2, 3)), np.ones(3), False)
    >>> {k: v.shape for k, v in t.items()}
    {'lora_A.weight': (2, 4), 'lora_B.weight': (3, 2), 'lora_magnitude_vector': (3,)}
    """
    r = A.shape[-1]
    out: dict[str, np.ndarray] = {}
    if is_conv:
        if B.ndim != 2 or A.ndim < 3:
            raise ValueError(
                f"jlora.peft.save: conv {path!r}: expected A (k..., cin, r) and B (r, cout), got A {A.shape}, "
                f"B {B.shape}"
            )
        nk = A.ndim - 2
        out["lora_A.weight"] = np.transpose(A, (A.ndim - 1, A.ndim - 2) + tuple(range(nk)))
        out["lora_B.weight"] = B.T.reshape(B.shape[1], r, *(1,) * nk)
        magnitude_shape: tuple[int, ...] = (1, B.shape[1]) + (1,) * nk
    elif path.rsplit("/", 1)[-1] == "embedding":
        if A.ndim != 2 or B.ndim != 2:
            raise ValueError(f"jlora.peft.save: embedding {path!r}: expected 2-D A and B, got {A.shape}, {B.shape}")
        out["lora_embedding_A"] = A.T
        out["lora_embedding_B"] = B.T
        magnitude_shape = (B.shape[1],)
    else:
        out["lora_A.weight"] = A.reshape(-1, r).T
        out["lora_B.weight"] = B.reshape(r, -1).T
        magnitude_shape = (math.prod(B.shape[1:]),)
    if m is not None:
        m = np.asarray(m)
        if m.shape != B.shape[1:]:
            raise ValueError(f"jlora.peft.save: DoRA magnitude of {path!r}: expected shape {B.shape[1:]} (the "
                             f"kernel's output axes), got {m.shape}")
        out["lora_magnitude_vector"] = m.reshape(magnitude_shape)
    return out


def factors_from_torch(path: str, shape: tuple[int, ...], parts: Mapping[str, tuple[str, np.ndarray]]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """jlora ``(A, B, m, n_in)`` of one module's PEFT tensors, for the params leaf ``path`` of ``shape``.

    Args:
      path: the params leaf (for errors).
      shape: its shape (``in... + out...``, conv ``k... + (cin, cout)``, table ``(vocab, d)``).
      parts: ``{"A": (key, lora_A), "B": (key, lora_B)}``, plus ``"embed"`` for an embedding and
        ``"m"`` for a DoRA magnitude.

    Returns:
      ``A (in..., r)``, ``B (r, out...)``, ``m (out...)`` or None, and the number of input axes.

    >>> parts = {"A": ("a", np.ones((2, 4))), "B": ("b", np.ones((3, 2)))}
    >>> A, B, m, n_in = factors_from_torch("d/kernel", (4, 3), parts)
    >>> A.shape, B.shape, m, n_in
    ((4, 2), (2, 3), None, 1)
    """
    key_a, tA = parts["A"]
    key_b, tB = parts["B"]
    r = tA.shape[0]
    got = f"lora_A {tA.shape}, lora_B {tB.shape}"
    if "embed" in parts:
        ok = len(shape) == 2 and tA.shape == (r, shape[0]) and tB.shape == (shape[1], r)
        want = f"lora_embedding_A (r, {shape[0]}), lora_embedding_B ({shape[-1]}, r)" if len(shape) == 2 else "2-D"
        A, B, n_in = (tA.T, tB.T, 1) if ok else (None, None, 0)
    elif tA.ndim > 2:
        nk = tA.ndim - 2
        ok = (len(shape) == nk + 2 and tA.shape == (r, shape[-2]) + shape[:-2]
              and tB.shape == (shape[-1], r) + (1,) * nk)
        want = f"lora_A (r, {shape[-2]}, {', '.join(map(str, shape[:-2]))}), lora_B ({shape[-1]}, r, 1...)"
        A = np.transpose(tA, tuple(range(2, tA.ndim)) + (1, 0)) if ok else None
        B = tB.reshape(tB.shape[0], r).T if ok else None
        n_in = len(shape) - 1
    else:
        n_in = _find_split(path, shape, tA.shape[-1], tB.shape[0]) if tA.ndim == 2 and tB.ndim == 2 else None
        ok = n_in is not None and tB.shape[1] == r
        want = f"lora_A (r, prod(in)), lora_B (prod(out), r) for a kernel of shape {shape}"
        A = tA.T.reshape(shape[:n_in] + (r,)) if ok else None
        B = tB.T.reshape((r,) + shape[n_in:]) if ok else None
    if not ok:
        raise ValueError(
            f"jlora.peft.load: adapter keys {key_a!r}/{key_b!r} do not fit the params leaf {path!r} of shape "
            f"{shape}: expected {want}, got {got}; fix: check the key_map and that params is the adapter's "
            "base model"
        )
    m = None
    if "m" in parts:
        key_m, tm = parts["m"]
        out_shape = B.shape[1:]
        if tm.size != math.prod(out_shape):
            raise ValueError(
                f"jlora.peft.load: DoRA magnitude {key_m!r} of shape {tm.shape} does not fit {path!r}: expected "
                f"{math.prod(out_shape)} values (the kernel's output axes {out_shape})"
            )
        m = tm.reshape(out_shape)
    return A, B, m, n_in


def whole_to_torch(path: str, value: np.ndarray, param: str, is_conv: bool) -> np.ndarray:
    """The PyTorch layout of a trained-whole jlora leaf (a kernel is transposed, a bias flattened).

    Args:
      path: the leaf's jlora path (its last name says kernel / bias / scale ...).
      value: the leaf's array.
      param: the torch parameter name (``'weight'`` or ``'bias'``).
      is_conv: a kernel is a convolution ``(k..., cin, cout)``.

    >>> whole_to_torch("d/kernel", np.ones((4, 3)), "weight", False).shape
    (3, 4)
    """
    if path.rsplit("/", 1)[-1] == "kernel":
        if is_conv:
            return np.transpose(value, (value.ndim - 1, value.ndim - 2) + tuple(range(value.ndim - 2)))
        if value.ndim == 2:
            return value.T
        raise ValueError(
            f"jlora.peft.save: trained-whole kernel {path!r} has shape {value.shape}; only 2-D (in, out) "
            "kernels and convs (conv=...) have a known PyTorch layout"
        )
    return value.reshape(-1) if param == "bias" else value


def whole_from_torch(path: str, key: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A saved PyTorch weight as the jlora leaf ``path`` of ``shape`` (kernels transposed back).

    Args:
      path: the params leaf; key: the adapter key (for errors); value: the tensor; shape: the leaf's shape.

    >>> whole_from_torch("d/kernel", "k", np.ones((3, 4)), (4, 3)).shape
    (4, 3)
    """
    raw = value.shape
    if path.rsplit("/", 1)[-1] == "kernel":
        if value.ndim == 2 and len(shape) >= 2:
            value = value.T
        elif value.ndim > 2:
            value = np.transpose(value, tuple(range(2, value.ndim)) + (1, 0))
    if value.size != math.prod(shape) or (value.ndim == len(shape) and value.shape != shape):
        raise ValueError(
            f"jlora.peft.load: adapter key {key!r} of shape {raw} does not fit the params leaf "
            f"{path!r} of shape {shape}; fix: check the key_map and the base model"
        )
    return value.reshape(shape)
