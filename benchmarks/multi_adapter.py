"""Mixed-adapter serving throughput and scan-stacked memory: 8 adapters in one batch vs one adapter.

Run: python benchmarks/multi_adapter.py [--rounds 15]
Throughput workload: a 4-block MLP transformer trunk (d 512, MLP 2048) on a batch of 16 sequences
of 64 tokens, float32, LoRA rank 8 on every kernel, example i runs adapter i % 8. Variants are
timed side by side, round-robin; each cell is the median [min-max] over rounds of the per-round
throughput ratio against "one adapter, lazy". The "hand-written" rows run the same trunk written
out with jnp ops, to compare the low-rank formulations themselves: one adapter, factors gathered per
example (BGMV einsum), rows sorted by adapter with ``jax.lax.ragged_dot`` (SGMV).
``mode='rows'`` is jlora's one-pass form of the BGMV row (no vmap).
Memory workload: a flax ``nn.scan`` model (6 layer-stacked blocks, d 256, MLP 1024), batch 8x16,
compiled memory (``memory_analysis``) with no LoRA, one adapter and 8 adapters mixed.
Writes benchmarks/results/multi_adapter.md.
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
import numpy as np

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


def hand_trunk(params, x, low, layers=4):
    """Trunk written out; ``low(name, h)`` is the low-rank term of kernel ``name`` for rows ``h``."""
    p = params["params"]

    def dense(name, h):
        return h @ p[name]["kernel"] + p[name]["bias"] + low(name, h)

    for i in range(layers):
        ln = p[f"block_{i}_ln"]
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        h = (x - mu) * jax.lax.rsqrt(var + 1e-6) * ln["scale"] + ln["bias"]
        h = dense(f"block_{i}_proj", h)
        x = x + dense(f"block_{i}_fc2", jax.nn.gelu(dense(f"block_{i}_fc1", h)))
    return x


def factors(lora, name):
    node = lora["params"][name]["kernel"]
    return node["A"], node["B"]


def timed(fn):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def throughput(args) -> str:
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
    first = adapters["task0"][0]
    single = jax.jit(jlora.lora_apply(model.apply, cfg, mode="lazy"))
    mixed_unit = jax.jit(multi.mixed_apply(model.apply, s.config))
    mixed = jax.jit(multi.mixed_apply(model.apply, s.config, unit_batch=False))
    one_pass = jax.jit(multi.mixed_apply(model.apply, s.config, mode="rows"))
    base = jax.jit(model.apply)
    scale = cfg.scale_for("")

    def loop(xb):  # what PEFT does for a mixed batch: one pass per adapter over its rows
        return [single(params, lora, xb[i :: args.adapters]) for i, (lora, _) in enumerate(adapters.values())]

    @jax.jit
    def hand_one(params, lora, x):
        def low(name, h):
            a, b = factors(lora, name)
            return (h @ a) @ (scale * b)
        return hand_trunk(params, x, low)

    @jax.jit
    def hand_bgmv(params, stacked, ids, x):  # factors gathered per example (scale folded in the stack)
        def low(name, h):
            a, b = factors(stacked, name)
            return jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", h, a[ids]), b[ids])
        return hand_trunk(params, x, low)

    @jax.jit
    def hand_sgmv(params, stacked, ids, x):  # examples sorted once by adapter; ragged_dot per kernel
        order = jnp.argsort(ids, stable=True)
        sizes = (jnp.bincount(ids, length=s.base_id + 1) * x.shape[1]).astype(jnp.int32)
        bsz, t = x.shape[:2]

        def low(name, h):
            a, b = factors(stacked, name)
            rows = h.reshape(bsz * t, -1)
            return jax.lax.ragged_dot(jax.lax.ragged_dot(rows, a, sizes), b, sizes).reshape(bsz, t, -1)
        return hand_trunk(params, x[order], low)[jnp.argsort(order)]

    n = args.adapters
    calls = {  # name: (jitted function, its arguments); None: a Python loop
        "base model (no LoRA)": (base, (params, x)),
        "one adapter, lazy": (single, (params, first, x)),
        f"{n} adapters mixed, mixed_apply (unit_batch=True)": (mixed_unit, (params, s.lora, ids, x)),
        f"{n} adapters mixed, mixed_apply (unit_batch=False)": (mixed, (params, s.lora, ids, x)),
        f"{n} adapters mixed, mixed_apply (mode='rows')": (one_pass, (params, s.lora, ids, x)),
        f"{n} adapters, per-adapter loop": None,
        "hand-written: one adapter": (hand_one, (params, first, x)),
        f"hand-written: {n} mixed, gathered factors (BGMV)": (hand_bgmv, (params, s.lora, ids, x)),
        f"hand-written: {n} mixed, sorted + ragged_dot (SGMV)": (hand_sgmv, (params, s.lora, ids, x)),
    }
    variants = {k: (lambda c=c: c[0](*c[1])) if c is not None else (lambda: loop(x)) for k, c in calls.items()}
    traffic = {k: c[0].lower(*c[1]).compile().cost_analysis().get("bytes accessed") if c is not None else None
               for k, c in calls.items()}
    want = np.asarray(mixed(params, s.lora, ids, x))
    checked = ("hand-written: {n} mixed, gathered factors (BGMV)", "hand-written: {n} mixed, sorted + ragged_dot (SGMV)",
               "{n} adapters mixed, mixed_apply (unit_batch=True)", "{n} adapters mixed, mixed_apply (mode='rows')")
    for name in (c.format(n=n) for c in checked):
        np.testing.assert_allclose(variants[name](), want, rtol=2e-3, atol=2e-3, err_msg=name)
    for fn in variants.values():  # compile and warm up
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    load0 = os.getloadavg()
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, fn in variants.items():
            times[k].append(timed(fn))
    load1 = os.getloadavg()
    ref = "one adapter, lazy"
    rows = ["| variant | median ms | tokens/s | throughput vs one adapter, median [min-max] | XLA bytes accessed MB |",
            "|---|---|---|---|---|"]
    for k, ts in times.items():
        ratios = [r / t for r, t in zip(times[ref], ts)]
        med = statistics.median(ts)
        rows.append(f"| {k} | {1e3 * med:.1f} | {args.batch * args.seq / med:,.0f} | "
                    f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}] | "
                    f"{'-' if traffic[k] is None else f'{traffic[k] / 1e6:.0f}'} |")
    head = (f"Mixed-adapter serving, {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} CPUs, "
            f"jax {jax.__version__}, {jax.devices()[0].platform}; batch {args.batch}x{args.seq} tokens, d 512, "
            f"4 blocks, r 8, {n} adapters, {args.rounds} round-robin rounds; load average (1 min) "
            f"{load0[0]:.1f} before, {load1[0]:.1f} after\n\n")
    return head + "\n".join(rows) + "\n"


class Block(nn.Module):
    d: int = 256

    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(self.d, name="fc2")(jnp.tanh(nn.Dense(4 * self.d, name="fc1")(h))), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=6)
        return layers(name="layers")(x, None)[0]


def memory(args) -> str:
    m, x = Scanned(), jnp.ones((8, 16, 256))
    params = m.init(jax.random.key(0), x)
    cfg = jlora.LoraConfig(rank=8, alpha=16, targets=r".*kernel")
    adapters = {f"t{i}": (jlora.init(jax.random.key(i), params, cfg, apply_fn=m.apply, args=(x,))[1], cfg)
                for i in range(args.adapters)}
    one = adapters["t0"][0]
    s1, s8 = multi.stack(params, {"t0": adapters["t0"]}), multi.stack(params, adapters)
    ids1, ids8 = jnp.zeros(8, jnp.int32), jnp.arange(8) % args.adapters
    mb = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    frozen = sum(a.nbytes for a in jax.tree.leaves(params))
    rows = ["| variant | arguments MiB | temp MiB | adapters' bytes in arguments MiB |", "|---|---|---|---|"]
    cases = {
        "no LoRA": (m.apply, (params, x), {}),
        "one adapter, lazy": (jlora.lora_apply(m.apply, cfg), (params, one, x), one),
        "1-adapter stack, mixed_apply": (multi.mixed_apply(m.apply, s1.config), (params, s1.lora, ids1, x), s1.lora),
        f"{args.adapters} adapters mixed, mixed_apply": (multi.mixed_apply(m.apply, s8.config), (params, s8.lora, ids8, x), s8.lora),
        f"{args.adapters} adapters mixed, unit_batch=False": (multi.mixed_apply(m.apply, s8.config, unit_batch=False),
                                                              (params, s8.lora, ids8, x), s8.lora),
        f"{args.adapters} adapters mixed, mode='rows'": (multi.mixed_apply(m.apply, s8.config, mode="rows"),
                                                      (params, s8.lora, ids8, x), s8.lora),
    }
    for name, (fn, a, lora) in cases.items():
        ma = jax.jit(fn).lower(*a).compile().memory_analysis()
        lb = sum(v.nbytes for v in jax.tree.leaves(lora))
        rows.append(f"| {name} | {mb(ma.argument_size_in_bytes)} | {mb(ma.temp_size_in_bytes)} | {mb(lb)} |")
    return (f"\nScan-stacked model (flax nn.scan, 6 layers, d 256, MLP 1024, r 8, batch 8x16), compiled memory; "
            f"frozen params {mb(frozen)} MiB\n\n" + "\n".join(rows) + "\n")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args(argv)
    table = throughput(args) + memory(args)
    out = pathlib.Path(__file__).parent / "results" / "multi_adapter.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(table)
    print(table)
    return table


if __name__ == "__main__":
    main()
