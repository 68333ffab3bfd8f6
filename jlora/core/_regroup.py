"""Regrouping row-major axes into runs of given sizes: how the trace follows a reshape of a kernel."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any


def regroup(atoms: Sequence[Hashable], sizes: Sequence[int], size_of: Callable[[Any], int],
            split: Callable[[Any, tuple[int, int]], tuple[list[Any], Callable[[Any], Any]] | None]
            ) -> list[list[Any]] | None:
    """Groups ``atoms`` (row-major axes) into consecutive runs whose sizes multiply to ``sizes``.

    Where a size falls inside an atom, ``split(atom, (q, rest))`` refines it and returns the two new
    atoms and a renumbering of the other atoms (or ``None`` when it cannot). Trailing size-1 atoms
    join the last group. Returns ``None`` when the sizes do not align. Both the layout reader and
    the lazy rewrite follow reshapes with it.

    >>> regroup([0, 1], [6], {0: 2, 1: 3}.get, None)
    [[0, 1]]
    """
    queue = list(atoms)
    runs: list[list[Any]] = []
    for n in sizes:
        group: list[Any] = []
        runs.append(group)
        p = 1
        while p < n:
            if not queue:
                return None
            m = size_of(queue[0])
            if p * m <= n:
                if n % (p * m):
                    return None
                group.append(queue.pop(0))
                p *= m
                continue
            if n % p or m % (n // p):
                return None
            q = n // p
            atom = queue[0]
            result = split(atom, (q, m // q))
            if result is None:
                return None
            (first, second), ren = result
            queue = [second] + [ren(a) for a in queue[1:]]
            for g in runs:
                g[:] = [ren(a) for a in g]
            group.append(first)
            p *= q
    if any(size_of(a) != 1 for a in queue):
        return None
    if queue and runs:
        runs[-1].extend(queue)
    return runs

