"""jlora benchmarks: LoRA train-step cost against full fine-tuning, the peers, and the floor.

    python benchmarks/run.py            # default suite (GPT decoder + conv net + inference + merge + PyTorch/PEFT)
    python benchmarks/run.py --quick    # tiny shapes, a smoke run (< 1 min)
    python benchmarks/run.py --sweep    # also: lazy/full ratio against rank and model width

Prints a markdown table and writes results.md, results.json and PNG plots to benchmarks/results/
(or --out DIR). Every JAX variant is checked to compute the same loss (1e-4 relative) before timing;
a variant that cannot run shows as a 'not available: <reason>' row.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if __name__ == "__main__" and "--quick" in sys.argv[1:]:
    # smoke run: a cheaper XLA backend pass cuts compile time ~3x; quick timings mean nothing anyway
    os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import variants as V  # noqa: E402
from benchmarks import workloads as W  # noqa: E402
from benchmarks.hlo import hlo_stats  # noqa: E402

MiB = 1024 * 1024
LOSS_RTOL = 1e-4

FULL = dict(gpt=W.GPTConfig(), conv=W.ConvConfig(), rounds=8, conv_rounds=8, fwd_rounds=6, torch_rounds=4)
QUICK = dict(gpt=W.GPTConfig(vocab=256, d_model=64, layers=2, heads=4, mlp=128, seq=16, batch=2),
             conv=W.ConvConfig(channels=(8, 16), image=8, batch=4),
             rounds=3, conv_rounds=3, fwd_rounds=3, torch_rounds=2)


# --------------------------------------------------------------------------------------------
# measurement


def tree_bytes(tree: Any) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def tree_size(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree) if hasattr(x, "size"))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@dataclasses.dataclass
class Prepared:
    v: V.Variant
    compiled: Any
    state: list
    row: dict


def check_losses(preps: list[Prepared], wl: V.Workload) -> tuple[float, list[str]]:
    """Every variant's loss at its initial weights (returned by its first step) must match full FT's (LOSS_RTOL)."""
    base_loss = float(jax.jit(lambda p, b: wl.loss_of_output(wl.model.apply(p, b[0]), b[1]))(wl.params, wl.batch))
    ref = preps[0].row["loss0"]  # the first variant is full fine-tuning at W0 + s·A@B
    if rel(ref, base_loss) <= LOSS_RTOL:  # a variant ignoring LoRA altogether must fail the check
        raise AssertionError(f"{wl.name}: the LoRA factors barely change the loss ({ref} vs base {base_loss}); "
                             "the loss check would mean nothing")
    failures = []
    for p in preps:
        loss = p.row["loss0"]
        if not rel(loss, ref) <= LOSS_RTOL:
            failures.append(p.v.name)
            p.v.error = f"FAILED loss check: {loss:.6f} vs full FT {ref:.6f} (rel {rel(loss, ref):.1e})"
    return ref, failures


def prepare(v: V.Variant, wl: V.Workload) -> Prepared:
    trainable = V.copy_tree(v.trainable)
    opt_state = v.tx.init(trainable)
    step = V.train_step(v.loss_fn, v.tx)
    t0 = time.perf_counter()
    lowered = step.lower(trainable, opt_state, v.frozen, wl.batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    stats = hlo_stats(compiled.as_text())
    row = dict(
        name=v.name, note=v.note, trainable=tree_size(v.trainable), opt_bytes=tree_bytes(opt_state),
        arg_bytes=getattr(mem, "argument_size_in_bytes", None), out_bytes=getattr(mem, "output_size_in_bytes", None),
        temp_bytes=getattr(mem, "temp_size_in_bytes", None), alias_bytes=getattr(mem, "alias_size_in_bytes", None),
        flops=float(cost.get("flops", float("nan"))) if cost else float("nan"),
        trace_lower_s=t1 - t0, compile_s=t2 - t1, hlo=stats,
    )
    state = [trainable, opt_state]
    for i in range(2):  # warm-up (first runs allocate); the first step's loss is the loss at the initial weights
        state[0], state[1], loss = compiled(state[0], state[1], v.frozen, wl.batch)
        if i == 0:
            row["loss0"] = float(loss)
    return Prepared(v, compiled, state, row)


def time_round_robin(preps: list[Prepared], batch: tuple, rounds: int) -> None:
    """One step of each variant per round, order rotated each round; ratios are taken within a round."""
    times: dict[str, list[float]] = {p.v.name: [] for p in preps}
    cpu: dict[str, list[float]] = {p.v.name: [] for p in preps}
    for r in range(rounds):
        order = preps[r % len(preps):] + preps[: r % len(preps)]
        for p in order:
            c0, t0 = time.process_time(), time.perf_counter()
            p.state[0], p.state[1], loss = p.compiled(p.state[0], p.state[1], p.v.frozen, batch)
            loss.block_until_ready()
            times[p.v.name].append(time.perf_counter() - t0)
            cpu[p.v.name].append(time.process_time() - c0)
    full, full_cpu = times[preps[0].v.name], cpu[preps[0].v.name]
    for p in preps:
        t = times[p.v.name]
        ratios = [a / b for a, b in zip(t, full)]
        p.row.update(times=t, median_s=statistics.median(t), ratio=statistics.median(ratios),
                     ratio_min=min(ratios), ratio_max=max(ratios), cpu_times=cpu[p.v.name],
                     cpu_ratio=statistics.median(a / b for a, b in zip(cpu[p.v.name], full_cpu)))


def bench_training(wl: V.Workload, builders, rounds: int, log) -> dict[str, Any]:
    vs = [b(wl) for b in builders]
    preps = []
    for v in vs:
        if v.error:
            continue
        try:
            preps.append(prepare(v, wl))
            r = preps[-1].row
            log(f"[{wl.name}] compiled {v.name}: trace+lower {r['trace_lower_s']:.1f}s compile {r['compile_s']:.1f}s")
        except Exception as exc:  # noqa: BLE001
            v.error = V.unavailable(v.name, exc).error
    ref, failures = check_losses(preps, wl)
    preps = [p for p in preps if not p.v.error]
    log(f"[{wl.name}] loss check: reference {ref:.6f}; "
        + ", ".join(f"{v.name}: {'OK' if not v.error else v.error[:60]}" for v in vs))
    time_round_robin(preps, wl.batch, rounds)
    full = preps[0].row
    rows = []
    for v in vs:
        if v.error:
            rows.append(dict(name=v.name, note=v.note, error=v.error))
            continue
        row = next(p.row for p in preps if p.v is v)
        row["flops_ratio"] = row["flops"] / full["flops"]
        rows.append(row)
    return dict(rows=rows, ref_loss=ref, loss_failures=failures, rounds=rounds,
                config=dataclasses.asdict(wl.cfg), lora=dataclasses.asdict(wl.lora))


def bench_inference(wl: V.Workload, vs: list[V.Variant], rounds: int) -> dict[str, Any]:
    """Forward-only time of base, merged (jlora.merge once), merge-in-forward and the lazy forms, x base."""
    base_fn = jax.jit(lambda p, x: wl.model.apply(p, x))
    merged = wl.merged
    x = wl.batch[0]
    fwd = [("base (W0 + s·A@B stored)", base_fn, (merged, x))]
    try:
        jlora = V.import_jlora()
        cfg = jlora.LoraConfig(rank=wl.lora.rank, alpha=wl.lora.alpha, targets=wl.regex)
        merged_j = jax.jit(lambda f, l: jlora.merge(f, l, cfg))(wl.params, V.lora_tree(wl.factors))
        fwd.append(("jlora.merge once, then base apply", base_fn, (merged_j, x)))
    except Exception as exc:  # noqa: BLE001
        fwd.append(("jlora.merge once, then base apply", None, V.unavailable("", exc).error))
    for v in vs:
        if v.name == "full fine-tuning" or v.name.startswith("probe"):
            continue
        if v.error or v.forward is None:
            fwd.append((v.name, None, v.error or "no forward"))
            continue
        fwd.append((v.name, jax.jit(v.forward), (v.trainable, v.frozen, x)))
    rows, runs = [], []
    ref = np.asarray(base_fn(merged, x))
    for name, fn, args in fwd:
        if fn is None:
            rows.append(dict(name=name, error=args))
            continue
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        out = np.asarray(compiled(*args)).reshape(ref.shape)
        err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
        mem = compiled.memory_analysis()
        row = dict(name=name, max_rel_err=err, compile_s=compile_s, temp_bytes=getattr(mem, "temp_size_in_bytes", None))
        rows.append(row)
        runs.append((row, compiled, args))
    times = {id(r): [] for r, _, _ in runs}
    for r in range(rounds):
        order = runs[r % len(runs):] + runs[: r % len(runs)]
        for row, compiled, args in order:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[id(row)].append(time.perf_counter() - t0)
    base_t = times[id(runs[0][0])]
    for row, _, _ in runs:
        t = times[id(row)]
        ratios = [a / b for a, b in zip(t, base_t)]
        row.update(median_s=statistics.median(t), ratio=statistics.median(ratios), ratio_min=min(ratios),
                   ratio_max=max(ratios))
    return dict(rows=rows, rounds=rounds)


def bench_merge(wl: V.Workload, reps: int = 5) -> dict[str, Any]:
    try:
        jlora = V.import_jlora()
        cfg = jlora.LoraConfig(rank=wl.lora.rank, alpha=wl.lora.alpha, targets=wl.regex)
        lora = V.lora_tree(wl.factors)
        jitted = jax.jit(lambda f, l: jlora.merge(f, l, cfg))
        t0 = time.perf_counter()
        jax.block_until_ready(jitted(wl.params, lora))
        first = time.perf_counter() - t0
        jit_t, eager_t = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(jitted(wl.params, lora))
            jit_t.append(time.perf_counter() - t0)
        for _ in range(max(2, reps // 2)):
            t0 = time.perf_counter()
            out = jax.block_until_ready(jlora.merge(wl.params, lora, cfg))
            eager_t.append(time.perf_counter() - t0)
        ref = wl.merged
        err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
        return dict(first_call_s=first, jit_s=statistics.median(jit_t), eager_s=statistics.median(eager_t),
                    max_abs_err=err, kernels=len(wl.factors))
    except Exception as exc:  # noqa: BLE001
        return dict(error=V.unavailable("", exc).error)


def bench_torch(wl: V.Workload, rounds: int) -> dict[str, Any]:
    try:
        from benchmarks.torch_peft import run_torch

        flat = {k: np.asarray(v) for k, v in V.flat(wl.params).items()}
        flat_m = {k: np.asarray(v) for k, v in V.flat(wl.merged).items()}
        return run_torch(wl.cfg, wl.lora, flat, flat_m, wl.factors, wl.batch, rounds)
    except Exception as exc:  # noqa: BLE001
        return dict(error=V.unavailable("", exc).error)


def bench_sweep(log, quick: bool) -> dict[str, Any]:
    """Lazy/full ratio against rank (fixed width) and against width (fixed rank, 1 layer)."""
    builders = (V.full_ft, V.jlora_lazy, V.fast_lazy, V.probe)
    if quick:
        ranks, widths = (1, 8), (32, 64)
        base = QUICK["gpt"]
        rounds = 2
    else:
        ranks, widths = (1, 4, 16, 64), (256, 512, 1024, 2048)
        base = W.GPTConfig(layers=2)
        rounds = 3
    out: dict[str, Any] = {"rank": [], "width": []}
    for r in ranks:
        wl = V.gpt_workload(base, W.LoraSpec(rank=r, alpha=2.0 * r))
        res = bench_training(wl, builders, rounds, log)
        out["rank"].append(dict(x=r, rows=res["rows"]))
        log(f"[sweep] rank {r}: " + _ratios_line(res["rows"]))
    for d in widths:
        cfg = dataclasses.replace(base, d_model=d, mlp=4 * d, heads=max(1, d // 64), layers=1,
                                  batch=base.batch if quick else 4)
        wl = V.gpt_workload(cfg, W.LoraSpec())
        res = bench_training(wl, builders, rounds, log)
        out["width"].append(dict(x=d, rows=res["rows"]))
        log(f"[sweep] width {d}: " + _ratios_line(res["rows"]))
    out["config"] = dict(rank_base=dataclasses.asdict(base), width_layers=1, rounds=rounds)
    return out


def _ratios_line(rows) -> str:
    return ", ".join(f"{r['name']}: {r['ratio']:.2f}" if "ratio" in r else f"{r['name']}: n/a" for r in rows)


# --------------------------------------------------------------------------------------------
# report


def machine_info() -> dict[str, Any]:
    def ver(p):
        try:
            return importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        cpu_count=os.cpu_count(), cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        platform=platform.platform(), processor=platform.processor() or platform.machine(),
        python=platform.python_version(), jax_backend=jax.default_backend(),
        versions={p: ver(p) for p in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "peft", "qwix")},
        loadavg_start=os.getloadavg(), xla_flags=os.environ.get("XLA_FLAGS", ""),
    )


def _mib(b) -> str:
    return "—" if b is None else f"{b / MiB:.1f}"


def _peak(r: dict[str, Any]) -> int | None:
    """Compiled peak of a step whose trainable and optimizer state are donated: args + out + temp - aliased."""
    parts = [r.get(k) for k in ("arg_bytes", "out_bytes", "temp_bytes", "alias_bytes")]
    return None if any(p is None for p in parts) else parts[0] + parts[1] + parts[2] - parts[3]


def _n(x: int) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else (f"{x / 1e3:.1f}k" if x >= 1e3 else str(x))


def training_table(res: dict[str, Any]) -> str:
    head = ("| variant | step ms | x full FT median [min–max] | x full FT, CPU time | XLA FLOPs x full | trainable | "
            "opt state MiB | args / out / temp MiB | peak MiB (x full) | trace+lower / compile s | "
            "copy/transpose ops n / MiB | thin slow dots n / MFLOP | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    peaks = {r["name"]: _peak(r) for r in res["rows"] if "error" not in r}
    full_peak = next(iter(peaks.values()), None)
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['error']} | | | | | | | | | | | {r.get('note', '')} |")
            continue
        h = r["hlo"]
        pk = peaks[r["name"]]
        peak = "—" if pk is None or not full_peak else f"{pk / MiB:.0f} ({pk / full_peak:.2f})"
        lines.append(
            f"| {r['name']} | {r['median_s'] * 1e3:.0f} | {r['ratio']:.2f} [{r['ratio_min']:.2f}–{r['ratio_max']:.2f}] "
            f"| {r.get('cpu_ratio', float('nan')):.3f} | {r['flops_ratio']:.2f} | {_n(r['trainable'])} | {_mib(r['opt_bytes'])} | "
            f"{_mib(r['arg_bytes'])} / {_mib(r['out_bytes'])} / {_mib(r['temp_bytes'])} | {peak} | "
            f"{r['trace_lower_s']:.1f} / {r['compile_s']:.1f} | {h['copies']['n']} / {h['copies']['bytes'] / MiB:.0f} | "
            f"{h['thin_dots']['n']} / {h['thin_dots']['flops'] / 1e6:.0f} | {r['note']} |")
    return "\n".join(lines)


FORWARD_NAMES = {"jlora merged-in-step": "jlora mode='merged' (merge inside the jitted forward)"}


def inference_table(res: dict[str, Any]) -> str:
    lines = ["| forward | ms | x base median [min–max] | temp MiB | max rel. err vs base |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        r = {**r, "name": FORWARD_NAMES.get(r["name"], r["name"])}
        if "error" in r:
            lines.append(f"| {r['name']} | {r['error']} | | | |")
        else:
            lines.append(f"| {r['name']} | {r['median_s'] * 1e3:.1f} | {r['ratio']:.2f} "
                         f"[{r['ratio_min']:.2f}–{r['ratio_max']:.2f}] | {_mib(r['temp_bytes'])} | {r['max_rel_err']:.1e} |")
    return "\n".join(lines)


PROFILED = ("jlora lazy", "hand-written lazy (naive)", "hand-written lazy (fast, ANCHORS)", "probe: no weight gradients")


def profile_section(res: dict[str, Any]) -> list[str]:
    """The largest copy/transpose ops and thin non-row-major dots of each lazy variant's compiled step."""
    out = ["### What the compiled steps show (largest copy/transpose ops; thin non-row-major dots)", ""]
    for r in res["rows"]:
        if r["name"] not in PROFILED or "hlo" not in r:
            continue
        h = r["hlo"]
        out.append(f"- **{r['name']}**: {h['copies']['n']} copy/transpose ops, {h['copies']['bytes'] / MiB:.0f} MiB; "
                   f"{h['thin_dots']['n']} thin slow dots, {h['thin_dots']['flops'] / 1e6:.0f} MFLOP")
        out += [f"  - {line}" for line in h["copies"]["top"][:4] + h["thin_dots"]["top"][:4]]
    return out + [""]


