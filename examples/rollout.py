"""Shared pieces of the RL (GRPO) and preference (DPO) jobs on the extraction task with the Llama port.

- :func:`scaled_forward`: the generation forward of ``jlora.lora_apply(..., lora_scale=c)``; weights
  ``(frozen, lora, c)``: ``c = 1`` is the live adapter, ``c = 0`` the base, one compiled sampler.
- :func:`sample_groups`: ``group`` sampled completions per prompt from the jitted KV-cache sampler
  (:func:`examples.generate.generate`), with each token's log-prob recorded while sampling.
- :func:`completion_logps`: the learner's log-probs of the same tokens, laid out as in sampling
  (a left-padded prompt of a fixed width, prefilled once per prompt, then the completion), under
  any forward (the LoRA policy, or ``model.apply`` on the frozen tree: the reference).
- :func:`reward`, :func:`group_advantages`: the verifiable reward (valid JSON, per-field match, stop
  token) and GRPO's group-normalised advantages.
- :func:`evaluate`: held-out exact match / field F1 / valid JSON with greedy decoding, as the SFT job scores.
- :class:`CompileCounter`: XLA compilations seen (``jax.monitoring``), to show they do not grow with steps.
- :func:`load_model` (optionally the first N layers, for smoke tests), :func:`save_adapters` (orbax + PEFT),
  :func:`plot_run`, :func:`print_held_out`: what both jobs print and write.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from examples import chat_sft, extraction
from examples import generate as gen
from examples.finetune_minilm import UsageError, check_out_dir, next_run_dir
from examples.models import smollm
from examples.models.llama import init_cache

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@functools.lru_cache(maxsize=None)
def scaled_forward(apply_fn: Callable[..., Any], config: jlora.LoraConfig) -> gen.Forward:
    """``weights = (frozen, lora, scale)`` through ``jlora.lora_apply(apply_fn, config)`` (lazy, no merge).

    >>> callable(scaled_forward(lambda p, *a, **k: None, jlora.LoraConfig(targets=".*")))
    True
    """
    fn = jlora.lora_apply(apply_fn, config, mode="lazy")
    return lambda weights, *args, **kwargs: fn(weights[0], weights[1], *args, lora_scale=weights[2], **kwargs)


class Start(NamedTuple):
    """What both loops set up before any work: the checked output folder, the LoRA config, the model and the
    ``(frozen, lora)`` trees."""

    out: Path
    adapter_dir: Path
    config: jlora.LoraConfig
    model: Any
    params: Any
    tokenizer: Any
    chat: Any
    frozen: Any
    lora: Any


def start(args: Any, name: str) -> Start:
    """The loops' shared set-up from their options (``out``, ``overwrite``, ``rank``, ``alpha``, ``targets``,
    ``target_regexes``, ``num_layers``, ``seed``): ``--out`` is checked first (default: the next free
    ``runs/smollm_<name>/run-NNN``); a bad ``--num-layers`` or ``--targets`` is a :class:`UsageError`.

    >>> s = start(parse_args(["--num-layers", "2"]), "grpo")                         # doctest: +SKIP
    """
    out = Path(args.out) if args.out is not None else next_run_dir(Path(f"runs/smollm_{name}"))
    adapter_dir = check_out_dir(out, args.overwrite)
    config = jlora.LoraConfig(rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                              targets=args.target_regexes)
    try:
        model, params, tok, chat = load_model(args.num_layers)
    except ValueError as e:
        raise UsageError(f"--num-layers: {e}") from None
    try:
        frozen, lora = jlora.init(jax.random.key(args.seed), params, config)
    except ValueError as e:
        raise UsageError(f"--targets {args.targets!r}: {e}") from None
    return Start(out, adapter_dir, config, model, params, tok, chat, frozen, lora)


def load_model(num_layers: int | None = None) -> tuple[Any, Any, Any, Any]:
    """``(model, params, tokenizer, chat)`` of SmolLM2-135M-Instruct; ``num_layers`` keeps only the first
    decoder layers (a smaller, worse model: for smoke tests of the loops, not for scores).

    >>> model, params, tok, chat = load_model(num_layers=2)                    # doctest: +SKIP
    """
    model, params, tok, chat = smollm.load_smollm()
    n = model.config.num_hidden_layers
    if num_layers is None or num_layers == n:
        return model, params, tok, chat
    if not 1 <= num_layers <= n:
        raise ValueError(f"load_model: num_layers must be in [1, {n}], got {num_layers}")
    keep = {k: v for k, v in params["params"].items() if not k.startswith("layers_") or int(k[7:]) < num_layers}
    model = type(model)(dataclasses.replace(model.config, num_hidden_layers=num_layers))
    return model, {"params": keep}, tok, chat


def prompts(tokenizer: Any, chat: Any, examples: Sequence[extraction.Example]) -> list[list[int]]:
    """Token ids of each example's conversation up to the assistant header.

    >>> prompts(tok, chat, extraction.make_examples(1, "test"))                 # doctest: +SKIP
    """
    return [tokenizer.encode(chat.render(ex.messages, add_generation_prompt=True)).ids for ex in examples]


def fixed_width(rows: Sequence[Sequence[int]], multiple: int = 16) -> int:
    """The longest row rounded up to ``multiple``: one prompt width for the whole run (one compilation).

    >>> fixed_width([[1] * 57, [1] * 66])
    80
    """
    return -(-max(len(r) for r in rows) // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Rollout:
    """Completions as the sampler produced them (NumPy); rows ``i*G ... i*G+G-1`` continue prompt ``i``."""

    prompt_ids: np.ndarray   # (P, W) int32, left-padded
    prompt_mask: np.ndarray  # (P, W) int32
    tokens: np.ndarray       # (P*G, T) int32, pad after the stop token
    completion: np.ndarray   # (P*G, T) float32: 1 for the tokens that count (through the stop token)
    stopped: np.ndarray      # (P*G,) bool: the row emitted the stop token within T
    logps: np.ndarray        # (P*G, T) float32: log-probs recorded while sampling (0 past the stop)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens before the stop token (what :func:`examples.generate.decode` takes)."""
        return (self.completion.sum(axis=1) - self.stopped).astype(np.int32)


