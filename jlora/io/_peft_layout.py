"""Tensor layouts of one adapted module: PEFT/PyTorch tensors <-> jlora factors (see :mod:`jlora.peft`).

Layouts (PyTorch on the left, jlora on the right)::

    Linear     lora_A.weight (r, in)           A (in..., r)     multi-axis kernels flattened, C order
               lora_B.weight (out, r)          B (r, out...)
               lora_magnitude_vector (out,)    m (out...)       DoRA
    Embedding  lora_embedding_A (r, vocab)     A (vocab, r)
               lora_embedding_B (d, r)         B (r, d)
               lora_magnitude_vector (d,)      m (d,)
    Conv       lora_A.weight (r, cin, k...)    A (in..., r)      a conv to r channels (in: k... and
                                                                  cin in the kernel's stored order)
               lora_B.weight (cout, r, 1...)   B (r, cout)       a 1x1 conv
               lora_magnitude_vector (1, cout, 1...)  m (cout,)
    grouped    lora_A.weight (r, cin, k...)    A (G, in..., r/G) PEFT's A is block-diagonal over the G
    conv       lora_B.weight (cout, r/G, 1...) B (G, r/G, cout/G) groups (PEFT: r % G == 0)

Any stored axis order works: jlora's A and B are in the canonical order of the kernel's
:class:`~jlora.layout.Layout` (an ``(out, in)`` kernel has the same PEFT tensors as ``(in, out)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from jlora.core.layout import Layout, layout_without_trace


def _find_split(path: str, shape: tuple[int, ...], n_in_flat: int, n_out_flat: int) -> int | None:
    for n_in in range(1, len(shape)):
        if math.prod(shape[:n_in]) == n_in_flat and math.prod(shape[n_in:]) == n_out_flat:
            return n_in
    return None


def _conv_a_to_torch(A: np.ndarray, layout: Layout) -> np.ndarray:
    """jlora A (``(G,) + in + (r,)``) -> PEFT ``lora_A`` ``(G·r, G·cin, k...)`` (block-diagonal over groups)."""
    g, fi = layout.feature_groups, layout.in_feature_index()
    a = A if g > 1 else A[None]
    n_in = a.ndim - 2
    order = [0, a.ndim - 1, 1 + fi] + [1 + k for k in range(n_in) if k != fi]
    blocks = np.transpose(a, order)  # (G, r, cin_g, k...)
    _, r, cin, *ks = blocks.shape
    out = np.zeros((g * r, g * cin, *ks), blocks.dtype)
    for i in range(g):
        out[i * r : (i + 1) * r, i * cin : (i + 1) * cin] = blocks[i]
    return out


def _conv_a_from_torch(tA: np.ndarray, layout: Layout, path: str, key: str) -> np.ndarray:
    """The inverse of :func:`_conv_a_to_torch`; a PEFT ``lora_A`` mixing groups is refused."""
    g, fi = layout.feature_groups, layout.in_feature_index()
    r, cin = tA.shape[0] // g, tA.shape[1] // g
    blocks = np.stack([tA[i * r : (i + 1) * r, i * cin : (i + 1) * cin] for i in range(g)])
    rest = tA.copy()
    for i in range(g):
        rest[i * r : (i + 1) * r, i * cin : (i + 1) * cin] = 0
    if g > 1 and np.any(rest):
        raise ValueError(
            f"jlora.peft.load: {key!r} (grouped conv {path!r}, {g} groups) connects channels across groups "
            "(its off-group blocks are non-zero): PEFT's grouped-conv LoRA A is a full conv, jlora keeps the update "
            "inside the groups so that it merges into the kernel; this adapter cannot be converted; fix: merge it "
            "in PEFT (merge_and_unload) and load the merged conv weights as params"
        )
    n_in = tA.ndim - 1  # cin + spatial
    canon_in = [None] * n_in  # canonical input position -> axis of blocks (after G, r)
    canon_in[fi] = 2
    spatial = iter(range(3, 3 + n_in - 1))
    for k in range(n_in):
        if k != fi:
            canon_in[k] = next(spatial)
    a = np.transpose(blocks, [0] + canon_in + [1])  # (G,) + in + (r,)
    return a if g > 1 else a[0]


def factors_to_torch(path: str, A: np.ndarray, B: np.ndarray, m: np.ndarray | None, layout: Layout
                     ) -> dict[str, np.ndarray]:
    """PEFT tensors (key suffix after the module name -> array) of one module's jlora factors.

    Args:
      path: the kernel's jlora path (for errors).
      A: ``stack + in + (r,)``; B: ``stack + (r,) + out``; m: the DoRA magnitude ``stack + out`` or None.
      layout: the kernel's :class:`~jlora.layout.Layout` (``kind`` says Linear, Embedding or Conv).

    >>> t = factors_to_torch("d/kernel", np.ones((4, 2)), np.ones((2, 3)), np.ones(3), Layout((4, 3), "io"))
    >>> {k: v.shape for k, v in t.items()}
    {'lora_A.weight': (2, 4), 'lora_B.weight': (3, 2), 'lora_magnitude_vector': (3,)}
    """
    r = A.shape[-1]
    out: dict[str, np.ndarray] = {}
    if layout.kind == "conv":
        g = layout.feature_groups
        nk = layout.n_in - 1
        if layout.n_out != 1 or layout.n_stack != (1 if g > 1 else 0):
            raise ValueError(f"jlora.peft.save: conv {path!r} with axis roles {layout.describe()} has no PEFT layout "
                             "(PEFT's conv LoRA has one output axis and no stack axes); fix: save it with "
                             "jlora.save_adapter (orbax) instead")
        out["lora_A.weight"] = _conv_a_to_torch(A, layout)
        b = B if g > 1 else B[None]  # (G, r, cout_g)
        out["lora_B.weight"] = np.transpose(b, (0, 2, 1)).reshape(-1, r, *(1,) * nk)
        magnitude_shape: tuple[int, ...] = (1, math.prod(layout.out_shape) * g) + (1,) * nk
    elif layout.kind == "embed":
        if A.ndim != 2 or B.ndim != 2:
            raise ValueError(f"jlora.peft.save: embedding {path!r}: expected 2-D A and B, got {A.shape}, {B.shape}; "
                             "fix: save the lora tree jlora.init made for the (vocab, d) table")
        out["lora_embedding_A"] = A.T
        out["lora_embedding_B"] = B.T
        magnitude_shape = (B.shape[1],)
    else:
        if layout.n_stack:
            raise ValueError(
                f"jlora.peft.save: {path!r} has stack axes ({layout.describe()}); PEFT stores one module per "
                "layer/head/expert; fix: unstack them into per-module paths before exporting"
            )
        out["lora_A.weight"] = A.reshape(-1, r).T
        out["lora_B.weight"] = B.reshape(r, -1).T
        magnitude_shape = (math.prod(B.shape[1:]),)
    if m is not None:
        m = np.asarray(m)
        want = layout.stack_shape + layout.out_shape
        if m.shape != want:
            raise ValueError(f"jlora.peft.save: DoRA magnitude of {path!r}: expected shape {want} (the "
                             f"kernel's stack + output axes), got {m.shape}; fix: save the lora tree jlora.init "
                             "made with use_dora=True")
        out["lora_magnitude_vector"] = m.reshape(magnitude_shape)
    return out


def factors_from_torch(path: str, layout: Layout, parts: Mapping[str, tuple[str, np.ndarray]]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """jlora ``(A, B, m)`` of one module's PEFT tensors, for the params leaf ``path`` of ``layout``.

    Args:
      path: the params leaf (for errors).
      layout: its :class:`~jlora.layout.Layout` (an embedding's ``kind`` is ``'embed'``, a conv's ``'conv'``).
      parts: ``{"A": (key, lora_A), "B": (key, lora_B)}``, plus ``"embed"`` for an embedding and
        ``"m"`` for a DoRA magnitude.

    Returns:
      ``A`` (``stack + in + (r,)``), ``B`` (``stack + (r,) + out``), ``m`` (``stack + out``) or None.

    >>> parts = {"A": ("a", np.ones((2, 4))), "B": ("b", np.ones((3, 2)))}
    >>> A, B, m = factors_from_torch("d/kernel", Layout((3, 4), "oi"), parts)
    >>> A.shape, B.shape, m
    ((4, 2), (2, 3), None)
    """
    key_a, tA = parts["A"]
    key_b, tB = parts["B"]
    r = tA.shape[0] // layout.feature_groups
    if "embed" in parts:  # lora_embedding_A / _B: PEFT's nn.Embedding layer
        want, factors = _embed_from_torch(tA, tB, r, layout)
    elif layout.kind == "conv":
        want, factors = _conv_from_torch(tA, tB, r, layout, path, key_a)
    else:
        want, factors = _linear_from_torch(tA, tB, r, layout)
    if factors is None:
        raise ValueError(
            f"jlora.peft.load: adapter keys {key_a!r}/{key_b!r} do not fit the params leaf {path!r} of shape "
            f"{layout.shape}: expected {want}, got lora_A {tA.shape}, lora_B {tB.shape}; fix: check the key_map "
            "and that params is the adapter's base model"
        )
    return factors[0], factors[1], _magnitude_from_torch(path, parts.get("m"), layout)


Factors = tuple[np.ndarray, np.ndarray]


def _embed_from_torch(tA: np.ndarray, tB: np.ndarray, r: int, layout: Layout) -> tuple[str, Factors | None]:
    """What an embedding's tensors should be, and its ``(A, B)`` if they are."""
    shape = layout.shape
    ok = len(shape) == 2 and tA.shape == (r, shape[0]) and tB.shape == (shape[1], r)
    want = f"lora_embedding_A (r, {shape[0]}), lora_embedding_B ({shape[-1]}, r)" if len(shape) == 2 else "2-D"
    return want, ((tA.T, tB.T) if ok else None)


