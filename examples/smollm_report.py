"""Reporting for ``examples/finetune_smollm.py``: the transformers + PEFT cross-check, the table, the plot."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from examples import chat_sft


LOGIT_TOLERANCE = 2e-4
"""Largest |logit difference| the check accepts: each side is float32, ~1e-4 from a float64 run on logits
up to ~40 (30 layers of rounding), so two correct implementations agree within about twice that."""


@contextlib.contextmanager
def phase(title: str) -> Iterator[Callable[[str], None]]:
    """Prints ``title ...`` now and, when the block calls ``done(result)``, the result and the seconds on
    the same line: one line per phase, visible while it runs.

    >>> with phase("saving") as done:
    ...     done("ok")                                                      # doctest: +ELLIPSIS
    saving ... ok (0 s)
    """
    t0 = time.perf_counter()
    print(f"{title} ... ", end="", flush=True)
    finished = []

    def done(result: str) -> None:
        finished.append(True)
        print(f"{result} ({time.perf_counter() - t0:.0f} s)", flush=True)

    try:
        yield done
    finally:
        if not finished:
            print("failed", flush=True)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers + peft without their progress bars, info logs and warnings, for the ``with`` block only:
    transformers' own switches (``disable_progress_bar``, ``set_verbosity_error``), its GGUF loader's
    plain-tqdm bar turned off in that module, the bitsandbytes import note (peft imports it when it is
    installed) kept below ERROR, and the FutureWarning peft triggers through transformers
    (``is_gradient_checkpointing``) filtered. Everything is as it was afterwards.

    >>> with quiet_transformers():
    ...     pass
    """
    import transformers.modeling_gguf_pytorch_utils as gguf_loader
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    bnb = logging.getLogger("bitsandbytes")
    bnb_level, gguf_tqdm = bnb.level, gguf_loader.tqdm
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    bnb.setLevel(logging.ERROR)
    gguf_loader.tqdm = functools.partial(gguf_tqdm, disable=True)  # "Converting and de-quantizing GGUF tensors"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        gguf_loader.tqdm = gguf_tqdm
        bnb.setLevel(bnb_level)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def check_line(check: dict[str, Any]) -> str:
    """The one-line summary of :func:`peft_check`'s result.

    >>> check_line({"logits": {"max_abs_diff": 1e-4, "max_abs_logit": 38.0, "tolerance": 2e-4, "within": True},
    ...             "greedy_replies": {"identical": 4, "n": 4}})
    'max |logit diff| 1.0e-04 (tolerance 2.0e-04: within; logits up to 38.0), identical greedy replies 4/4'
    """
    lg, gr = check["logits"], check["greedy_replies"]
    return (f"max |logit diff| {lg['max_abs_diff']:.1e} (tolerance {lg['tolerance']:.1e}: "
            f"{'within' if lg['within'] else 'EXCEEDED'}; logits up to {lg['max_abs_logit']:.1f}), "
            f"identical greedy replies {gr['identical']}/{gr['n']}")


def peft_check(gguf: Path, peft_dir: Path, model: Any, params: Any, lora: Any, config: jlora.LoraConfig,
               tokenizer: Any, chat: Any, examples: Sequence[Any], answers: Sequence[str],
               our_reply_ids: Sequence[Sequence[int]], eos_id: int, max_new_tokens: int) -> dict[str, Any]:
    """Loads the same GGUF in transformers, the exported adapter with PEFT, and compares with jlora.

    Logits: the full conversations (prompt + reference answer) through jlora's lazy LoRA forward vs
    ``PeftModel`` (float32, eager attention), at every real token. Generations: transformers'
    greedy ``generate`` on each unpadded prompt vs jlora's replies (batched, left-padded, merged).

    Returns ``{"logits": {"max_abs_diff", "max_abs_logit", "tolerance", "within"}, "greedy_replies":
    {"identical", "n"}}`` (``within``: ``max_abs_diff <= tolerance``, :data:`LOGIT_TOLERANCE`).

    >>> peft_check(gguf, peft_dir, model, params, lora, cfg, tok, chat, exs, ans, ids, 2, 40)  # doctest: +SKIP
    """
    with quiet_transformers():
        return _peft_check(gguf, peft_dir, model, params, lora, config, tokenizer, chat, examples, answers,
                           our_reply_ids, eos_id, max_new_tokens)