def report(results: dict[str, Any]) -> str:
    m = results["meta"]
    out = [f"# jlora benchmarks ({results['mode']})", "",
           f"- date: {m['date']}; machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable), {m['processor']}, "
           f"{m['platform']}, backend {m['jax_backend']}",
           f"- load average at start / end: {m['loadavg_start'][0]:.2f} / {m['loadavg_end'][0]:.2f} "
           "(other processes share these cores; ratios are taken within one round-robin round to cancel that)",
           "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f", python {m['python']}",
           f"- command: `{results['command']}`; total wall time {results['wall_s']:.0f} s", ""]
    g = results.get("gpt")
    if g:
        out += gpt_section(g)
    t = results.get("torch")
    if t:
        out += torch_section(t, g)
    cv = results.get("conv")
    if cv:
        c = cv["config"]
        out += [f"## Train step, conv net (channels {c['channels']}, {c['image']}x{c['image']}x3, batch {c['batch']}), "
                f"conv LoRA r={cv['lora']['rank']} alpha={cv['lora']['alpha']:g} on every conv kernel", "",
                training_table(cv), ""]
    inf = results.get("inference")
    if inf:
        out += [f"## Inference forward, GPT decoder (median of {inf['rounds']} rounds, ratio to base)", "",
                inference_table(inf), ""]
    mg = results.get("merge")
    if mg:
        out += ["## jlora.merge, whole GPT decoder", ""]
        if "error" in mg:
            out += [mg["error"], ""]
        else:
            out += [f"{mg['kernels']} kernels: jitted {mg['jit_s'] * 1e3:.1f} ms (first call incl. compile "
                    f"{mg['first_call_s']:.2f} s), eager {mg['eager_s'] * 1e3:.1f} ms; max abs error vs float32 "
                    f"W0 + s·A@B: {mg['max_abs_err']:.1e}", ""]
    sw = results.get("sweep")
    if sw:
        c = sw["config"]["rank_base"]
        out += ["## Sweep: LoRA step / full FT step (median of "
                f"{sw['config']['rounds']} round-robin rounds)", "",
                f"Rank sweep: the decoder with {c['layers']} layers, d {c['d_model']}, alpha = 2·rank (s = 2). "
                "Width sweep: 1 layer, MLP 4d, heads d/64, r=8, batch 4."]
        sm = results.get("sweep_meta")
        if sm:
            out.append(f"Measured separately (`{sm['command']}`, {sm['date']}, load {sm['loadavg_start'][0]:.1f} / "
                       f"{sm['loadavg_end'][0]:.1f}, {sm['wall_s']:.0f} s).")
        out.append("")
        for axis in ("rank", "width"):
            names = [r["name"] for r in sw[axis][0]["rows"]]
            out += [f"| {axis} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for pt in sw[axis]:
                out.append(f"| {pt['x']} | " + " | ".join(
                    f"{r['ratio']:.2f}" if "ratio" in r else "n/a" for r in pt["rows"]) + " |")
            out.append("")
    if results.get("plots"):
        out += ["Plots: " + ", ".join(f"`{p}`" for p in results["plots"]), ""]
    return "\n".join(out)


def gpt_section(g: dict[str, Any]) -> list[str]:
    c = g["config"]
    out = [f"## Train step, GPT decoder (vocab {c['vocab']}, d {c['d_model']}, {c['layers']} layers, {c['heads']} heads, "
            f"MLP {c['mlp']}, seq {c['seq']}, batch {c['batch']}, f32), LoRA r={g['lora']['rank']} "
            f"alpha={g['lora']['alpha']:g} on q,k,v,o,fc1,fc2, adamw", "",
            f"Median of {g['rounds']} round-robin rounds (one step of each variant per round); ratio = variant / full FT "
            f"in the same round. All variants' losses equal full FT's ({g['ref_loss']:.6f}) within {LOSS_RTOL:g} relative. "
            "'copy/transpose ops': every copy/transpose instruction (fused or not) in the compiled step; "
            "'thin slow dots': low-rank matmuls (an output side <= 64) whose large lhs contracts its major (token) axis, a form XLA:CPU runs ~8x slower than row-major (benchmarks/hlo.py).", "", training_table(g), ""]
    return out + profile_section(g)


def torch_section(t: dict[str, Any], g: dict[str, Any] | None) -> list[str]:
    ref = f"{g['ref_loss']:.6f}" if g else "—"
    out = ["## PyTorch (same model, same weights), full FT vs PEFT LoRA, "
           f"torch.set_num_threads({t.get('threads', 2)})", ""]
    if "error" in t:
        return out + [t["error"], ""]
    rs = t["ratios"]
    return out + ["| variant | step ms | x full FT median [min–max] | trainable | loss (JAX full FT: "
                  f"{ref}) |", "|---|---|---|---|---|",
                  f"| PyTorch full FT | {statistics.median(t['times']['full']) * 1e3:.0f} | 1.00 | "
                  f"{_n(t['trainable']['full'])} | {t['losses']['full']:.6f} |",
                  f"| PyTorch + PEFT LoRA | {statistics.median(t['times']['peft']) * 1e3:.0f} | "
                  f"{statistics.median(rs):.2f} [{min(rs):.2f}–{max(rs):.2f}] | {_n(t['trainable']['peft'])} | "
                  f"{t['losses']['peft']:.6f} |", ""]


def plot(results: dict[str, Any], outdir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    panels = [(k, results[k]) for k in ("gpt", "conv") if results.get(k)]
    if panels:
        files.append(_plot_steps(plt, panels, outdir))
    sw = results.get("sweep")
    if sw:
        files.append(_plot_sweep(plt, sw, outdir))
    return files


def _plot_steps(plt, panels, outdir: Path) -> str:
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), squeeze=False)
    for ax, (k, res) in zip(axes[0], panels):
        rows = [r for r in res["rows"] if "ratio" in r]
        names = [r["name"] for r in rows]
        med = [r["ratio"] for r in rows]
        err = [[r["ratio"] - r["ratio_min"] for r in rows], [r["ratio_max"] - r["ratio"] for r in rows]]
        ax.barh(names, med, xerr=err, color=["#888" if n == "full fine-tuning" else "#4a7" for n in names])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.axvline(0.70, color="r", lw=0.8, ls="--", label="0.70x target")
        ax.invert_yaxis()
        ax.set_xlabel("train step time / full fine-tuning (median, min–max)")
        ax.set_title(f"{k}: LoRA train step vs full FT")
        ax.legend(loc="lower right")
    fig.tight_layout()
    p = outdir / "step_ratio.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p.name