def _conv_from_torch(tA: np.ndarray, tB: np.ndarray, r: int, layout: Layout, path: str, key_a: str
                     ) -> tuple[str, Factors | None]:
    """What a conv's tensors should be (``(G·r, G·cin, k...)``, ``(cout, r, 1...)``), and its ``(A, B)``."""
    g, nk, fi = layout.feature_groups, layout.n_in - 1, layout.in_feature_index()
    ins = layout.in_shape
    cin, spatial = ins[fi], tuple(n for k, n in enumerate(ins) if k != fi)
    cout = math.prod(layout.out_shape) * g
    want = f"lora_A ({g}·r, {g * cin}, {', '.join(map(str, spatial))}), lora_B ({cout}, r, 1...)"
    if tA.shape != (g * r, g * cin) + spatial or tB.shape != (cout, r) + (1,) * nk:
        return want, None
    b = np.transpose(tB.reshape(g, -1, r), (0, 2, 1))  # (G, r, cout_g)
    return want, (_conv_a_from_torch(tA, layout, path, key_a), b if g > 1 else b[0])


def _linear_from_torch(tA: np.ndarray, tB: np.ndarray, r: int, layout: Layout) -> tuple[str, Factors | None]:
    """What a linear map's tensors should be (``(r, fan_in)``, ``(fan_out, r)``), and its ``(A, B)``."""
    fan_out = math.prod(layout.out_shape)
    ok = (not layout.n_stack and tA.ndim == 2 and tB.ndim == 2 and tA.shape[1] == layout.fan_in
          and tB.shape == (fan_out, r))
    want = f"lora_A (r, {layout.fan_in}), lora_B ({fan_out}, r) for axis roles {layout.describe()}"
    return want, ((tA.T.reshape(layout.in_shape + (r,)), tB.T.reshape((r,) + layout.out_shape)) if ok else None)


