"""Supervised fine-tuning pieces for a chat LM (the Llama port): chat-formatted batches with the loss on
assistant tokens only, a jitted LoRA train step, batched greedy evaluation, LoRA target names.

Used by ``examples/finetune_smollm.py`` and its tests.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from examples import generate as gen

LAYER = r"params/layers_\d+"
SHORT_TARGETS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
                 "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def target_regexes(spec: str) -> tuple[str, ...]:
    """``"q_proj,v_proj"`` (or ``"attn"``, ``"mlp"``, ``"all"``) -> full-path regexes; others are regexes as is.

    Raises ValueError for an empty list or a malformed regex (the CLI turns it into a usage error).

    >>> target_regexes("q_proj,mlp")
    ('params/layers_\\\\d+/attn/q_proj/kernel', 'params/layers_\\\\d+/mlp/(gate_proj|up_proj|down_proj)/kernel')
    >>> target_regexes("qproj")
    Traceback (most recent call last):
    ...
    ValueError: --targets item 'qproj' is not a short name (closest: q_proj, v_proj, o_proj); fix: use short names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, attn, mlp, all) or a full-path regex such as 'params/layers_\\d+/attn/q_proj/kernel'
    >>> target_regexes("q_proj(")
    Traceback (most recent call last):
    ...
    ValueError: --targets item 'q_proj(' is not a valid regex (missing ), unterminated subpattern at position 6); fix: use short names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, attn, mlp, all) or a full-path regex such as 'params/layers_\\d+/attn/q_proj/kernel'
    """
    groups = {"attn": [k for k, v in SHORT_TARGETS.items() if v == "attn"],
              "mlp": [k for k, v in SHORT_TARGETS.items() if v == "mlp"], "all": list(SHORT_TARGETS)}
    names = ", ".join([*SHORT_TARGETS, *groups])
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in SHORT_TARGETS:
            out.append(f"{LAYER}/{SHORT_TARGETS[item]}/{item}/kernel")
        elif item in groups:
            by_block: dict[str, list[str]] = {}
            for k in groups[item]:
                by_block.setdefault(SHORT_TARGETS[k], []).append(k)
            out.extend(f"{LAYER}/{block}/({'|'.join(ks)})/kernel" for block, ks in by_block.items())
        elif re.fullmatch(r"\w+", item):  # a plain word never matches a whole path ('params/.../kernel')
            near = difflib.get_close_matches(item, [*SHORT_TARGETS, *groups], n=3, cutoff=0.5)
            closest = f" (closest: {', '.join(near)})" if near else ""
            raise ValueError(f"--targets item {item!r} is not a short name{closest}; fix: use short names ({names}) "
                             f"or a full-path regex such as '{LAYER}/attn/q_proj/kernel'")
        else:
            try:
                re.compile(item)
            except re.error as e:
                raise ValueError(f"--targets item {item!r} is not a valid regex ({e}); fix: use short names "
                                 f"({names}) or a full-path regex such as '{LAYER}/attn/q_proj/kernel'") from None
            out.append(item)
    if not out:
        raise ValueError(f"--targets is empty; fix: give e.g. 'all' or 'q_proj,v_proj' (short names: {names})")
    return tuple(out)


def encode_chat(tokenizer: Any, chat: Any, messages: Sequence[dict[str, str]], answer: str, eos_id: int
                ) -> tuple[list[int], int]:
    """``(ids, n_prompt)``: ``messages`` + the assistant's ``answer``, up to and including its stop token.

    The prompt (``add_generation_prompt=True``) must be a token prefix of the full conversation.

    >>> ids, n = encode_chat(tok, chat, [{"role": "user", "content": "Hi"}], "Hello!", 2)  # doctest: +SKIP
    """
    prompt = tokenizer.encode(chat.render(messages, add_generation_prompt=True)).ids
    full = tokenizer.encode(chat.render([*messages, {"role": "assistant", "content": answer}])).ids
    if full[:len(prompt)] != prompt or eos_id not in full[len(prompt):]:
        raise ValueError("encode_chat: the generation prompt is not a token prefix of the conversation, or the "
                         "assistant turn has no stop token; fix: check the chat template")
    end = full.index(eos_id, len(prompt)) + 1
    return full[:end], len(prompt)


@dataclasses.dataclass(frozen=True)
class Batch:
    """Right-padded token rows and the positions whose next token is an assistant token."""

    ids: np.ndarray        # (batch, width) int32
    mask: np.ndarray       # (batch, width) int32, 1 for real tokens
    positions: np.ndarray  # (batch, k) int32: logits taken here ...
    labels: np.ndarray     # (batch, k) int32: ... predict these tokens
    weights: np.ndarray    # (batch, k) float32: 1 for real answer tokens, 0 for padding


def make_batch(rows: Sequence[tuple[list[int], int]], width: int, k: int, pad_id: int) -> Batch:
    """Packs ``encode_chat`` rows into fixed shapes (one compilation for the whole run).

    >>> b = make_batch([([5, 6, 7, 8], 2)], width=6, k=3, pad_id=0)
    >>> b.ids.tolist(), b.positions.tolist(), b.labels.tolist(), b.weights.tolist()
    ([[5, 6, 7, 8, 0, 0]], [[1, 2, 0]], [[7, 8, 0]], [[1.0, 1.0, 0.0]])
    """
    n = len(rows)
    ids = np.full((n, width), pad_id, np.int32)
    mask = np.zeros((n, width), np.int32)
    positions = np.zeros((n, k), np.int32)
    labels = np.zeros((n, k), np.int32)
    weights = np.zeros((n, k), np.float32)
    for i, (row, n_prompt) in enumerate(rows):
        if len(row) > width or len(row) - n_prompt > k:
            raise ValueError(f"make_batch: row {i} has {len(row)} tokens ({len(row) - n_prompt} answer); "
                             f"width is {width}, k is {k}; fix: raise them")
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
        a = len(row) - n_prompt
        positions[i, :a] = np.arange(n_prompt - 1, len(row) - 1)
        labels[i, :a] = row[n_prompt:]
        weights[i, :a] = 1.0
    return Batch(ids, mask, positions, labels, weights)


def answer_nll(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of the answer tokens (float32 log-softmax).

    >>> float(answer_nll(jnp.zeros((1, 2, 4)), jnp.array([[1, 2]]), jnp.array([[1.0, 0.0]]))) == float(jnp.log(4.0))
    True
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def make_train_step(apply_fn: Callable[..., Any], config: jlora.LoraConfig, tx: optax.GradientTransformation,
                    mode: str = "lazy") -> Callable[..., Any]:
    """``step(frozen, lora, opt_state, batch_arrays) -> (lora, opt_state, loss)``, jitted; only LoRA trains.

    >>> step = make_train_step(model.apply, cfg, tx)                              # doctest: +SKIP
    """
    fwd = jlora.lora_apply(apply_fn, config, mode=mode)

    @jax.jit
    def step(frozen: Any, lora: Any, opt_state: Any, ids: jax.Array, mask: jax.Array, positions: jax.Array,
             labels: jax.Array, weights: jax.Array):
        def loss_fn(lora: Any) -> jax.Array:
            logits = fwd(frozen, lora, ids, mask, logit_positions=positions)
            return answer_nll(logits, labels, weights)

        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    return step


def schedule(lr: float, steps: int) -> optax.Schedule:
    """Linear warmup over 10% of the steps, cosine decay to 5% of ``lr``; valid for any ``steps >= 1``.

    >>> s = schedule(1.0, 1); float(s(0))
    1.0
    """
    warmup = steps // 10
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05)


def greedy_replies(forward: gen.Forward, config: Any, weights: Any, tokenizer: Any, chat: Any,
                   conversations: Sequence[Sequence[dict[str, str]]], *, eos_id: int, max_new_tokens: int,
                   chunk: int = 32
                   ) -> tuple[list[str], list[list[int]], int]:
    """Greedy replies in fixed-shape chunks (one compilation; the last chunk is padded with repeats).

    Returns ``(texts, token_ids, generated_token_count)`` (ids up to and including the stop token).

    >>> texts, ids, n = greedy_replies(fwd, cfg, params, tok, chat, [[{"role": "user", "content": "Hi"}]],
    ...                                eos_id=2, max_new_tokens=8)                 # doctest: +SKIP
    """
    if not conversations:
        return [], [], 0
    rows = [tokenizer.encode(chat.render(list(c), add_generation_prompt=True)).ids for c in conversations]
    width = -(-max(len(r) for r in rows) // 16) * 16
    chunk = min(chunk, len(rows))
    texts: list[str] = []
    ids: list[list[int]] = []
    count = 0
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        real = len(part)
        part = part + [part[-1]] * (chunk - real)
        tok_ids, mask = gen.left_pad(part, pad_id=eos_id, multiple=width)
        out, lengths = gen.generate(forward, config, weights, tok_ids, mask, max_new_tokens=max_new_tokens,
                                    stop_ids=(eos_id,), pad_id=eos_id)
        texts += gen.decode(tokenizer, out[:real], lengths[:real])
        for row, n in zip(out[:real], lengths[:real]):
            ids.append([int(t) for t in row[:min(int(n) + 1, max_new_tokens)]])
            count += len(ids[-1])
    return texts, ids, count
