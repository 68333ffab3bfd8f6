"""summary: trainable and total parameter counts and bytes, as a readable table."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jlora.core import _checks as checks
from jlora.core import paths


def _size(x: Any) -> tuple[int, int]:
    if isinstance(x, paths.OpaqueLeaf):  # a quantized kernel: its parameters, and the bytes it really holds
        return int(np.prod(x.shape)), int(x.nbytes)
    n = int(np.prod(x.shape)) if hasattr(x, "shape") else 1
    return n, n * np.dtype(x.dtype).itemsize if hasattr(x, "dtype") else 8


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.2f}{suffix}{unit}"
        n /= 1000
    return str(n)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Counts of a (frozen, lora) pair. ``str(summary)`` is a table.

    Attributes:
      trainable: parameters in the lora tree.
      trainable_bytes: their bytes.
      frozen: parameters in the frozen tree.
      frozen_bytes: their bytes.
      rows: per-path ``(path, shape, dtype, count)`` of the lora tree (when asked for).

    >>> Summary(trainable=10, trainable_bytes=40, frozen=90, frozen_bytes=360).share
    0.1
    """

    trainable: int
    trainable_bytes: int
    frozen: int
    frozen_bytes: int
    rows: tuple[tuple[str, tuple[int, ...], str, int], ...] = ()

    @property
    def total(self) -> int:
        """Frozen plus trainable parameters (what runs when the adapter is active)."""
        return self.frozen + self.trainable

    @property
    def share(self) -> float:
        """Trainable parameters as a fraction of the total."""
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        lines = []
        if self.rows:
            width = max(len(r[0]) for r in self.rows)
            lines.append(f"{'lora leaf':<{width}}  {'shape':<18} {'dtype':<9} {'params':>10}")
            for path, shape, dtype, n in self.rows:
                lines.append(f"{path:<{width}}  {str(shape):<18} {dtype:<9} {n:>10,}")
            lines.append("")
        lines += [
            f"{'':<10} {'params':>14} {'bytes':>12}",
            f"{'trainable':<10} {self.trainable:>14,} {_human(self.trainable_bytes, 'B'):>12}",
            f"{'frozen':<10} {self.frozen:>14,} {_human(self.frozen_bytes, 'B'):>12}",
            f"{'total':<10} {self.total:>14,} {_human(self.trainable_bytes + self.frozen_bytes, 'B'):>12}",
            f"trainable share: {100 * self.share:.4f}%",
        ]
        return "\n".join(lines)


def summary(frozen: Any, lora: Any, *, per_path: bool = False) -> Summary:
    """Trainable and total parameter counts and bytes of a (frozen, lora) pair.

    Works on arrays and on ``jax.ShapeDtypeStruct`` trees (plan an adapter without allocating it).

    >>> import jax.numpy as jnp
    >>> s = summary({"k": jnp.zeros((100, 100))}, {"k": {"A": jnp.zeros((100, 2)), "B": jnp.zeros((2, 100))}})
    >>> s.trainable, s.frozen, round(s.share, 4)
    (400, 10000, 0.0385)
    """
    checks.lora_tree("jlora.summary", lora)
    t = [(p, _size(x), x) for p, x in paths.flatten(lora).items()]
    f = [_size(x) for x in paths.flatten(frozen).values()]
    rows = tuple((p, tuple(x.shape), str(np.dtype(x.dtype)), n) for p, (n, _), x in t) if per_path else ()
    return Summary(
        trainable=sum(n for _, (n, _), _ in t),
        trainable_bytes=sum(b for _, (_, b), _ in t),
        frozen=sum(n for n, _ in f),
        frozen_bytes=sum(b for _, b in f),
        rows=rows,
    )
