"""Train step of a real pretrained model: jlora LoRA (lazy, merged-in-step) against full fine-tuning and
the probe (no weight gradients: the floor), side by side.

    python benchmarks/real_step.py                      # SmolLM2-135M, 30 layers, seq 64, batch 4, 5 rounds
    python benchmarks/real_step.py --model minilm       # all-MiniLM-L6-v2, 6 layers, seq 64, batch 32
    python benchmarks/real_step.py --dtype bf16         # bf16 base (LoRA factors f32) vs bf16 full FT
    python benchmarks/real_step.py --quick              # 2 layers, seq 32, 2 rounds (a smoke run)

The real weights (examples/models/smollm.py, minilm.py); SmolLM2: a causal-LM loss over every
token; MiniLM: in-batch InfoNCE between the two halves of the batch (finetune_minilm.py's loss);
AdamW. The probe differentiates only a zero vector added to every embedding lookup's output
(``flax.linen.intercept_methods``): the whole input-gradient chain and no weight gradient, the floor
of any LoRA step. Each round runs one step of every variant; a variant's ratio is its step time
over full fine-tuning's in the same round (that cancels other load on shared cores); the table shows
the median and range. The variants are checked to compute the same initial loss (1e-4 relative in
f32, 2e-2 in bf16: B = 0 at init). Writes benchmarks/results/step_<model>[_bf16].md and .json.
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

import flax.linen as nn  # noqa: E402

import jlora  # noqa: E402
from examples import chat_sft, finetune_minilm  # noqa: E402
from examples.models import minilm, smollm  # noqa: E402

MiB = 2**20


def causal_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Mean next-token NLL over the sequence (float32).

    >>> float(causal_loss(jnp.zeros((1, 3, 4)), jnp.array([[0, 1, 2]]))) == float(jnp.log(4.0))
    True
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()


@dataclasses.dataclass(frozen=True)
class Task:
    """A model, its params and the loss of one batch: ``loss(apply_fn, params, ids)``."""

    model: Any
    params: Any
    loss: Any
    targets: tuple[str, ...]
    vocab: int


def _cut_layers(params: dict[str, Any], prefix: str, layers: int) -> dict[str, Any]:
    """``params`` without the entries ``<prefix><i>`` for ``i >= layers``."""
    return {k: v for k, v in params.items() if not k.startswith(prefix) or int(k[len(prefix):]) < layers}


def load_task(name: str, layers: int) -> Task:
    """SmolLM2-135M (causal LM) or all-MiniLM-L6-v2 (InfoNCE), cut to the first ``layers`` layers."""
    if name == "smollm":
        model, params, _, _ = smollm.load_smollm()
        if layers < model.config.num_hidden_layers:
            model = type(model)(dataclasses.replace(model.config, num_hidden_layers=layers))
            params = {"params": _cut_layers(params["params"], "layers_", layers)}
        return Task(model, params, lambda apply, p, ids: causal_loss(apply(p, ids), ids),
                    chat_sft.target_regexes("all"), model.config.vocab_size)
    model, params, _ = minilm.load_minilm(max_length=64)
    if layers < model.config.num_hidden_layers:
        model = type(model)(dataclasses.replace(model.config, num_hidden_layers=layers))
        enc = params["params"]["encoder"]
        params = {"params": dict(params["params"], encoder=_cut_layers(enc, "layer_", layers))}

    def loss(apply, p, ids):
        emb = apply(p, ids, jnp.ones_like(ids))
        half = ids.shape[0] // 2
        return finetune_minilm.info_nce(emb[:half], emb[half:], 0.05)

    return Task(model, params, loss, finetune_minilm.target_regexes(",".join(finetune_minilm.SHORT_TARGETS)),
                model.config.vocab_size)


def with_embed_offset(apply_fn: Any) -> Any:
    """``apply_fn(params, *args, offset=...)``: ``offset`` added to the output of every ``nn.Embed`` call.

    >>> class M(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, ids):
    ...         return nn.Embed(3, 2)(ids)
    >>> m = M(); p = m.init(jax.random.key(0), jnp.zeros((1,), jnp.int32))
    >>> f = with_embed_offset(m.apply)
    >>> bool(jnp.allclose(f(p, jnp.zeros((1,), jnp.int32), offset=jnp.ones(2)), m.apply(p, jnp.zeros((1,), jnp.int32)) + 1))
    True
    """

    def apply(params: Any, *args: Any, offset: jax.Array) -> Any:
        def add_offset(next_fun, a, kw, context):
            out = next_fun(*a, **kw)
            if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
                return out + offset.astype(out.dtype)
            return out

        with nn.intercept_methods(add_offset):
            return apply_fn(params, *args)

    return apply


def _lora_step(task: Task, fwd: Any, tx: optax.GradientTransformation) -> Any:
    @jax.jit
    def step(frozen, lora, opt, ids):
        loss, g = jax.value_and_grad(lambda l: task.loss(lambda p, *a: fwd(frozen, l, *a), None, ids))(lora)
        u, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, u), opt, loss

    return step


def cast(tree: Any, dtype: Any) -> Any:
    """Floating leaves to ``dtype``."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def build(task: Task, config: jlora.LoraConfig) -> dict[str, tuple[Any, tuple, str]]:
    """``{name: (jitted step, initial state, kind)}``: full FT, LoRA lazy / merged-in-step, the probe."""
    out: dict[str, tuple[Any, tuple, str]] = {}
    tx_full = optax.adamw(1e-4)
    params = task.params

    @jax.jit
    def full_step(p, opt, ids):
        loss, g = jax.value_and_grad(lambda p: task.loss(task.model.apply, p, ids))(p)
        u, opt = tx_full.update(g, opt, p)
        return optax.apply_updates(p, u), opt, loss

    out["full fine-tuning"] = (full_step, (params, tx_full.init(params)), "full")
    frozen, lora = jlora.init(jax.random.key(0), params, config)
    for mode in ("lazy", "merged"):
        fwd = jlora.lora_apply(task.model.apply, config, mode=mode)
        tx = jlora.optimizer(optax.adamw(1e-4), lora)
        name = "jlora lazy" if mode == "lazy" else "jlora merged-in-step"
        out[name] = (_lora_step(task, fwd, tx), (frozen, lora, tx.init(lora)), "lora")
    probe_apply = with_embed_offset(task.model.apply)
    offset = jnp.zeros((_embed_width(params),), jnp.float32)
    tx_probe = optax.adamw(1e-4)

    @jax.jit
    def probe_step(p, off, opt, ids):
        loss, g = jax.value_and_grad(lambda o: task.loss(lambda q, *a: probe_apply(q, *a, offset=o), p, ids))(off)
        u, opt = tx_probe.update(g, opt, off)
        return optax.apply_updates(off, u), opt, loss

    out["probe: no weight gradients (floor)"] = (probe_step, (params, offset, tx_probe.init(offset)), "lora")
    return out