def _plot_sweep(plt, sw, outdir: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, axis in zip(axes, ("rank", "width")):
        names = [r["name"] for r in sw[axis][0]["rows"] if r["name"] != "full fine-tuning"]
        for n in names:
            xs, ys = [], []
            for pt in sw[axis]:
                r = next(r for r in pt["rows"] if r["name"] == n)
                if "ratio" in r:
                    xs.append(pt["x"])
                    ys.append(r["ratio"])
            if xs:
                ax.plot(xs, ys, marker="o", label=n)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank" if axis == "rank" else "model width d (1 layer, MLP 4d)")
        ax.set_ylabel("step time / full FT")
        ax.set_title(f"LoRA/full ratio vs {axis}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = outdir / "sweep.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p.name


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few rounds: a smoke run")
    ap.add_argument("--sweep", action="store_true", help="also sweep rank and model width")
    ap.add_argument("--sweep-only", action="store_true",
                    help="only the sweep; writes sweep.md / sweep.json / sweep.png beside results.md")
    ap.add_argument("--render", action="store_true",
                    help="no measuring: re-render results.md and plots from results.json (+ sweep.json if present)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output folder")
    ap.add_argument("--rounds", type=int, default=None, help="round-robin rounds for the GPT train step")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch/PEFT comparison")
    ap.add_argument("--no-conv", action="store_true", help="skip the conv net")
    args = ap.parse_args(argv)
    setup = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    results: dict[str, Any] = dict(mode="quick" if args.quick else "default", meta=machine_info(),
                                   command="python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.render:
        return render(args.out)
    if args.sweep_only:
        results["sweep"] = bench_sweep(log, args.quick)
        return _write(results, args.out, "sweep", t_start)
    lora = W.LoraSpec(rank=8, alpha=16.0)
    gpt = V.gpt_workload(setup["gpt"], lora)
    results["gpt"] = bench_training(gpt, V.GPT_VARIANTS, args.rounds or setup["rounds"], log)
    fwd_builders = V.GPT_VARIANTS if not args.quick else (V.jlora_lazy, V.jlora_merged, V.fast_lazy)
    results["inference"] = bench_inference(gpt, [b(gpt) for b in fwd_builders], setup["fwd_rounds"])
    log("[gpt] inference done")
    results["merge"] = bench_merge(gpt)
    if not args.no_torch:
        results["torch"] = bench_torch(gpt, setup["torch_rounds"])
        log("[torch] done")
    if not args.no_conv:
        conv = V.conv_workload(setup["conv"], lora)
        conv_builders = V.CONV_VARIANTS if not args.quick else (V.full_ft, V.jlora_lazy, V.jlora_merged, V.probe)
        results["conv"] = bench_training(conv, conv_builders, setup["conv_rounds"], log)
    if args.sweep:
        results["sweep"] = bench_sweep(log, args.quick)
    return _write(results, args.out, "results", t_start)


def render(out: Path) -> int:
    """Re-renders results.md and the plots from results.json, adding sweep.json's sweep when present."""
    results = json.loads((out / "results.json").read_text())
    sweep = out / "sweep.json"
    if "sweep" not in results and sweep.exists():
        sw = json.loads(sweep.read_text())
        results["sweep"] = sw["sweep"]
        results["sweep_meta"] = dict(sw["meta"], command=sw["command"], wall_s=sw["wall_s"])
    results["plots"] = plot(results, out)
    md = report(results)
    (out / "results.md").write_text(md + "\n")
    print(md)
    return 0


def _write(results: dict[str, Any], out: Path, stem: str, t_start: float) -> int:
    results["meta"]["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t_start
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = plot(results, out)
    md = report(results)
    (out / f"{stem}.md").write_text(md + "\n")
    (out / f"{stem}.json").write_text(json.dumps(_jsonable(results), indent=1, default=str) + "\n")
    print(md)
    failures = [n for k in ("gpt", "conv") for n in (results.get(k) or {}).get("loss_failures", [])]
    if failures:
        print(f"\nLOSS CHECK FAILED for: {failures}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
