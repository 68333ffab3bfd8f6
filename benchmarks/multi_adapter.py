"""Mixed-adapter serving throughput: 8 adapters in one batch vs one adapter vs a per-adapter loop.

Run: python benchmarks/multi_adapter.py [--rounds 15]
Workload: a 4-block MLP transformer trunk (d 512, MLP 2048) on a batch of 16 sequences of 64
tokens, float32, LoRA rank 8 on every kernel. Timed side by side, round-robin, medians of
ratios; writes benchmarks/results/multi_adapter.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import jlora
from jlora import multi


class Trunk(nn.Module):
    d: int = 512
    hidden: int = 2048
    layers: int = 4

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            h = nn.Dense(self.d, name=f"block_{i}_proj")(nn.LayerNorm(name=f"block_{i}_ln")(x))
            h = nn.Dense(self.d, name=f"block_{i}_fc2")(jax.nn.gelu(nn.Dense(self.hidden, name=f"block_{i}_fc1")(h)))
            x = x + h
        return x


def timed(fn, *args):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args(argv)

    model = Trunk()
    x = jax.random.normal(jax.random.key(0), (args.batch, args.seq, 512))
    params = model.init(jax.random.key(1), x)
    cfg = jlora.LoraConfig(rank=8, alpha=16, targets=r"params/block_\d+_(proj|fc1|fc2)/kernel")
    adapters = {}
    for i in range(args.adapters):
        _, lora = jlora.init(jax.random.key(10 + i), params, cfg)
        lora = jax.tree.map(lambda a, k=i: a + 0.01 * jax.random.normal(jax.random.key(100 + k), a.shape), lora)
        adapters[f"task{i}"] = (lora, cfg)
    s = multi.stack(params, adapters)
    ids = jnp.arange(args.batch) % args.adapters

    single = jax.jit(jlora.lora_apply(model.apply, cfg, mode="lazy"))
    mixed = jax.jit(multi.mixed_apply(model.apply, s.config, mode="lazy"))
    base = jax.jit(model.apply)
    first = adapters["task0"][0]

    def loop(xb):  # what PEFT does for a mixed batch: one pass per adapter over its rows
        out = []
        for i, (lora, _) in enumerate(adapters.values()):
            out.append(single(params, lora, xb[i :: args.adapters]))
        return out

    variants = {
        "base model (no LoRA)": lambda: base(params, x),
        "one adapter, lazy": lambda: single(params, first, x),
        f"{args.adapters} adapters mixed, one call": lambda: mixed(params, s.lora, ids, x),
        f"{args.adapters} adapters, per-adapter loop": lambda: loop(x),
    }
    for fn in variants.values():  # compile and warm up
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, fn in variants.items():
            times[k].append(timed(fn))
    ref = "one adapter, lazy"
    rows = ["| variant | median ms | tokens/s | throughput vs one adapter |", "|---|---|---|---|"]
    for k, ts in times.items():
        ratios = [r / t for r, t in zip(times[ref], ts)]
        med = statistics.median(ts)
        rows.append(f"| {k} | {1e3 * med:.1f} | {args.batch * args.seq / med:,.0f} | "
                    f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")
    head = (f"Mixed-adapter serving, {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} CPUs, "
            f"jax {jax.__version__}, {jax.devices()[0].platform}; batch {args.batch}x{args.seq} tokens, d 512, "
            f"4 blocks, r 8, {args.rounds} rounds\n\n")
    table = head + "\n".join(rows) + "\n"
    out = pathlib.Path(__file__).parent / "results" / "multi_adapter.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(table)
    print(table)
    return table


if __name__ == "__main__":
    main()
