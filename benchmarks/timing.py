"""Round-robin timing of several callables on a shared machine: wall time and process CPU time.

On a loaded machine (other processes on the same cores) wall time swings by +-30 %; the process CPU time
(all threads of this process, ``time.process_time``) counts the work done and is far less sensitive to
waiting for a core. Both are taken per call; ratios to the first callable are taken within each round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax


def round_robin(calls: Sequence[tuple[str, Callable[[], object]]], rounds: int) -> dict[str, dict]:
    """``calls``: (name, thunk) pairs; the first is the reference. One call of each per round, order rotated.

    Returns name -> {wall, cpu: per-round seconds; wall_ratio, cpu_ratio: (median, min, max) to the first}.
    """
    wall: dict[str, list[float]] = {n: [] for n, _ in calls}
    cpu: dict[str, list[float]] = {n: [] for n, _ in calls}
    calls = list(calls)
    for k in range(rounds):
        for name, fn in calls[k % len(calls):] + calls[: k % len(calls)]:
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn())
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    ref = calls[0][0]
    out = {}
    for name, _ in calls:
        rw = [a / b for a, b in zip(wall[name], wall[ref])]
        rc = [a / b for a, b in zip(cpu[name], cpu[ref])]
        out[name] = dict(wall=wall[name], cpu=cpu[name], wall_s=statistics.median(wall[name]),
                         cpu_s=statistics.median(cpu[name]),
                         wall_ratio=(statistics.median(rw), min(rw), max(rw)),
                         cpu_ratio=(statistics.median(rc), min(rc), max(rc)))
    return out


def fmt(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.3f} [{r[1]:.2f}–{r[2]:.2f}]"