def _magnitude_from_torch(path: str, part: tuple[str, np.ndarray] | None, layout: Layout) -> np.ndarray | None:
    """The DoRA magnitude ``stack + out`` of ``lora_magnitude_vector`` (any shape of that size), or None."""
    if part is None:
        return None
    key_m, tm = part
    want_m = layout.stack_shape + layout.out_shape
    if tm.size != math.prod(want_m):
        raise ValueError(
            f"jlora.peft.load: DoRA magnitude {key_m!r} of shape {tm.shape} does not fit {path!r}: expected "
            f"{math.prod(want_m)} values (the kernel's output axes {want_m}); fix: check the key_map and the "
            "base model"
        )
    return tm.reshape(want_m)


def untraced_layout(path: str, key: str, shape: tuple[int, ...], n_in_flat: int, n_out_flat: int, kind: str,
                    kernels: str | None) -> Layout:
    """The layout of a kernel known neither from a trace nor from ``layouts=``: from the key map's
    stated kernel order (``kernels``: ``'in_out'``/``'out_in'``), else from the sizes when only one
    reading fits; a kernel the sizes do not tell (square: ``(in, out)`` and ``(out, in)`` both fit)
    is refused with the fix. A kernel whose sizes split one way only is read ``(in..., out...)`` through
    :func:`jlora.core.layout.layout_without_trace`, the one no-trace rule (``kind`` from the file's keys).

    >>> untraced_layout("d/kernel", "k", (4, 3), 4, 3, "dense", None).roles
    'io'
    >>> untraced_layout("d/kernel", "k", (4, 4), 4, 4, "dense", "out_in").roles
    'oi'
    >>> untraced_layout("d/kernel", "k", (4, 4), 4, 4, "dense", None)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: jlora.peft.load: cannot tell the axis roles of 'd/kernel' (shape (4, 4)) from 'k'...
    """
    if kind == "conv":
        return Layout(shape, "i" * (len(shape) - 1) + "o", kind="conv")
    if kernels == "out_in" and kind != "embed":
        n_out = _find_split(path, shape, n_out_flat, n_in_flat)
        return Layout(shape, "o" * (n_out or 1) + "i" * (len(shape) - (n_out or 1)), kind=kind)
    n_in = _find_split(path, shape, n_in_flat, n_out_flat)
    if kernels is None and kind != "embed" and n_in is not None and _find_split(path, shape, n_out_flat, n_in_flat):
        raise ValueError(
            f"jlora.peft.load: cannot tell the axis roles of {path!r} (shape {shape}) from {key!r}: its input and "
            f"output sizes ({n_in_flat}, {n_out_flat}) fit both (in..., out...) (Flax's nn.Dense) and (out..., in...) "
            "(PyTorch's nn.Linear weight kept as it is), and reading it the wrong way gives a wrong model silently. "
            "Fix: pass apply_fn=model.apply, args=(example inputs,) so load reads the roles from the model, or "
            f"layouts={{{path!r}: jlora.Layout({shape}, 'io')}} ('oi' for (out, in)), or a key map that states the "
            "order: jlora.peft.PortKeyMap(pairs, kernels='in_out' or 'out_in')"
        )
    layout = layout_without_trace(path, shape, 0, n_in if n_in is not None else len(shape) - 1)
    return layout if layout.kind == kind else Layout(layout.shape, layout.roles, layout.splits, kind)


