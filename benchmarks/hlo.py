"""Read a compiled XLA program (``compiled.as_text()``): layout copies and thin non-row-major matmuls.

What the profile of a LoRA step on XLA:CPU shows (ANCHORS.md): time lost to transposing copies of large
activation gradients, and to thin token-contracting matmuls (``dA = x^T (dY B^T)``: (in, T) x (T, r))
that are not in row-major form (lhs contracting its physically last axis, rhs its physically first),
which XLA:CPU runs on a slow generic loop (~8 GFLOP/s against 40-150 for large matmuls).

``hlo_stats`` counts every copy/transpose instruction (fused or not) with its output bytes, grouped by
the JAX op that produced it, and every unbatched thin dot (an output side <= 64) whose large lhs
contracts its major axis (the slow form measured below).
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any

_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
          "s64": 8, "u64": 8, "s16": 2, "u16": 2}
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\](?:\{([\d,]*)[^}]*\})?\s+([\w\-]+)\((.*)$")
_OPNAME = re.compile(r'op_name="([^"]*)"')
THIN = 64


def _ints(s: str | None) -> tuple[int, ...]:
    return tuple(int(d) for d in s.split(",") if d) if s else ()


def _attr(name: str, rest: str) -> tuple[int, ...]:
    m = re.search(name + r"=\{([\d,]*)\}", rest)
    return _ints(m.group(1)) if m else ()


def _where(rest: str) -> str:
    m = _OPNAME.search(rest)
    name = m.group(1) if m else "?"
    name = re.sub(r"block_\d+", "block_N", name)
    return name.replace("jit(step)/", "")[-90:]


def hlo_stats(text: str) -> dict[str, Any]:
    """Summarises an optimised HLO module: copies/transposes and thin non-row-major dots."""
    shapes: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {}
    instrs = []
    for line in text.splitlines():
        m = _DEF.match(line)
        if not m:
            continue
        name, dtype, dims, layout, op, rest = m.groups()
        dims = _ints(dims)
        lay = _ints(layout) if layout is not None else tuple(range(len(dims) - 1, -1, -1))
        shapes[name] = (dtype, dims, lay)
        instrs.append((name, op, rest))
    copies = {"n": 0, "bytes": 0, "by_op": collections.Counter()}
    thin = {"n": 0, "flops": 0.0, "by_op": collections.Counter()}
    for name, op, rest in instrs:
        dtype, dims, lay = shapes[name]
        if op in ("copy", "transpose"):
            nbytes = _BYTES.get(dtype, 4) * math.prod(dims)
            copies["n"] += 1
            copies["bytes"] += nbytes
            copies["by_op"][f"{op} {dtype}{list(dims)} {_where(rest)}"] += nbytes
        elif op == "dot":
            _dot(name, rest, shapes, thin)
    copies["top"] = [f"{k}: {v / 2**20:.1f} MiB" for k, v in copies.pop("by_op").most_common(6)]
    thin["top"] = [f"{k}: {v / 1e6:.0f} MFLOP" for k, v in thin.pop("by_op").most_common(6)]
    return {"copies": copies, "thin_dots": thin}


def _dot(name: str, rest: str, shapes: dict, thin: dict) -> None:
    ops = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    if len(ops) < 2 or ops[0] not in shapes or ops[1] not in shapes:
        return
    _, ld, ll = shapes[ops[0]]
    rd = shapes[ops[1]][1]
    out = shapes[name][1]
    lc, rc = _attr("lhs_contracting_dims", rest), _attr("rhs_contracting_dims", rest)
    lb = _attr("lhs_batch_dims", rest)
    flops = 2.0 * math.prod(out) * math.prod(ld[d] for d in lc)
    if lb or not out or min(out) > THIN or flops < 1e5:  # batched (attention) dots are not LoRA's
        return
    l_minor = ll[0] if ll else len(ld) - 1
    # measured on XLA:CPU (jax 0.10.2, T=1024, n=2048, r=8): a large lhs contracting its major (token) axis,
    # dot([T,n], [r,T]) lc=0, runs at ~4 GFLOP/s; the same product as [r,T]x[T,n] row-major at ~30, and a
    # thin operand in either form (dY·Bs^T with rc=1, low·dY with lc=0) at 30-60
    big_lhs = min(ld) > THIN
    if big_lhs and lc != (l_minor,):
        thin["n"] += 1
        thin["flops"] += flops
        thin["by_op"][f"{list(ld)}x{list(rd)} lc={list(lc)} rc={list(rc)} {_where(rest)}"] += flops
