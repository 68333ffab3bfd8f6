"""GPT train step (run.py's workload): jlora lazy with and without the flat interpreter prototype.

    python benchmarks/gpt_flat.py --rounds 20 --out benchmarks/results

Variants: full fine-tuning, jlora lazy, jlora lazy + ``proto_flat`` (traced inside ``flat_lazy()``), the
hand-written fast form (ANCHORS), the probe. Losses checked equal (1e-4) before timing; wall and process
CPU time per call, ratios to full FT inside each round-robin round; compiled temp memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import variants as V  # noqa: E402
from benchmarks import workloads as W  # noqa: E402
from benchmarks.timing import fmt, round_robin  # noqa: E402


def flat_variant(wl: V.Workload) -> V.Variant:
    from benchmarks.proto_flat import flat_lazy

    v = V.jlora_lazy(wl)
    inner = v.loss_fn

    def loss(t, f, b):
        with flat_lazy():
            return inner(t, f, b)

    v.loss_fn, v.name = loss, "jlora lazy + flat (proto_flat.py)"
    return v


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import check_losses, prepare

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    cfg = W.GPTConfig(vocab=256, d_model=64, layers=2, heads=4, mlp=128, seq=16, batch=2) if args.quick \
        else W.GPTConfig()
    wl = V.gpt_workload(cfg, W.LoraSpec())
    load0 = os.getloadavg()
    vs = [V.full_ft(wl), V.jlora_lazy(wl), flat_variant(wl), V.fast_lazy(wl), V.probe(wl)]
    preps = [prepare(v, wl) for v in vs]
    ref, failures = check_losses(preps, wl)
    if failures:
        print("LOSS CHECK FAILED", failures, file=sys.stderr)
        return 1

    def stepper(p):
        def go():
            p.state[0], p.state[1], loss = p.compiled(p.state[0], p.state[1], p.v.frozen, wl.batch)
            return loss
        return go

    res = round_robin([(p.v.name, stepper(p)) for p in preps], args.rounds)
    cmd = "python benchmarks/gpt_flat.py " + " ".join(argv if argv is not None else sys.argv[1:])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"GPT train step ({cfg}), LoRA r=8 on q,k,v,o,fc1,fc2, adamw; {args.rounds} rounds; load "
             f"{load0[0]:.2f} / {os.getloadavg()[0]:.2f}; {date}; `{cmd}`; losses equal within 1e-4", "",
             "| variant | wall ms | x full FT, wall | x full FT, CPU time | temp MiB |", "|---|---|---|---|---|"]
    for p in preps:
        r = res[p.v.name]
        lines.append(f"| {p.v.name} | {r['wall_s'] * 1e3:.0f} | {fmt(r['wall_ratio'])} | {fmt(r['cpu_ratio'])} | "
                     f"{p.row['temp_bytes'] / 2**20:.1f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        (args.out / "gpt_flat_run.md").write_text(md)
        (args.out / "gpt_flat.json").write_text(json.dumps(
            {p.v.name: dict(temp=p.row["temp_bytes"], **{k: v for k, v in res[p.v.name].items()})
             for p in preps}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