def _peft_check(gguf: Path, peft_dir: Path, model: Any, params: Any, lora: Any, config: jlora.LoraConfig,
                tokenizer: Any, chat: Any, examples: Sequence[Any], answers: Sequence[str],
                our_reply_ids: Sequence[Sequence[int]], eos_id: int, max_new_tokens: int) -> dict[str, Any]:
    import torch
    import transformers
    from peft import PeftModel

    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                           attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(hf, str(peft_dir)).eval()
    rows = [chat_sft.encode_chat(tokenizer, chat, ex.messages, ans, eos_id) for ex, ans in zip(examples, answers)]
    width = max(len(r) for r, _ in rows)
    batch = chat_sft.make_batch(rows, width, width, eos_id)
    fwd = jax.jit(jlora.lora_apply(model.apply, config, mode="lazy"))
    ours = np.asarray(fwd(params, lora, jnp.asarray(batch.ids), jnp.asarray(batch.mask)))
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor(batch.ids, dtype=torch.long),
                         attention_mask=torch.tensor(batch.mask, dtype=torch.long)).logits.numpy()
    real = batch.mask.astype(bool)
    diff = float(np.abs(ours[real] - ref[real]).max())
    same = 0
    for (row, n_prompt), mine in zip(rows, our_reply_ids):
        with torch.no_grad():
            out = peft_model.generate(input_ids=torch.tensor([row[:n_prompt]]), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id)
        same += out[0, n_prompt:].tolist() == list(mine)
    return {"logits": {"max_abs_diff": diff, "max_abs_logit": float(np.abs(ref[real]).max()),
                       "tolerance": LOGIT_TOLERANCE, "within": diff <= LOGIT_TOLERANCE},
            "greedy_replies": {"identical": same, "n": len(rows)}}


def _fmt(m: dict[str, float] | None, key: str) -> str:
    return "-" if m is None else f"{m[key]:.3f}"


def print_table(r: dict[str, Any]) -> None:
    """The summary: trainable share, adapter size, times, throughput, held-out metrics (no NaN rows)."""
    check = r.get("peft_check")
    rows = [
        ("trainable params", f"{r['trainable_params']:,} of {r['total_params']:,} ({100 * r['trainable_share']:.2f}%)"),
        ("LoRA", f"rank {r['rank']}, {len(r['targets'])} target rule(s), training mode {r['mode']}"),
        ("adapter on disk", f"{r['adapter_bytes_on_disk'] / 2**20:.2f} MiB"),
        ("frozen base", f"{r['base']}{' (LoftQ init)' if r.get('init') == 'loftq' else ''}, "
                        f"{r['base_bytes'] / 2**20:.1f} MiB" if "base" in r else "float32"),
        ("train step memory", f"peak {r['step_memory']['peak'] / 2**20:.0f} MiB (temp "
                              f"{r['step_memory']['temp'] / 2**20:.0f} MiB; compiled memory_analysis)"
         if "step_memory" in r else "not measured"),
        ("training", f"{r['steps']} steps x {r['batch_size']} conversations in {r['train_seconds']:.0f} s "
                     f"({r['seconds_per_step']:.2f} s/step after compilation, "
                     f"{r['train_tokens_per_step'] / max(r['seconds_per_step'], 1e-9):.0f} tokens/s)"),
        ("generation", f"{r['generation_tokens_per_s']:.1f} tokens/s (greedy, batched, KV cache)"
         if r["held_out"] else "skipped (--eval-size 0)"),
        ("transformers + PEFT", "skipped" if check is None else check_line(check)),
        ("total wall time", f"{r['total_seconds']:.0f} s ({r['cpu_seconds']:.0f} CPU s)"),
    ]
    w = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{w}}  {v}" for k, v in rows))
    if not r["held_out"]:
        print("\nheld-out scoring skipped (--eval-size 0)")
        return
    print(f"\n{'held-out (' + str(r['held_out']) + ')':<18} {'exact match':>12} {'field F1':>9} {'valid JSON':>11}")
    for name, m in (("zero-shot", r["zero_shot"]), ("LoRA", r["lora"])):
        print(f"{name:<18} {_fmt(m, 'exact_match'):>12} {_fmt(m, 'field_f1'):>9} {_fmt(m, 'valid_json'):>11}")


def plot(r: dict[str, Any], path: Path) -> Path:
    """Loss curve and before/after metric bars, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    loss = np.asarray(r["losses"])
    ax1.plot(loss, alpha=0.4, label="loss")
    k = min(5, len(loss))
    ax1.plot(np.arange(k - 1, len(loss)), np.convolve(loss, np.ones(k) / k, mode="valid"), label=f"mean of {k}")
    ax1.set(xlabel="step", ylabel="answer-token NLL", title="LoRA instruction-tuning of SmolLM2-135M-Instruct")
    ax1.legend()
    names = ["exact_match", "field_f1", "valid_json"]
    x = np.arange(len(names))
    if r["held_out"]:
        for dx, label in ((-0.2, "zero_shot"), (0.2, "lora")):
            bars = ax2.bar(x + dx, [r[label][n] for n in names], 0.4, label=label.replace("_", "-"))
            ax2.bar_label(bars, fmt="%.2f", fontsize=8)
        ax2.legend(loc="upper center", ncol=2)
    ax2.set_xticks(x, names)
    ax2.set(ylim=(0, 1.25), title=f"JSON extraction, {r['held_out']} held-out examples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