def whole_to_torch(path: str, value: np.ndarray, param: str, is_conv: bool, fan_in_fan_out: bool = False
                   ) -> np.ndarray:
    """The PyTorch layout of a trained-whole jlora leaf (a kernel is transposed, a bias flattened).

    Args:
      path: the leaf's jlora path (its last name says kernel / bias / scale ...).
      value: the leaf's array.
      param: the torch parameter name (``'weight'`` or ``'bias'``).
      is_conv: a kernel is a convolution ``(k..., cin, cout)``.
      fan_in_fan_out: the torch module stores its weight ``(in, out)`` (GPT-2's ``Conv1D``): no transpose.

    >>> whole_to_torch("d/kernel", np.ones((4, 3)), "weight", False).shape
    (3, 4)
    """
    if path.rsplit("/", 1)[-1] == "kernel":
        if fan_in_fan_out and value.ndim == 2:
            return value
        if is_conv:
            return np.transpose(value, (value.ndim - 1, value.ndim - 2) + tuple(range(value.ndim - 2)))
        if value.ndim == 2:
            return value.T
        raise ValueError(
            f"jlora.peft.save: trained-whole kernel {path!r} has shape {value.shape}; only 2-D (in, out) "
            "kernels and convs (conv=...) have a known PyTorch layout; fix: adapt it with LoRA instead of training "
            "it whole, or save with jlora.save_adapter (orbax)"
        )
    return value.reshape(-1) if param == "bias" else value


def whole_from_torch(path: str, key: str, value: np.ndarray, shape: tuple[int, ...],
                     fan_in_fan_out: bool | None = False) -> np.ndarray:
    """A saved PyTorch weight as the jlora leaf ``path`` of ``shape`` (kernels transposed back).

    Args:
      path: the params leaf; key: the adapter key (for errors); value: the tensor; shape: the leaf's shape.
      fan_in_fan_out: the torch module stores ``(in, out)`` (GPT-2's ``Conv1D``): kept as it is;
        ``None``: unknown (the adapter says ``fan_in_fan_out`` but not which modules): a square kernel
        is then ambiguous and refused.

    >>> whole_from_torch("d/kernel", "k", np.ones((3, 4)), (4, 3)).shape
    (4, 3)
    """
    raw = value.shape
    if path.rsplit("/", 1)[-1] == "kernel":
        if value.ndim == 2 and len(shape) == 2 and fan_in_fan_out is None:
            if value.shape[0] == value.shape[1]:
                raise ValueError(
                    f"jlora.peft.load: {key!r} is a square weight {raw} of a module saved whole, and the adapter "
                    f"says fan_in_fan_out: whether the module stored (out, in) (nn.Linear) or (in, out) (GPT-2's "
                    "Conv1D) cannot be told; fix: pass fan_in_fan_out=<regex of the Conv1D kernels' jlora paths> "
                    "(jlora.peft.GPT2_FAN_IN_FAN_OUT for GPT-2), or an empty tuple for nn.Linear modules"
                )
            fan_in_fan_out = value.shape == shape
        if value.ndim == 2 and len(shape) >= 2 and not fan_in_fan_out:
            value = value.T
        elif value.ndim > 2:
            value = np.transpose(value, tuple(range(2, value.ndim)) + (1, 0))
    if value.size != math.prod(shape) or (value.ndim == len(shape) and value.shape != shape):
        raise ValueError(
            f"jlora.peft.load: adapter key {key!r} of shape {raw} does not fit the params leaf "
            f"{path!r} of shape {shape}; fix: check the key_map and the base model"
        )
    return value.reshape(shape)
