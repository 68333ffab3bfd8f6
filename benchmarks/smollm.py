"""SmolLM2-135M-Instruct train step: jlora LoRA (lazy, merged-in-step) against full fine-tuning, side by side.

    python benchmarks/smollm.py              # 30 layers, seq 64, batch 4, 5 round-robin rounds
    python benchmarks/smollm.py --quick      # 2 layers, seq 32, 2 rounds (a smoke run)

The real weights (examples/models/smollm.py), a causal-LM loss over every token, AdamW. Each round
runs one step of every variant; a variant's ratio is its step time over full fine-tuning's in the
same round (that cancels other load on shared cores); the table shows the median and range. The
variants are checked to compute the same initial loss (1e-4 relative: B = 0 at init). Writes
benchmarks/results/smollm.md and smollm.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
from examples import chat_sft  # noqa: E402
from examples.models import smollm  # noqa: E402

MiB = 2**20


def causal_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Mean next-token NLL over the sequence (float32).

    >>> float(causal_loss(jnp.zeros((1, 3, 4)), jnp.array([[0, 1, 2]]))) == float(jnp.log(4.0))
    True
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()


def _lora_step(fwd: Any, tx: optax.GradientTransformation) -> Any:
    @jax.jit
    def step(frozen, lora, opt, ids):
        loss, g = jax.value_and_grad(lambda l: causal_loss(fwd(frozen, l, ids), ids))(lora)
        u, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, u), opt, loss

    return step


def build(model: Any, params: Any, config: jlora.LoraConfig) -> dict[str, tuple[Any, tuple]]:
    """``{name: (jitted step, initial state)}`` for full FT, LoRA lazy, LoRA merged-in-step."""
    out: dict[str, tuple[Any, tuple]] = {}
    tx_full = optax.adamw(1e-4)

    @jax.jit
    def full_step(p, opt, ids):
        loss, g = jax.value_and_grad(lambda p: causal_loss(model.apply(p, ids), ids))(p)
        u, opt = tx_full.update(g, opt, p)
        return optax.apply_updates(p, u), opt, loss

    out["full fine-tuning"] = (full_step, (params, tx_full.init(params)))
    frozen, lora = jlora.init(jax.random.key(0), params, config)
    for mode in ("lazy", "merged"):
        fwd = jlora.lora_apply(model.apply, config, mode=mode)
        tx = jlora.optimizer(optax.adamw(1e-4), lora)

        name = "jlora lazy" if mode == "lazy" else "jlora merged-in-step"
        out[name] = (_lora_step(fwd, tx), (frozen, lora, tx.init(lora)))
    return out


def _bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compiles every variant, checks the initial losses agree, times ``rounds`` round-robin rounds."""
    t_start = time.perf_counter()
    model, params, _, _ = smollm.load_smollm()
    if args.layers < model.config.num_hidden_layers:
        model = type(model)(dataclasses.replace(model.config, num_hidden_layers=args.layers))
        params = {"params": {k: v for k, v in params["params"].items()
                             if not k.startswith("layers_") or int(k[7:]) < args.layers}}
    config = jlora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=chat_sft.target_regexes(args.targets))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, model.config.vocab_size, (args.batch, args.seq)), jnp.int32)
    variants = build(model, params, config)
    rows: dict[str, dict[str, Any]] = {}
    states: dict[str, tuple] = {}
    for name, (step, state) in variants.items():
        t0 = time.perf_counter()
        compiled = step.lower(*state, ids).compile()
        mem = compiled.memory_analysis()
        t_compile = time.perf_counter() - t0
        if name == "full fine-tuning":
            new_p, opt, loss = compiled(*state, ids)
            states[name] = (new_p, opt)
            trainable, opt_bytes = _bytes(params) // 4, _bytes(opt)
        else:
            new_l, opt, loss = compiled(*state, ids)
            states[name] = (state[0], new_l, opt)
            trainable, opt_bytes = sum(x.size for x in jax.tree.leaves(state[1])), _bytes(opt)
        rows[name] = {"compile_s": t_compile, "loss0": float(loss), "trainable": int(trainable),
                      "opt_state_mib": opt_bytes / MiB, "temp_mib": getattr(mem, "temp_size_in_bytes", 0) / MiB,
                      "times": [], "fn": compiled}
        print(f"{name}: compiled in {t_compile:.1f} s, loss {float(loss):.6f}", flush=True)
    ref = rows["full fine-tuning"]["loss0"]
    bad = [n for n, r in rows.items() if abs(r["loss0"] - ref) > 1e-4 * abs(ref)]
    if bad:
        raise SystemExit(f"initial losses differ from full fine-tuning's {ref}: {bad}")
    load = os.getloadavg()[0]
    for rnd in range(args.rounds):
        for name, r in rows.items():
            t0 = time.perf_counter()
            out = r["fn"](*states[name], ids)
            jax.block_until_ready(out)
            r["times"].append(time.perf_counter() - t0)
            states[name] = (out[0], out[1]) if name == "full fine-tuning" else (states[name][0], out[0], out[1])
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{n} {r['times'][-1] * 1e3:.0f} ms"
                                                             for n, r in rows.items()), flush=True)
    full = rows["full fine-tuning"]["times"]
    for r in rows.values():
        ratios = [t / f for t, f in zip(r["times"], full)]
        r.update(step_ms=statistics.median(r["times"]) * 1e3, ratio=statistics.median(ratios),
                 ratio_min=min(ratios), ratio_max=max(ratios))
        del r["fn"]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {"rows": rows, "args": settings, "layers": args.layers, "load_start": load,
            "load_end": os.getloadavg()[0], "wall_s": time.perf_counter() - t_start,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, backend {jax.default_backend()}",
            "versions": f"jax {jax.__version__}, flax {__import__('flax').__version__}, optax {optax.__version__}"}


def report(res: dict[str, Any]) -> str:
    """The markdown report."""
    a = res["args"]
    lines = [
        "# SmolLM2-135M-Instruct train step: LoRA vs full fine-tuning",
        "",
        f"- date: {res['date']}; machine: {res['machine']}; {res['versions']}",
        f"- load average at start / end: {res['load_start']:.2f} / {res['load_end']:.2f} (shared cores: compare "
        "ratios, which are taken within one round)",
        f"- command: `python benchmarks/smollm.py {' '.join(a['argv'])}`; total wall time {res['wall_s']:.0f} s",
        "",
        f"Real weights (GGUF, float32), {res['layers']} of 30 layers, batch {a['batch']}, seq {a['seq']}, causal-LM "
        f"loss over every token, AdamW; LoRA r={a['rank']} alpha={2 * a['rank']} on `{a['targets']}`. Median of "
        f"{a['rounds']} round-robin rounds; ratio = variant / full FT in the same round. Initial losses agree "
        "(1e-4 relative).",
        "",
        "| variant | step ms | x full FT median [min-max] | trainable | opt state MiB | XLA temp MiB | compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in res["rows"].items():
        lines.append(f"| {name} | {r['step_ms']:.0f} | {r['ratio']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] | "
                     f"{r['trainable']:,} | {r['opt_state_mib']:.1f} | {r['temp_mib']:.0f} | {r['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, seq 32, 2 rounds: a smoke run")
    ap.add_argument("--layers", type=int, default=30, help="use the first N decoder layers")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="all", help="LoRA targets (examples/finetune_smollm.py syntax)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.seq, args.rounds = min(args.layers, 2), 32, 2
    args.argv = argv
    res = run(args)
    md = report(res)
    print("\n" + md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smollm.md").write_text(md)
    (args.out / "smollm.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {args.out / 'smollm.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