def completion_mask(lengths: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """(B, T) float32: 1 for the tokens before the stop and the stop token itself (when within T).

    >>> completion_mask(np.array([1, 3]), 3).tolist()
    [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    """
    n = np.minimum(np.asarray(lengths) + 1, max_new_tokens)
    return (np.arange(max_new_tokens)[None, :] < n[:, None]).astype(np.float32)


def sample_groups(forward: gen.Forward, model_config: Any, weights: Any, rows: Sequence[Sequence[int]], *,
                  group: int, width: int, max_new_tokens: int, key: jax.Array, temperature: float,
                  eos_id: int) -> Rollout:
    """``group`` completions per prompt from the jitted KV-cache sampler (one prefill per prompt).

    >>> r = sample_groups(fwd, model.config, (frozen, lora, 1.0), rows, group=8, width=80,
    ...                   max_new_tokens=32, key=jax.random.key(0), temperature=1.0, eos_id=2)  # doctest: +SKIP
    """
    ids, mask = gen.left_pad([list(r) for r in rows], pad_id=eos_id, multiple=width)
    if ids.shape[1] != width:
        raise ValueError(f"sample_groups: a prompt has {max(map(len, rows))} tokens, more than width {width}; "
                         "fix: fixed_width() over all prompts")
    tokens, lengths, logps = gen.generate(forward, model_config, weights, ids, mask, max_new_tokens=max_new_tokens,
                                          stop_ids=(eos_id,), pad_id=eos_id, key=key, temperature=temperature,
                                          return_logprobs=True, group=group)
    return Rollout(ids, mask, tokens, completion_mask(lengths, max_new_tokens), lengths < max_new_tokens, logps)


def completion_logps(apply: Callable[..., Any], model_config: Any, prompt_ids: jax.Array, prompt_mask: jax.Array,
                     tokens: jax.Array, completion: jax.Array, temperature: float = 1.0) -> jax.Array:
    """(P*G, T) log-probs of the completion tokens, computed as the sampler laid them out.

    One prefill of the left-padded prompts (P rows, a KV cache of W + T slots) gives the first
    token's logits; its cache is repeated G = (P*G)/P times and one forward over ``tokens[:, :-1]`` at
    slots ``W ...`` (the rotary positions continuing each prompt) gives the rest. ``apply(ids, mask,
    positions=, cache=, cache_index=, logit_positions=)`` closes over the weights:
    ``lambda *a, **k: policy(frozen, lora, *a, **k)`` for the LoRA policy, ``functools.partial(model.apply,
    frozen)`` for the reference (the base). Differentiable; ``completion`` masks the attention to
    completion slots after the stop token.

    >>> lp = completion_logps(functools.partial(model.apply, frozen), model.config, r.prompt_ids,
    ...                       r.prompt_mask, r.tokens, r.completion)                     # doctest: +SKIP
    """
    (p, w), (b, t) = prompt_ids.shape, tokens.shape
    group = b // p
    cache = init_cache(model_config, p, w + t)
    slots = jnp.concatenate([prompt_mask, jnp.zeros((p, t), prompt_mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    first, cache = apply(prompt_ids, slots, positions=positions, cache=cache, cache_index=0,
                         logit_positions=jnp.full((p, 1), w - 1, jnp.int32))
    rep = functools.partial(jnp.repeat, repeats=group, axis=0)
    slots = jnp.concatenate([rep(prompt_mask), completion.astype(prompt_mask.dtype)], axis=1)
    positions = rep(positions[:, -1:]) + 1 + jnp.arange(t - 1)[None, :]
    rest, _ = apply(tokens[:, :-1], slots, positions=positions, cache=jax.tree.map(rep, cache), cache_index=w)
    logits = jnp.concatenate([rep(first), rest], axis=1)
    return gen.token_logp(logits, tokens, temperature)


def reward(reply: str, example: extraction.Example, stopped: bool) -> dict[str, float]:
    """The verifiable reward of one reply and its parts: ``0.2 valid + 0.5 field_f1 + 0.2 exact + 0.1 stopped``.

    ``valid``: the reply holds a JSON object; ``field_f1``: this example's field F1 (extra keys count
    against it), ``exact``: the object equals the reference, all as :func:`examples.extraction.score`
    parses and compares; ``stopped``: the reply ended with the stop token within the budget.

    >>> ex = extraction.make_examples(1, "test")[0]
    >>> reward(ex.answer, ex, True)["reward"], reward("no json", ex, False)["reward"]
    (1.0, 0.0)
    """
    s = extraction.score([reply], [example])
    parts = {"valid_json": s["valid_json"], "field_f1": s["field_f1"], "exact_match": s["exact_match"],
             "stopped": float(stopped)}
    parts["reward"] = round(0.2 * parts["valid_json"] + 0.5 * parts["field_f1"] + 0.2 * parts["exact_match"]
                            + 0.1 * parts["stopped"], 6)
    return parts


def group_advantages(rewards: np.ndarray, group: int, eps: float = 1e-4) -> np.ndarray:
    """GRPO advantages: each reward minus its group's mean, over the group's (population) std + eps.

    A group whose rewards are all equal gets zero advantages (nothing to learn from it).

    >>> group_advantages(np.array([1.0, 0.0, 0.5, 0.5]), 2).round(3).tolist()
    [1.0, -1.0, 0.0, 0.0]
    """
    r = np.asarray(rewards, np.float64).reshape(-1, group)
    adv = (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, keepdims=True) + eps)
    return adv.reshape(-1).astype(np.float32)


def evaluate(forward: gen.Forward, model_config: Any, weights: Any, tokenizer: Any, chat: Any,
             examples: Sequence[extraction.Example], *, eos_id: int, max_new_tokens: int
             ) -> tuple[dict[str, float], list[str], list[list[int]]]:
    """Held-out scores (exact match, field F1, valid JSON) of greedy replies, as the SFT job computes them.

    Returns ``(scores, replies, reply token ids through the stop token)``.

    >>> scores, replies, ids = evaluate(scaled_forward(model.apply, cfg), model.config, (frozen, lora, 0.0),
    ...                                 tok, chat, test, eos_id=2, max_new_tokens=40)    # doctest: +SKIP
    """
    texts, ids, _ = chat_sft.greedy_replies(forward, model_config, weights, tokenizer, chat,
                                            [ex.messages for ex in examples], eos_id=eos_id,
                                            max_new_tokens=max_new_tokens)
    return extraction.score(texts, examples), texts, ids


class CompileCounter:
    """Counts XLA backend compilations (``jax.monitoring`` events) while registered.

    >>> x = jnp.ones(7)
    >>> with CompileCounter() as c:
    ...     f = jax.jit(lambda x: x * 3)
    ...     _ = [f(x) for _ in range(3)]
    >>> c.count
    1
    """

    def __init__(self) -> None:
        self.count = 0

    def _listen(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == BACKEND_COMPILE:
            self.count += 1

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


def plot_run(curves: dict[str, Sequence[float]], before: dict[str, float] | None, after: dict[str, float] | None,
             title: str, path: Any, right: dict[str, Sequence[float]] | None = None) -> Any:
    """Per-step curves (left; ``right``: on a second y axis) and held-out exact match / field F1 / valid JSON
    before and after (right panel), as a PNG.

    >>> plot_run({"reward": [0.1, 0.5]}, None, None, "demo", "/tmp/demo.png", right={"KL": [0.0, 0.1]})  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    lines = [ax1.plot(np.arange(1, len(ys) + 1), ys, marker=".", label=name)[0] for name, ys in curves.items()]
    if right:
        twin = ax1.twinx()
        for i, (name, ys) in enumerate(right.items()):
            lines += twin.plot(np.arange(1, len(ys) + 1), ys, ls="--", color=f"C{len(curves) + i}", label=name)
        twin.set(ylabel=", ".join(right))
    ax1.set(xlabel="step", title=title)
    ax1.legend(handles=lines, fontsize=8, loc="lower right")
    names = ["exact_match", "field_f1", "valid_json"]
    x = np.arange(len(names))
    if before is not None and after is not None:
        for dx, label, m in ((-0.2, "before", before), (0.2, "after", after)):
            bars = ax2.bar(x + dx, [m[n] for n in names], 0.4, label=label)
            ax2.bar_label(bars, fmt="%.3f", fontsize=8)
        ax2.legend(loc="upper center", ncol=2)
        ax2.set(title=f"held-out ({after['n']} examples, greedy)")
    ax2.set_xticks(x, names)
    ax2.set(ylim=(0, 1.2))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_adapters(out: Any, adapter_dir: Any, lora: Any, config: jlora.LoraConfig, metadata: dict[str, Any],
                  overwrite: bool) -> tuple[int, Any]:
    """Saves the adapter with orbax (``adapter_dir``) and in PEFT format (``out/peft_adapter``).

    Returns ``(bytes on disk of the orbax adapter, the PEFT directory)``.

    >>> save_adapters(out, out / "adapter", lora, cfg, {"task": "extraction"}, False)  # doctest: +SKIP
    """
    n_bytes = jlora.save_adapter(adapter_dir, lora, config, metadata=metadata, overwrite=overwrite)
    peft_dir = jlora.peft.save(out / "peft_adapter", lora, config, jlora.peft.LLAMA_KEY_MAP, overwrite=overwrite,
                               task_type="CAUSAL_LM", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    return n_bytes, peft_dir


def print_held_out(rows: Sequence[tuple[str, dict[str, float] | None]]) -> None:
    """The held-out table: exact match, field F1, valid JSON per named model.

    >>> print_held_out([("zero-shot", {"exact_match": 0.5, "field_f1": 0.75, "valid_json": 1.0, "n": 2})])
    <BLANKLINE>
    held-out (2)        exact match  field F1  valid JSON
    zero-shot                 0.500     0.750       1.000
    """
    rows = [(name, m) for name, m in rows if m is not None]
    if not rows:
        return
    print(f"\n{'held-out (' + str(rows[0][1]['n']) + ')':<18} {'exact match':>12} {'field F1':>9} {'valid JSON':>11}")
    for name, m in rows:
        print(f"{name:<18} {m['exact_match']:>12.3f} {m['field_f1']:>9.3f} {m['valid_json']:>11.3f}")
