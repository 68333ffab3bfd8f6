"""Lazy inference on the GPT workload: jlora's lazy forward against base, the hand-written forms, merged.

    python benchmarks/lazy_infer.py --rounds 30

Forward-only (logits of one batch), each jitted once; one call of each per round, order rotated;
ratio to the base forward (merged weights stored) inside the round, median [min-max]. Also the
compiled HLO of each forward: fusions, dots, copy/transpose bytes, temp. Writes
``results/lazy_infer.md`` / ``.json`` with ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import variants as V  # noqa: E402
from benchmarks import workloads as W  # noqa: E402
from benchmarks.fast_lora import fast_gpt_logits  # noqa: E402
from benchmarks.hlo import hlo_stats  # noqa: E402
from benchmarks.timing import fmt, round_robin  # noqa: E402


def forwards(wl: V.Workload) -> dict:
    """name -> (fn, args); every fn returns logits of shape (batch, seq, vocab)."""
    import jlora

    cfg = jlora.LoraConfig(rank=wl.lora.rank, alpha=wl.lora.alpha, targets=wl.regex)
    x, lora, frozen = wl.batch[0], V.lora_tree(wl.factors), wl.params
    apply = wl.model.apply
    lazy = jlora.lora_apply(apply, cfg, mode="lazy")
    merged_fn = jlora.lora_apply(apply, cfg, mode="merged")
    naive = V.naive_lazy(wl)
    gcfg, s = wl.cfg, wl.lora.scale
    out = {
        "base (merged weights stored)": (lambda p, t: apply(p, t), (wl.merged, x)),
        "jlora lazy": (lambda f, l, t: lazy(f, l, t), (frozen, lora, x)),
        "hand-written fast (2-D tokens, shared A)": (
            lambda f, l, t: fast_gpt_logits(f, l, t, gcfg, s).reshape(*t.shape, -1), (frozen, lora, x)),
        "hand-written naive (3-D, x@W0 + s·(x@A)@B)": (naive.forward, (naive.trainable, naive.frozen, x)),
        "jlora mode='merged' (merge in the forward)": (lambda f, l, t: merged_fn(f, l, t), (frozen, lora, x)),
    }
    return out


def count(text: str) -> dict:
    return dict(fusions=len(re.findall(r"= \S+ fusion\(", text)), dots=len(re.findall(r" dot\(", text)),
                concats=len(re.findall(r" concatenate\(", text)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    gcfg = W.GPTConfig(vocab=256, d_model=64, layers=2, heads=4, mlp=128, seq=16, batch=2) if args.quick \
        else W.GPTConfig()
    wl = V.gpt_workload(gcfg, W.LoraSpec(rank=8, alpha=16.0))
    load0, t0 = os.getloadavg(), time.perf_counter()
    runs = []
    ref = None
    for name, (fn, fargs) in forwards(wl).items():
        c = jax.jit(fn).lower(*fargs).compile()
        y = np.asarray(c(*fargs))
        ref = y if ref is None else ref
        err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
        row = dict(name=name, max_rel_err=err, temp_bytes=c.memory_analysis().temp_size_in_bytes,
                   flops=float((c.cost_analysis() or {}).get("flops", float("nan"))), **count(c.as_text()))
        row["copy_bytes"] = hlo_stats(c.as_text())["copies"]["bytes"]
        runs.append((row, c, fargs))
        jax.block_until_ready(c(*fargs))
    res = round_robin([(row["name"], lambda c=c, a=fargs: c(*a)) for row, c, fargs in runs], args.rounds)
    for row, _, _ in runs:
        row.update(res[row["name"]])
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), load=load0,
                load_end=os.getloadavg(), wall_s=time.perf_counter() - t0, rounds=args.rounds,
                command="python benchmarks/lazy_infer.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    lines = [f"GPT forward ({gcfg}), LoRA r=8 on q,k,v,o,fc1,fc2; {args.rounds} round-robin rounds; load "
             f"{load0[0]:.2f} / {meta['load_end'][0]:.2f}; {meta['date']}; `{meta['command']}`", "",
             "| forward | wall ms | x base, wall: median [min–max] | x base, CPU time | FLOPs x base | temp MiB | fusions |"
             " dots | copy/transpose MiB | max rel err |", "|---|---|---|---|---|---|---|---|---|---|"]
    f0 = runs[0][0]["flops"]
    for row, _, _ in runs:
        lines.append(f"| {row['name']} | {row['wall_s'] * 1e3:.1f} | {fmt(row['wall_ratio'])} | {fmt(row['cpu_ratio'])} | "
                     f"{row['flops'] / f0:.3f} | {row['temp_bytes'] / 2**20:.1f} | "
                     f"{row['fusions']} | {row['dots']} | {row['copy_bytes'] / 2**20:.1f} | {row['max_rel_err']:.1e} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "lazy_infer_run.md").write_text(md)
        (args.out / "lazy_infer.json").write_text(json.dumps(dict(meta=meta, rows=[r for r, _, _ in runs]),
                                                             indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
