"""Jitted KV-cache generation for the Llama port: base model, lazy or merged LoRA, one adapter per row.

    python examples/generate.py "What is the capital of France?"      # SmolLM2-135M-Instruct, greedy
    python examples/generate.py --adapter runs/smollm_extraction/run-000/adapter "Ana is 31 and lives in Oslo."
    python examples/generate.py --adapter runs/smollm_extraction/run-000 --chat       # talk to it (stdin)

``--adapter DIR`` takes what the main job wrote: an orbax adapter (``jlora.save_adapter``), a PEFT
adapter (``adapter_config.json`` + ``adapter_model.safetensors``), or the run folder holding
``adapter/``. ``--chat`` is a multi-turn conversation through the chat template, one line per
turn from stdin (an empty line, ``exit`` or end of input ends it).

One compiled program per (batch, prompt length, ``max_new_tokens``, sampling settings, group): a prefill
over the left-padded prompts, then a ``lax.while_loop`` of single-token steps on a fixed-size cache
(no per-token retrace), stopping once every row has emitted a stop token. Sampling is greedy
(``temperature=0``) or temperature + top-p (nucleus) with an explicit PRNG key.

A *forward* is ``forward(weights, ids, mask, positions, cache, cache_index=...) -> (logits, cache)``;
``weights`` is any pytree (a jit argument, so the 135M parameters are never baked into the program):

- :func:`base_forward` (``weights = params``; also a :func:`jlora.merge`'d tree),
- :func:`lora_forward` (``weights = (frozen, lora)``, ``jlora.lora_apply`` lazy or merged),
- :func:`mixed_forward` (``weights = (frozen, stack.lora, adapter_ids)``, :func:`jlora.multi.mixed_apply`).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as `python examples/generate.py`: make the repo root (jlora, examples) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jlora  # noqa: E402
from examples.models.llama import LlamaConfig, init_cache  # noqa: E402

Forward = Callable[..., tuple[jax.Array, Any]]


@functools.lru_cache(maxsize=None)
def base_forward(apply_fn: Callable[..., Any]) -> Forward:
    """``weights = params`` (the plain model, or a merged adapter).

    >>> callable(base_forward(lambda p, *a, **k: None))
    True
    """
    return lambda weights, *args, **kwargs: apply_fn(weights, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def lora_forward(apply_fn: Callable[..., Any], config: jlora.LoraConfig, mode: str = "lazy") -> Forward:
    """``weights = (frozen, lora)``, run through ``jlora.lora_apply(apply_fn, config, mode)``.

    >>> callable(lora_forward(lambda p, *a, **k: None, jlora.LoraConfig(targets=".*")))
    True
    """
    fn = jlora.lora_apply(apply_fn, config, mode=mode)
    return lambda weights, *args, **kwargs: fn(weights[0], weights[1], *args, **kwargs)


@functools.lru_cache(maxsize=None)
def mixed_forward(apply_fn: Callable[..., Any], stack_config: jlora.LoraConfig, mode: str = "lazy") -> Forward:
    """``weights = (frozen, stack.lora, adapter_ids)``: row ``i`` runs adapter ``adapter_ids[i]``.

    >>> callable(mixed_forward(lambda p, *a, **k: None, jlora.LoraConfig(targets=".*")))
    True
    """
    fn = jlora.multi.mixed_apply(apply_fn, stack_config, mode=mode)
    return lambda weights, *args, **kwargs: fn(weights[0], weights[1], weights[2], *args, **kwargs)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> left-padded ``(ids, mask)`` (int32), length rounded up to ``multiple`` (fewer compiles).

    >>> ids, mask = left_pad([[5, 6], [7]], pad_id=0, multiple=4)
    >>> ids.tolist(), mask.tolist()
    ([[0, 0, 5, 6], [0, 0, 0, 7]], [[0, 0, 1, 1], [0, 0, 0, 1]])
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("left_pad: every prompt needs at least one token; fix: drop empty prompts")
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def sample(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_p: float = 1.0) -> jax.Array:
    """Next tokens from (batch, vocab) logits: argmax at ``temperature == 0``, else temperature + top-p.

    Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p`` (always
    at least the most likely one).

    >>> logits = jnp.log(jnp.array([[0.6, 0.3, 0.1]]))
    >>> int(sample(logits, jax.random.key(0))[0])
    0
    >>> {int(sample(logits, k, 1.0, 0.5)[0]) for k in jax.random.split(jax.random.key(0), 20)}
    {0}
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        choice = jax.random.categorical(key, sorted_logits, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def token_logp(logits: jax.Array, tokens: jax.Array, temperature: float = 0.0) -> jax.Array:
    """``log softmax(logits / temperature)[tokens]``: (..., vocab) logits, (...) tokens -> (...) float32
    (``temperature == 0``: the raw logits).

    The log-probability of each chosen token under the distribution it was sampled from (before a
    top-p cut); what a policy-gradient learner recomputes from the same logits.

    >>> round(float(token_logp(jnp.log(jnp.array([[0.6, 0.3, 0.1]])), jnp.array([1]))[0]), 4)  # log(0.3)
    -1.204
    """
    logits = logits.astype(jnp.float32) / (temperature if temperature > 0 else 1.0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("forward", "config", "max_new_tokens", "stop_ids", "pad_id",
                                             "temperature", "top_p", "group"))
def _generate(forward: Forward, config: LlamaConfig, weights: Any, ids: jax.Array, mask: jax.Array, key: jax.Array,
              *, max_new_tokens: int, stop_ids: tuple[int, ...], pad_id: int, temperature: float,
              top_p: float, group: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, width = ids.shape
    dtype = jax.tree.leaves(weights)[0].dtype
    cache = init_cache(config, b, width + max_new_tokens, dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32)
    slots = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # left padding: real tokens start at 0
    logits, cache = forward(weights, ids, slots, positions, cache, cache_index=0)
    if group > 1:  # one prefill per prompt, then `group` rows share its cache
        rep = functools.partial(jnp.repeat, repeats=group, axis=0)
        logits, cache, slots, positions = rep(logits[:, -1:]), jax.tree.map(rep, cache), rep(slots), rep(positions)
        b = b * group
    key, sub = jax.random.split(key)
    stops = jnp.asarray(stop_ids, jnp.int32)
    tok = sample(logits[:, -1], sub, temperature, top_p)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    logps = jnp.zeros((b, max_new_tokens), jnp.float32).at[:, 0].set(token_logp(logits[:, -1], tok, temperature))
    done = jnp.isin(tok, stops)

    def cond(state):
        i, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, done, out, logps, cache, slots, pos, key = state
        slot = width + i - 1  # where `tok` goes in the cache
        slots = slots.at[:, slot].set(1)
        logits, cache = forward(weights, tok[:, None], slots, pos[:, None], cache, cache_index=slot)
        key, sub = jax.random.split(key)
        nxt = jnp.where(done, pad_id, sample(logits[:, -1], sub, temperature, top_p))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        lp = jnp.where(done, 0.0, token_logp(logits[:, -1], nxt, temperature))
        logps = jax.lax.dynamic_update_slice(logps, lp[:, None], (0, i))
        return i + 1, nxt, done | jnp.isin(nxt, stops), out, logps, cache, slots, pos + 1, key

    state = (jnp.int32(1), tok, done, out, logps, cache, slots, positions[:, -1] + 1, key)
    _, _, _, out, logps, *_ = jax.lax.while_loop(cond, body, state)
    stop_seen = jnp.isin(out, stops)
    lengths = jnp.where(stop_seen.any(axis=1), jnp.argmax(stop_seen, axis=1), max_new_tokens)
    return out, lengths, logps


def generate(forward: Forward, config: LlamaConfig, weights: Any, ids: Any, mask: Any, *, max_new_tokens: int,
             stop_ids: Sequence[int], pad_id: int, key: jax.Array | None = None, temperature: float = 0.0,
             top_p: float = 1.0, return_logprobs: bool = False, group: int = 1) -> tuple[np.ndarray, ...]:
    """Generates up to ``max_new_tokens`` after each left-padded prompt row.

    Args:
      forward: see the module docstring (:func:`base_forward`, :func:`lora_forward`, :func:`mixed_forward`).
      config: the model's :class:`LlamaConfig` (cache shape).
      weights: the forward's weights pytree.
      ids, mask: (batch, width) left-padded prompts (:func:`left_pad`).
      max_new_tokens: the generation budget per row.
      stop_ids: token ids that end a row (kept in the output; everything after is ``pad_id``).
      pad_id: filler after a row stopped.
      key: PRNG key for sampling (required when ``temperature > 0``).
      temperature, top_p: ``0`` is greedy; otherwise temperature and nucleus sampling.
      return_logprobs: also return each emitted token's log-probability (:func:`token_logp`),
        recorded while sampling (0 after a row stopped); the same compiled program either way.
      group: completions per prompt row: output rows ``i * group ... i * group + group - 1`` continue
        prompt ``i``, whose prefill runs once (its KV cache is repeated). For weights without per-row
        parts (not :func:`mixed_forward`).

    Returns:
      ``(tokens, lengths)``: (batch * group, max_new_tokens) int32 and the count before the first stop id;
      ``(tokens, lengths, logprobs)`` with ``return_logprobs`` (logprobs float32, like tokens).

    >>> tokens, lengths = generate(base_forward(model.apply), model.config, params, ids, mask,
    ...                            max_new_tokens=32, stop_ids=(2,), pad_id=2)   # doctest: +SKIP
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if group < 1:
        raise ValueError(f"generate: group must be >= 1, got {group}")
    if temperature > 0 and key is None:
        raise ValueError("generate: temperature > 0 samples; fix: pass key=jax.random.key(seed)")
    key = jax.random.key(0) if key is None else key
    out, lengths, logps = _generate(forward, config, weights, jnp.asarray(ids, jnp.int32),
                                    jnp.asarray(mask, jnp.int32), key, max_new_tokens=int(max_new_tokens),
                                    stop_ids=tuple(int(s) for s in stop_ids), pad_id=int(pad_id),
                                    temperature=float(temperature), top_p=float(top_p), group=int(group))
    if return_logprobs:
        return np.asarray(out), np.asarray(lengths), np.asarray(logps)
    return np.asarray(out), np.asarray(lengths)


def chat_prompts(tokenizer: Any, chat: Any, users: Sequence[str], system: str | None = None) -> list[list[int]]:
    """Token ids of ``[system?, user]`` conversations ending in the assistant header.

    >>> chat_prompts(tok, chat, ["Hi"])                                          # doctest: +SKIP
    """
    rows = []
    for u in users:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": u}]
        rows.append(tokenizer.encode(chat.render(msgs, add_generation_prompt=True)).ids)
    return rows


def decode(tokenizer: Any, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    """The text of each row up to (not including) its stop token.

    >>> decode(tok, np.array([[19556, 2]]), np.array([1]))                       # doctest: +SKIP
    ['Hello']
    """
    return [tokenizer.decode([int(t) for t in row[:n]]) for row, n in zip(tokens, lengths)]


def find_adapter(directory: str | Path) -> tuple[Path, str]:
    """``(folder, kind)`` of the adapter at ``directory``: ``'peft'`` (``adapter_config.json``), ``'orbax'``
    (a ``jlora.save_adapter`` checkpoint), or a run folder's ``adapter/``; a ValueError with the fix otherwise.

    Reads no arrays: it runs before the model is loaded, so a wrong path fails at once.

    >>> find_adapter("no/such/dir")                                   # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: --adapter no/such/dir: no such folder; fix: ...
    """
    from jlora.io._files import MANIFEST
    from jlora.io._peft_keys import CONFIG_NAME

    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"--adapter {d}: {'not a folder' if d.exists() else 'no such folder'}; fix: the adapter/ or "
                         "peft_adapter/ folder that examples/finetune_smollm.py printed at the end (or its run folder)")
    for folder in (d, d / "adapter"):
        if (folder / CONFIG_NAME).is_file():
            return folder, "peft"
        if (folder / MANIFEST).is_file():
            return folder, "orbax"
    raise ValueError(f"--adapter {d}: holds neither a jlora adapter ({MANIFEST}) nor a PEFT adapter ({CONFIG_NAME}) "
                     f"(it has: {sorted(p.name for p in d.iterdir())[:8]}); fix: pass the adapter/ or peft_adapter/ "
                     "folder of a run")


def load_adapter(directory: str | Path, params: Any) -> tuple[Any, jlora.LoraConfig, dict[str, Any], str]:
    """``(lora, config, metadata, kind)`` of an orbax or PEFT adapter (:func:`find_adapter`) for the Llama port's
    ``params``; PEFT adapters are read with ``jlora.peft.LLAMA_KEY_MAP`` (their metadata is ``{}``).

    >>> lora, cfg, meta, kind = load_adapter("runs/smollm_extraction/run-000/adapter", params)  # doctest: +SKIP
    """
    folder, kind = find_adapter(directory)
    if kind == "peft":
        lora, config = jlora.peft.load(folder, params, jlora.peft.LLAMA_KEY_MAP)
        return lora, config, {}, kind
    lora, config, metadata = jlora.restore_adapter(folder, frozen=params)
    return lora, config, dict(metadata or {}), kind


def chat_loop(forward: Forward, config: LlamaConfig, weights: Any, tokenizer: Any, chat: Any, eos_id: int,
              lines: Any, out: Any, *, system: str | None = None, max_new_tokens: int = 128,
              key: jax.Array | None = None, temperature: float = 0.0, top_p: float = 1.0,
              echo: bool = True) -> list[dict[str, str]]:
    """A multi-turn conversation: each line of ``lines`` is a user turn, each reply is written to ``out``.

    The whole conversation so far (``system`` first) goes through the chat template every turn. An
    empty line, ``exit``/``quit`` or the end of ``lines`` ends it. ``echo`` writes each user line too
    (for piped input, so the transcript reads as a conversation). Returns the messages.

    >>> msgs = chat_loop(fwd, cfg, params, tok, chat, 2, io.StringIO("Hi\\n"), sys.stdout)  # doctest: +SKIP
    """
    messages = [{"role": "system", "content": system}] if system else []
    for line in lines:
        text = line.strip()
        if not text or text.lower() in ("exit", "quit"):
            break
        if echo:
            print(f"you> {text}", file=out, flush=True)
        messages.append({"role": "user", "content": text})
        ids, mask = left_pad([tokenizer.encode(chat.render(messages, add_generation_prompt=True)).ids],
                             pad_id=eos_id, multiple=64)
        key, sub = jax.random.split(jax.random.key(0) if key is None else key)
        tokens, lengths = generate(forward, config, weights, ids, mask, max_new_tokens=max_new_tokens,
                                   stop_ids=(eos_id,), pad_id=eos_id, key=sub, temperature=temperature, top_p=top_p)
        reply = decode(tokenizer, tokens, lengths)[0]
        print(f"assistant> {reply}", file=out, flush=True)
        messages.append({"role": "assistant", "content": reply})
    return messages


def _stdin_lines(prompt: str) -> Any:
    """Lines typed at a terminal (with a prompt) until EOF."""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return


def parse_args(argv: Sequence[str] | None = None) -> Any:
    """The command line (every option checked here, before the model is loaded)."""
    import argparse

    p = argparse.ArgumentParser(description="Generate with SmolLM2-135M-Instruct (jitted KV-cache decoding), "
                                "optionally with a LoRA adapter, or chat with it.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompts", nargs="*", help="user messages, one reply each (default: two examples; none with --chat)")
    p.add_argument("--adapter", default=None, help="an adapter folder: orbax (adapter/), PEFT (peft_adapter/) or the "
                   "run folder of examples/finetune_smollm.py; merged into the weights")
    p.add_argument("--chat", action="store_true", help="multi-turn chat, one user turn per line of stdin (an empty "
                   "line, 'exit' or Ctrl-D ends it)")
    p.add_argument("--system", default=None, help="system message (default: the one the adapter was trained with, "
                   "if its metadata records it)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="generation budget per reply")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error(f"need --temperature >= 0 and 0 < --top-p <= 1, got {args.temperature}, {args.top_p}")
    if args.chat and args.prompts:
        p.error("--chat reads the user turns from stdin; fix: drop the prompts, or drop --chat")
    if args.adapter is not None:
        try:
            find_adapter(args.adapter)
        except ValueError as e:
            p.error(str(e))
    if not args.prompts and not args.chat:
        args.prompts = ["What is the capital of France?", "Name three primary colors."]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Replies from SmolLM2-135M-Instruct (with ``--adapter``: merged LoRA) for the prompts, or a chat."""
    from examples.models import smollm

    args = parse_args(argv)
    model, params, tok, chat = smollm.load_smollm()
    eos = smollm.eos_id()
    weights, system, who = params, args.system, "SmolLM2-135M-Instruct"
    if args.adapter is not None:
        try:
            lora, config, metadata, kind = load_adapter(args.adapter, params)
        except (ValueError, FileNotFoundError) as e:  # an adapter for another model, a damaged file, ...
            print(f"error: --adapter {args.adapter}: {e}", file=sys.stderr)
            return 2
        weights = jlora.merge(params, lora, config)
        system = system if system is not None else metadata.get("system_prompt")
        who += f" + {kind} adapter {args.adapter} ({jlora.summary(params, lora).trainable:,} trained parameters)"
    print(f"model: {who}\nsystem: {system if system else '(none; --system sets one)'}", flush=True)
    kw = dict(max_new_tokens=args.max_new_tokens, key=jax.random.key(args.seed), temperature=args.temperature,
              top_p=args.top_p)
    fwd = base_forward(model.apply)
    if args.chat:
        tty = sys.stdin.isatty()
        print("chat: one message per line; an empty line, 'exit' or Ctrl-D ends it", flush=True)
        chat_loop(fwd, model.config, weights, tok, chat, eos, _stdin_lines("you> ") if tty else sys.stdin,
                  sys.stdout, system=system, echo=not tty, **kw)
        return 0
    ids, mask = left_pad(chat_prompts(tok, chat, args.prompts, system), pad_id=eos)
    kw.update(stop_ids=(eos,), pad_id=eos)
    t0 = time.perf_counter()
    generate(fwd, model.config, weights, ids, mask, **kw)
    t1 = time.perf_counter()
    tokens, lengths = generate(fwd, model.config, weights, ids, mask, **kw)
    t2 = time.perf_counter()
    for prompt, text in zip(args.prompts, decode(tok, tokens, lengths)):
        print(f"> {prompt}\n{text}\n")
    n = int(np.minimum(lengths + 1, args.max_new_tokens).sum())
    print(f"{n} tokens in {t2 - t1:.2f} s ({n / (t2 - t1):.1f} tokens/s, batch {len(args.prompts)}); "
          f"first call incl. compile {t1 - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