def _embed_width(params: Any) -> int:
    """The feature width of the (first) embedding table."""
    for path, x in jlora.paths.flatten(params).items():
        if path.endswith("/embedding"):
            return int(x.shape[-1])
    raise ValueError("no params/.../embedding leaf in the model's params")


def _bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compiles every variant, checks the initial losses agree, times ``rounds`` round-robin rounds."""
    t_start = time.perf_counter()
    task = load_task(args.model, args.layers)
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    task = dataclasses.replace(task, params=cast(task.params, dtype))
    config = jlora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=task.targets)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, task.vocab, (args.batch, args.seq)), jnp.int32)
    variants = build(task, config)
    rows: dict[str, dict[str, Any]] = {}
    states: dict[str, tuple] = {}
    n_params = sum(x.size for x in jax.tree.leaves(task.params))
    for name, (step, state, kind) in variants.items():
        t0 = time.perf_counter()
        compiled = step.lower(*state, ids).compile()
        mem = compiled.memory_analysis()
        t_compile = time.perf_counter() - t0
        if kind == "full":
            new_p, opt, loss = compiled(*state, ids)
            states[name] = (new_p, opt)
            trainable = n_params
        else:
            new_l, opt, loss = compiled(*state, ids)
            states[name] = (state[0], new_l, opt)
            trainable = sum(x.size for x in jax.tree.leaves(state[1]))
        rows[name] = {"compile_s": t_compile, "loss0": float(loss), "trainable": int(trainable), "kind": kind,
                      "opt_state_mib": _bytes(opt) / MiB, "temp_mib": getattr(mem, "temp_size_in_bytes", 0) / MiB,
                      "times": [], "cpu_times": [], "fn": compiled}
        print(f"{name}: compiled in {t_compile:.1f} s, loss {float(loss):.6f}", flush=True)
    ref = rows["full fine-tuning"]["loss0"]
    tol = 2e-2 if args.dtype == "bf16" else 1e-4
    bad = [n for n, r in rows.items() if abs(r["loss0"] - ref) > tol * abs(ref)]
    if bad:
        raise SystemExit(f"initial losses differ from full fine-tuning's {ref}: {bad}")
    load = os.getloadavg()[0]
    names = list(rows)
    for rnd in range(args.rounds):
        for name in names[rnd % len(names):] + names[: rnd % len(names)]:  # order rotated
            r = rows[name]
            t0, c0 = time.perf_counter(), time.process_time()
            out = r["fn"](*states[name], ids)
            jax.block_until_ready(out)
            r["times"].append(time.perf_counter() - t0)
            r["cpu_times"].append(time.process_time() - c0)
            states[name] = (out[0], out[1]) if r["kind"] == "full" else (states[name][0], out[0], out[1])
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{n} {r['times'][-1] * 1e3:.0f} ms"
                                                             for n, r in rows.items()), flush=True)
    full, full_cpu = rows["full fine-tuning"]["times"], rows["full fine-tuning"]["cpu_times"]
    for r in rows.values():
        ratios = [t / f for t, f in zip(r["times"], full)]
        cpu = [t / f for t, f in zip(r["cpu_times"], full_cpu)]
        r.update(step_ms=statistics.median(r["times"]) * 1e3, ratio=statistics.median(ratios),
                 ratio_min=min(ratios), ratio_max=max(ratios), cpu_ratio=statistics.median(cpu))
        del r["fn"]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {"rows": rows, "args": settings, "layers": args.layers, "load_start": load,
            "load_end": os.getloadavg()[0], "wall_s": time.perf_counter() - t_start,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, backend {jax.default_backend()}",
            "versions": f"jax {jax.__version__}, flax {__import__('flax').__version__}, optax {optax.__version__}"}


MODELS = {"smollm": ("SmolLM2-135M-Instruct", 30, "causal-LM loss over every token"),
          "minilm": ("all-MiniLM-L6-v2", 6, "in-batch InfoNCE between the batch halves")}


def report(res: dict[str, Any]) -> str:
    """The markdown report."""
    a = res["args"]
    title, n_layers, loss = MODELS[a["model"]]
    lines = [
        f"# {title} train step ({a['dtype']}): LoRA vs full fine-tuning and the probe",
        "",
        f"- date: {res['date']}; machine: {res['machine']}; {res['versions']}",
        f"- load average at start / end: {res['load_start']:.2f} / {res['load_end']:.2f} (shared cores: compare "
        "ratios, which are taken within one round)",
        f"- command: `python benchmarks/real_step.py {' '.join(a['argv'])}`; total wall time {res['wall_s']:.0f} s",
        "",
        f"Real weights ({a['dtype']}{'; LoRA factors f32' if a['dtype'] == 'bf16' else ''}), {res['layers']} of "
        f"{n_layers} layers, batch {a['batch']}, seq {a['seq']}, {loss}, AdamW; LoRA r={a['rank']} alpha="
        f"{2 * a['rank']} on every attention and MLP kernel. Median of {a['rounds']} round-robin rounds (order "
        "rotated); ratio = variant / full FT in the same round, wall and process CPU time. Initial losses agree.",
        "",
        "| variant | step ms | x full FT median [min-max] | x full FT, CPU time | trainable | opt state MiB | "
        "XLA temp MiB | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["rows"].items():
        lines.append(f"| {name} | {r['step_ms']:.0f} | {r['ratio']:.3f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] | "
                     f"{r['cpu_ratio']:.3f} | {r['trainable']:,} | {r['opt_state_mib']:.1f} | {r['temp_mib']:.0f} | "
                     f"{r['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm")
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32", help="the base weights' (and full FT's) dtype")
    ap.add_argument("--quick", action="store_true", help="2 layers, seq 32, 2 rounds: a smoke run")
    ap.add_argument("--layers", type=int, default=None, help="use the first N layers (default: all)")
    ap.add_argument("--batch", type=int, default=None, help="default 4 (smollm), 32 (minilm)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    args.layers = args.layers or MODELS[args.model][1]
    args.batch = args.batch or (4 if args.model == "smollm" else 32)
    if args.quick:
        args.layers, args.seq, args.rounds = min(args.layers, 2), 32, 2
    args.argv = argv
    res = run(args)
    md = report(res)
    print("\n" + md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"step_{args.model}" + ("_bf16" if args.dtype == "bf16" else "") + ("_quick" if args.quick else "")
    (args.out / f"{stem}.md").write_text(md)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {args.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
