"""examples/grpo_smollm.py and examples/rollout.py: the GRPO objective against float64, sampler/learner
log-prob agreement on SmolLM2 (first 2 layers), and a smoke run of the loop."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from examples import extraction, rollout
from examples.grpo_smollm import grpo_loss, main
from examples.models import smollm


def test_grpo_loss_against_float64():
    rng = np.random.default_rng(0)
    lp, old, ref = (rng.normal(-1.0, 0.4, (4, 5)) for _ in range(3))
    adv = rng.normal(0, 1, 4)
    mask = (rng.random((4, 5)) < 0.8).astype(np.float64)
    ratio = np.exp(lp - old)
    pg = -np.minimum(ratio * adv[:, None], np.clip(ratio, 0.8, 1.2) * adv[:, None])
    kl = np.exp(ref - lp) - (ref - lp) - 1
    want = ((pg + 0.05 * kl) * mask).sum() / mask.sum()
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    loss, stats = grpo_loss(f32(lp), f32(old), f32(ref), f32(adv), f32(mask), clip=0.2, beta=0.05)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(stats["kl"]), (kl * mask).sum() / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(stats["clip_fraction"]), ((np.abs(ratio - 1) > 0.2) * mask).sum() / mask.sum(),
                               rtol=1e-6)


def test_rewards_and_advantages():
    ex = extraction.make_examples(1, "test")[0]
    assert rollout.reward(ex.answer, ex, True)["reward"] == 1.0
    first_only = ex.answer.replace(dict(ex.fields)["name"], dict(ex.fields)["name"].split()[0])
    r = [rollout.reward(t, ex, s)["reward"] for t, s in [(ex.answer, False), (first_only, True), ("no", True)]]
    assert r[0] > r[1] > r[2] > 0.0  # 0.9, then 2 of 3 fields, then only the stop bonus
    adv = rollout.group_advantages(np.array([1.0, 0.0, 0.3, 0.3, 0.3, 0.3]), 3)
    np.testing.assert_allclose(adv[3:], 0.0)
    np.testing.assert_allclose(adv[:3].mean(), 0.0, atol=1e-6)


@pytest.fixture(scope="module")
def small():
    """The first 2 decoder layers of SmolLM2 and a LoRA adapter with non-zero B."""
    model, params, tok, chat = rollout.load_model(num_layers=2)
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=r"params/layers_\d+/(attn/(q|v)_proj|mlp/up_proj)/kernel")
    frozen, lora = jlora.init(jax.random.key(0), params, cfg)
    lora = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape), lora)
    return model, frozen, lora, cfg, tok, chat


def test_sampler_learner_and_reference_agree(small):
    model, frozen, lora, cfg, tok, chat = small
    eos = smollm.eos_id()
    exs = extraction.make_examples(2, "train")
    rows = rollout.prompts(tok, chat, exs)
    ro = rollout.sample_groups(rollout.scaled_forward(model.apply, cfg), model.config, (frozen, lora, np.float32(1.0)),
                               rows, group=3, width=rollout.fixed_width(rows), max_new_tokens=12,
                               key=jax.random.key(2), temperature=0.8, eos_id=eos)
    policy = jlora.lora_apply(model.apply, cfg)
    batch = (ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.completion)

    @jax.jit  # weights are arguments, not constants baked into the program
    def learner(frozen, lora, scale, *batch):
        apply = lambda *x, **k: policy(frozen, lora, *x, lora_scale=scale, **k)
        return rollout.completion_logps(apply, model.config, *batch, temperature=0.8)

    @jax.jit
    def reference(frozen, *batch):
        return rollout.completion_logps(functools.partial(model.apply, frozen), model.config, *batch, temperature=0.8)

    # the learner (one prefill per prompt, the completion in one forward) vs the sampler's recorded log-probs
    gap = np.abs(np.asarray(learner(frozen, lora, np.float32(1.0), *batch)) - ro.logps) * ro.completion
    assert gap.max() < 1e-4, gap.max()
    # the reference (the base on the frozen tree) equals the adapter at lora_scale=0 ...
    ref = np.asarray(reference(frozen, *batch))
    off = np.asarray(learner(frozen, lora, np.float32(0.0), *batch))
    np.testing.assert_allclose(off * ro.completion, ref * ro.completion, atol=1e-5)
    # ... and the base model's log-probs from one plain forward over [prompt | completion] (no cache)
    ids = np.concatenate([np.repeat(ro.prompt_ids, 3, 0), ro.tokens], axis=1)
    mask = np.concatenate([np.repeat(ro.prompt_mask, 3, 0), ro.completion.astype(np.int32)], axis=1)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits = jax.jit(model.apply)(frozen, ids, mask, positions)[:, ro.prompt_ids.shape[1] - 1:-1]
    plain = jax.nn.log_softmax(np.asarray(logits, np.float64) / 0.8, axis=-1)
    plain = np.take_along_axis(plain, ro.tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(ref * ro.completion, plain * ro.completion, atol=1e-4)


def test_grpo_smoke_run(tmp_path):
    """The loop end to end on the first 2 layers of SmolLM2: 3 steps, compilations constant, adapter restorable."""
    out = tmp_path / "run"
    assert main(["--steps", "3", "--prompts", "2", "--group", "2", "--num-layers", "2", "--rank", "2",
                 "--targets", "q_proj,v_proj", "--max-new-tokens", "8", "--eval-size", "2",
                 "--eval-max-new-tokens", "8", "--no-plot", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["compilations_constant_after_first_step"] and len(r["history"]) == 3
    assert r["compilations_total"] == r["compilations_after_step"][-1]  # the final scoring reused the first's program
    assert r["sampler_learner_max_abs_logp_diff"] < 1e-3
    assert r["policy_reference_max_abs_logp_diff_first_step"] < 1e-4  # B = 0 at the first step: the policy is the base
    lora, cfg, meta = jlora.restore_adapter(out / "adapter")
    assert meta["method"] == "GRPO" and cfg.rank == 2
    assert (out / "peft_adapter" / "adapter_config.json").exists()
