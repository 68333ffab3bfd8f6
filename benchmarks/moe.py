"""MoE expert LoRA train step: jlora lazy vs merged-in-step vs full fine-tuning of the same MoE.

Run: python benchmarks/moe.py [--rounds 15] [--forms ragged dense indexed] [--dtype bf16] [--quick]
Workload: the decoder of ``examples/models/moe.py`` (d 256, expert hidden 512, 8 experts, top-2,
2 layers, vocab 512) on a batch of 8 sequences of 64 tokens, float32 (``--dtype bf16``: a bf16 base
and bf16 full fine-tuning, LoRA factors f32; losses then agree within 2e-2); LoRA r 8 on the expert
kernels only (``A (E, in, r)``, ``B (E, r, out)``). Each variant is one jitted train step (forward,
backward, adamw, donated state); losses at the initial weights (B non-zero) must agree within
1e-4 relative. Timed round-robin (one step of each variant per round, order rotated), reported as
the median step time and the median [min-max] of per-round ratios to full fine-tuning; XLA FLOPs
and compiled memory (temp + arguments + outputs) from the compiled steps. Writes
benchmarks/results/moe.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
from examples.models import moe as M  # noqa: E402


def _step(loss_of, tx):
    def step(train, opt, *rest):
        loss, g = jax.value_and_grad(loss_of)(train, *rest)
        updates, opt = tx.update(g, opt, train)
        return optax.apply_updates(train, updates), opt, loss
    return jax.jit(step, donate_argnums=(0, 1))


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--forms", nargs="+", choices=M.FORMS, default=["ragged", "dense"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds (smoke run)")
    parser.add_argument("--dtype", choices=("f32", "bf16"), default="f32",
                        help="the base weights' (and full FT's) dtype; LoRA factors stay f32")
    parser.add_argument("--out", default=None, help="default results/moe.md (moe_bf16.md with --dtype bf16)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(pathlib.Path(__file__).parent / "results" / ("moe_bf16.md" if args.dtype == "bf16" else "moe.md"))
    rounds = 2 if args.quick else args.rounds
    head = (f"# MoE expert LoRA train step\n\n{time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} "
            f"CPUs, jax {jax.__version__}, {jax.devices()[0].platform}; `python benchmarks/moe.py"
            f"{' --quick' if args.quick else ''} --dtype {args.dtype} --forms {' '.join(args.forms)} --rounds {rounds}`. Full "
            "fine-tuning trains every weight. XLA:CPU runs `ragged_dot` as a masked dense dot over all E experts "
            "(E x the routed FLOPs, in every variant alike); GPUs/TPUs run it as a grouped matmul.\n\n")
    table = head + "\n".join(run_form(form, args.quick, rounds, args.dtype) for form in args.forms)
    out = pathlib.Path(args.out)
    out.parent.mkdir(exist_ok=True, parents=True)
    out.write_text(table)
    print(table)
    return table


def run_form(form: str, quick: bool, rounds: int, dtype: str = "f32") -> str:
    """One table: the three variants with the experts run as ``form`` (base weights in ``dtype``)."""
    if quick:
        cfg, batch, seq = M.MoEConfig(vocab=32, d=16, hidden=16, experts=4, layers=1, form=form), 2, 8
    else:
        cfg = M.MoEConfig(vocab=512, d=256, hidden=512, experts=8, top_k=2, layers=2, form=form)
        batch, seq = 8, 64
    rank = 8
    apply = lambda p, t: M.apply(p, t, cfg)  # noqa: E731
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab, (batch, seq)), jnp.int32)
    params = M.init_params(jax.random.key(0), cfg)
    if dtype == "bf16":
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    lc = jlora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=M.EXPERT_TARGETS)
    frozen, lora = jlora.init(jax.random.key(1), params, lc, apply_fn=apply, args=(tokens,))
    lora = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(2), a.shape, a.dtype), lora)

    def ce(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    tx = optax.adamw(1e-4)
    lazy_fn = jlora.lora_apply(apply, lc, "lazy", strict=True)
    merged_fn = jlora.lora_apply(apply, lc, "merged")
    full_params = jlora.merge(frozen, lora, lc)  # full FT starts at W0 + delta: the same loss
    variants = {
        "full fine-tuning": (_step(lambda p: ce(apply(p, tokens)), tx), full_params, ()),
        "jlora lazy": (_step(lambda l, f: ce(lazy_fn(f, l, tokens)), jlora.optimizer(tx, lora)), lora, (frozen,)),
        "jlora merged-in-step": (_step(lambda l, f: ce(merged_fn(f, l, tokens)), jlora.optimizer(tx, lora)), lora,
                                 (frozen,)),
    }
    state, stats = {}, {}
    for name, (step, train, rest) in variants.items():
        opt = (jlora.optimizer(tx, lora) if name != "full fine-tuning" else tx).init(train)
        copy = jax.tree.map(jnp.copy, train)
        compiled = step.lower(copy, opt, *rest).compile()
        mem = compiled.memory_analysis()
        stats[name] = {"flops": compiled.cost_analysis()["flops"],
                       "mem": mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes,
                       "temp": mem.temp_size_in_bytes}
        copy, opt, loss = step(copy, opt, *rest)
        stats[name]["loss"] = float(loss)
        state[name] = [copy, opt, rest]
    ref_loss = stats["full fine-tuning"]["loss"]
    tol = 2e-2 if dtype == "bf16" else 1e-4  # bf16 rounding differs between the forms
    for name, s in stats.items():
        if abs(s["loss"] - ref_loss) > tol * abs(ref_loss):
            raise SystemExit(f"loss mismatch: {name} {s['loss']} vs full fine-tuning {ref_loss}")
    names = list(variants)
    times = {k: [] for k in names}
    for r in range(rounds + 1):  # round 0: warm-up, not counted
        for k in names[r % len(names):] + names[: r % len(names)]:
            step = variants[k][0]
            train, opt, rest = state[k]
            t = time.perf_counter()
            train, opt, loss = step(train, opt, *rest)
            jax.block_until_ready(loss)
            if r:
                times[k].append(time.perf_counter() - t)
            state[k] = [train, opt, rest]
    ref = "full fine-tuning"
    rows = ["| variant | median step ms | step time / full FT, median [min-max] | XLA GFLOPs | compiled memory MB "
            "(temp) |", "|---|---|---|---|---|"]
    for k in names:
        ratios = [t / f for t, f in zip(times[k], times[ref])]
        rows.append(f"| {k} | {1e3 * statistics.median(times[k]):.1f} | {statistics.median(ratios):.2f} "
                    f"[{min(ratios):.2f}-{max(ratios):.2f}] | {stats[k]['flops'] / 1e9:.3f} | "
                    f"{stats[k]['mem'] / 2**20:.1f} ({stats[k]['temp'] / 2**20:.1f}) |")
    n_expert = sum(x.size for p, x in jlora.paths.flatten(frozen).items() if x.ndim == 3)
    head = (f"## experts as `{cfg.form}`\n\nDecoder: d {cfg.d}, expert hidden {cfg.hidden}, {cfg.experts} experts, "
            f"top-{cfg.top_k}, {cfg.layers} layers, vocab {cfg.vocab}; batch {batch}x{seq} tokens, base {'bfloat16' if dtype == 'bf16' else 'float32'}; LoRA r "
            f"{rank} on the expert kernels ({n_expert:,} expert weights, {sum(x.size for x in jax.tree.leaves(lora)):,}"
            f" trainable); loss at init equal within {tol:g}; {rounds} rounds.\n\n")
    print(head + "\n".join(rows), file=sys.stderr)
    return head + "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
