"""Memory and compile cost of a LoRA train step at Llama-2-7B scale, from abstract shapes (nothing allocated).

    python benchmarks/scale.py                   # Llama-2-7B shapes (32 layers, d 4096, FFN 11008, seq 512)
    python benchmarks/scale.py --model smollm    # SmolLM2-135M shapes (30 layers, d 576, GQA 9/3, tied)
    python benchmarks/scale.py --layers 2        # a smoke run
    python benchmarks/scale.py --variants "full FT,jlora lazy,jlora merged-in-step,probe,proto"

Every step (forward, backward, adamw update; trainable and optimizer state donated) is traced, lowered
and compiled for XLA:CPU from ``jax.ShapeDtypeStruct`` inputs; ``compiled.memory_analysis()`` gives the
argument / output / temp / aliased bytes, peak = args + out + temp - aliased. Variants: full
fine-tuning, jlora lazy (``lora_apply(mode="lazy")``, factors from ``jlora.init`` under
``jax.eval_shape``), jlora merged-in-step, the probe (the gradient of a zero vector added at the input
embeddings only: the whole dX chain, no weight gradient), and ``proto`` (the hand-written lazy dense
op of ``proto_lazy_dense.py``: what jlora's rewrite could reach). The floor of a LoRA step's temp is
the probe's temp plus what lazy LoRA must keep that the probe need not (``adapted_input_floats``).
Writes ``results/scale_<model>.md`` and ``.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
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
import optax  # noqa: E402

from benchmarks import llama_shapes as L  # noqa: E402
from benchmarks.hlo import hlo_stats  # noqa: E402

GiB = 2**30
LR = 1e-4
RANK, ALPHA = 16, 32.0
MODELS = {"llama7b": L.LLAMA2_7B, "smollm": L.SMOLLM2_135M}


def compile_step(loss_fn, trainable, frozen, tx, batch, dump: str | None = None) -> dict[str, Any]:
    """Traces, lowers and compiles one donated train step from abstract inputs; memory and times."""

    def step(t, opt, fr, b):
        loss, g = jax.value_and_grad(loss_fn)(t, fr, b)
        upd, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, upd), opt, loss

    opt = jax.eval_shape(tx.init, trainable)
    c0, t0 = time.process_time(), time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(trainable, opt, frozen, batch)
    c1, t1 = time.process_time(), time.perf_counter()
    opts = {"xla_dump_to": dump, "xla_dump_hlo_as_text": True} if dump else None
    compiled = lowered.compile(compiler_options=opts) if opts else lowered.compile()
    c2, t2 = time.process_time(), time.perf_counter()
    m = compiled.memory_analysis()
    row = dict(args=m.argument_size_in_bytes, out=m.output_size_in_bytes, temp=m.temp_size_in_bytes,
               alias=m.alias_size_in_bytes, trace_lower_s=t1 - t0, compile_s=t2 - t1,
               trace_lower_cpu_s=c1 - c0, compile_cpu_s=c2 - c1)
    row["peak"] = row["args"] + row["out"] + row["temp"] - row["alias"]
    text = compiled.as_text()
    h = hlo_stats(text)
    row["copies_n"], row["copies_bytes"] = h["copies"]["n"], h["copies"]["bytes"]
    row["copies_top"] = h["copies"]["top"]
    row["barriers"] = text.count(" opt-barrier(")
    return row


def build(name: str, cfg: L.LlamaConfig) -> tuple[Any, Any, Any, Any]:
    """(loss_fn, trainable, frozen, tx) of one variant, all abstract."""
    model = L.Llama(cfg)
    params = L.abstract_params(model, cfg)
    apply = model.apply
    if name == "full FT":
        return (lambda t, f, b: L.lm_loss(apply(t, b[0]), b[1])), params, None, optax.adamw(LR)
    if name == "probe":
        off = {"offset": jax.ShapeDtypeStruct((cfg.d_model,), jnp.float32)}
        return (lambda t, f, b: L.lm_loss(apply(f, b[0], embed_offset=t["offset"]), b[1])), off, params, \
            optax.adamw(LR)
    if name.startswith("proto"):
        from benchmarks import proto_lazy_dense as P

        P.MODE = name.split()[1] if " " in name else "inside"
        return P.proto_variant(cfg, params, RANK, ALPHA / RANK, LR)
    import jlora

    lcfg = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=L.TARGET_REGEX)
    frozen, lora = jax.eval_shape(lambda p: jlora.init(jax.random.PRNGKey(0), p, lcfg), params)
    mode = {"jlora lazy": "lazy", "jlora merged-in-step": "merged"}[name]
    fn = jlora.lora_apply(apply, lcfg, mode=mode)

    def loss(t, f, b):
        return L.lm_loss(fn(f, t, b[0]), b[1])

    return loss, lora, frozen, jlora.optimizer(optax.adamw(LR), lora)


VARIANTS = ("full FT", "jlora lazy", "jlora merged-in-step", "probe", "proto")
DEFAULT = ("full FT", "jlora lazy", "probe")  # the figures; ~25 s for 7B on 2 idle cores
# also: "proto outside2d", "proto outside3d", "proto inside3d" (proto_lazy_dense.MODE)


def run(cfg: L.LlamaConfig, names: tuple[str, ...], log, dump: str | None = None, rounds: int = 1) -> dict[str, Any]:
    """Compiles every variant ``rounds`` times (round-robin, order rotated); memory from the first, times median."""
    rows: dict[str, Any] = {}
    times: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for k in range(rounds):
        for n in names[k % len(names):] + names[: k % len(names)]:
            loss_fn, t, f, tx = build(n, cfg)
            d = f"{dump}/{n.replace(' ', '_')}" if dump and k == 0 else None
            r = compile_step(loss_fn, t, f, tx, L.abstract_batch(cfg), d)
            rows.setdefault(n, r)
            for key in ("trace_lower_s", "compile_s", "trace_lower_cpu_s", "compile_cpu_s"):
                times[n].setdefault(key, []).append(r[key])
            log(f"{n}: temp {r['temp'] / GiB:.2f} GiB peak {r['peak'] / GiB:.2f} GiB trace+lower "
                f"{r['trace_lower_s']:.1f}s compile {r['compile_s']:.1f}s copies {r['copies_bytes'] / GiB:.2f} GiB")
    for n in names:
        for key, vals in times[n].items():
            rows[n][key] = statistics.median(vals)
            rows[n][key + "_all"] = vals
    fl = L.adapted_input_floats(cfg, RANK)
    floor = None
    if "probe" in rows:
        floor = rows["probe"]["temp"] + 4 * fl["total"]
    full = rows.get("full FT")
    for r in rows.values():
        if full:
            r["peak_x_full"] = r["peak"] / full["peak"]
            r["temp_x_full"] = r["temp"] / full["temp"]
            for key in ("trace_lower_s", "compile_s", "trace_lower_cpu_s", "compile_cpu_s"):
                r[key.replace("_s", "_x_full")] = r[key] / full[key]
        if floor:
            r["temp_x_floor"] = r["temp"] / floor
    return dict(config=dataclasses.asdict(cfg), rank=RANK, alpha=ALPHA, rows=rows, floor_temp=floor,
                adapted_input_bytes=4 * fl["inputs"], low_bytes=4 * fl["low"])


def report(res: dict[str, Any], meta: dict[str, Any]) -> str:
    c = res["config"]
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    out = [f"# LoRA train step at scale, abstract shapes ({meta['model']})", "",
           f"- model: {c['layers']} layers, d {c['d_model']}, FFN {c['ffn']}, vocab {c['vocab']}, heads "
           f"{c['heads']}/{c['kv_heads']} kv, tied {c['tied']}, f32, seq {c['seq']}, batch {c['batch']}; LoRA "
           f"r={res['rank']} alpha={res['alpha']:g} on q,k,v,o,gate,up,down; adamw; state donated",
           f"- command: `{meta['command']}`; {meta['date']}; load average {meta['load'][0]:.2f} / "
           f"{meta['load_end'][0]:.2f}; jax {jax.__version__}, XLA:CPU; total {meta['wall_s']:.0f} s",
           "- memory from `compiled.memory_analysis()`; peak = args + out + temp - aliased; ratios x full FT; "
           f"times: median of {meta['rounds']} round-robin compile(s) per variant, wall (x full FT's) and process "
           "CPU time (x full FT's; less sensitive to other load on the machine)", ""]
    if res["floor_temp"]:
        out += [f"Floor of a LoRA step's temp = probe temp + adapted kernels' inputs "
                f"({g(res['adapted_input_bytes'])} GiB: layers x tokens x (3·d + ffn) f32; q/k/v share one input, "
                f"gate/up share one) + low = x·A ({res['low_bytes'] / 2**20:.1f} MiB) = "
                f"**{g(res['floor_temp'])} GiB**.", ""]
    out += ["| variant | args GiB | out GiB | temp GiB | aliased GiB | peak GiB | peak x full | temp x full | "
            "temp x floor | trace+lower s (x full) | compile s (x full) | trace+lower x full, CPU | compile x full, CPU "
            "| copy/transpose GiB (n) | opt-barriers |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in res["rows"].items():
        out.append(f"| {n} | {g(r['args'])} | {g(r['out'])} | {g(r['temp'])} | {g(r['alias'])} | {g(r['peak'])} | "
                   f"{r.get('peak_x_full', 0):.3f} | {r.get('temp_x_full', 0):.3f} | {r.get('temp_x_floor', 0):.3f} | "
                   f"{r['trace_lower_s']:.2f} ({r.get('trace_lower_x_full', 0):.2f}) | "
                   f"{r['compile_s']:.2f} ({r.get('compile_x_full', 0):.2f}) | "
                   f"{r.get('trace_lower_cpu_x_full', 0):.2f} | {r.get('compile_cpu_x_full', 0):.2f} | "
                   f"{g(r['copies_bytes'])} ({r['copies_n']}) | {r['barriers']} |")
    out.append("")
    for n, r in res["rows"].items():
        if r["copies_top"]:
            out.append(f"- {n}, largest copies: " + "; ".join(r["copies_top"][:3]))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="llama7b")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (smoke runs)")
    ap.add_argument("--variants", default=",".join(DEFAULT),
                    help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--dump", default=None, help="XLA dump folder (HLO + buffer assignment per variant)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--rounds", type=int, default=1, help="compile each variant this many times (timing medians)")
    args = ap.parse_args(argv)
    cfg = MODELS[args.model]
    if args.layers:
        cfg = dataclasses.replace(cfg, layers=args.layers)
    names = tuple(n.strip() for n in args.variants.split(",") if n.strip())
    t0 = time.perf_counter()
    load = os.getloadavg()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    res = run(cfg, names, log, args.dump, args.rounds)
    meta = dict(model=args.model + (f" ({args.layers} layers)" if args.layers else ""), rounds=args.rounds,
                command="python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), load=load,
                load_end=os.getloadavg(), wall_s=time.perf_counter() - t0)
    md = report(res, meta)
    stem = "scale" if args.model == "llama7b" else f"scale_{args.model}"
    if args.layers:
        stem += f"_{args.layers}l"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(md)
    (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, **res), indent=1, default=str) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
