"""The GPT train step with a bfloat16 base (issue 17, item 6): full fine-tuning in bf16 against LoRA
with a bf16 frozen base and float32 factors (jlora's default), side by side in one run.

    python benchmarks/bf16.py                 # GPT workload of run.py, 8 round-robin rounds
    python benchmarks/bf16.py --workload conv # the conv net of run.py (images cast to bf16 too)
    python benchmarks/bf16.py --quick         # tiny shapes

Variants: full fine-tuning (every weight bf16, adamw), jlora lazy and merged-in-step (frozen bf16,
factors f32: the low-rank branch runs in f32 and is cast once to the base's dtype), jlora lazy with
bf16 factors (``jlora.init(..., dtype=jnp.bfloat16)``: one dtype, so conv LoRA can take its merged-kernel
form), and the probe (no weight gradients). Losses at the initial weights are reported beside (bf16 rounding differs
between forms, so they agree to ~1e-2, not 1e-4). Ratios are taken within each round.
XLA:CPU turns bf16 dots into f32 copies (see ANCHORS), so CPU ratios say little about accelerators.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import run as R  # noqa: E402
from benchmarks import variants as V  # noqa: E402
from benchmarks import workloads as W  # noqa: E402


def bf16(tree):
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workload", choices=("gpt", "conv"), default="gpt")
    args = ap.parse_args(argv)
    if args.workload == "gpt":
        wl = V.gpt_workload(R.QUICK["gpt"] if args.quick else W.GPTConfig(), W.LoraSpec())
    else:
        wl = V.conv_workload(R.QUICK["conv"] if args.quick else W.ConvConfig(), W.LoraSpec())
        wl = dataclasses.replace(wl, batch=(bf16(wl.batch[0]), wl.batch[1]))
    wl = dataclasses.replace(wl, params=bf16(wl.params))
    variants = []
    for build in (V.full_ft, V.jlora_lazy, V.jlora_merged, V.probe):
        v = build(wl)
        if v.error is None and build is V.full_ft:
            v.trainable = bf16(v.trainable)
        if v.error is None and build is V.probe:
            v.frozen = bf16(v.frozen)
        variants.append(v)
        if v.error is None and build is V.jlora_lazy:  # also with bf16 factors (jlora.init(..., dtype=bf16))
            v16 = build(wl)
            v16.name, v16.trainable = "jlora lazy, bf16 factors", bf16(v16.trainable)
            variants.append(v16)
    preps = [R.prepare(v, wl) for v in variants if v.error is None]
    R.time_round_robin(preps, wl.batch, args.rounds)
    load = os.getloadavg()[0]
    lines = [f"{args.workload.upper()} step, bf16 base (LoRA factors f32 unless named); {args.rounds} rounds; load {load:.2f}; "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; `python benchmarks/bf16.py"
             f"{' --quick' if args.quick else ''} --workload {args.workload} --rounds {args.rounds}`", "",
             "| variant | step ms | x full FT, median [min-max] | loss at init | temp MiB |", "|---|---|---|---|---|"]
    for p in preps:
        r = p.row
        lines.append(f"| {p.v.name} | {1e3 * r['median_s']:.1f} | {r['ratio']:.3f} [{r['ratio_min']:.2f}-"
                     f"{r['ratio_max']:.2f}] | {r['loss0']:.4f} | {r['temp_bytes'] / 2**20:.0f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
