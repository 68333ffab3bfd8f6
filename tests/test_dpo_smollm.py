"""examples/dpo_smollm.py: the DPO loss against TRL's DPOTrainer, the pairs, and a smoke run of the loop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from examples import extraction
from examples.dpo_smollm import dpo_loss, main, pack, pair_stats

WORDS = ["<pad>", "<eos>"] + [f"w{i}" for i in range(30)]


def tiny_lm(seed):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(cfg).float()


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<pad>")


def sequence_logps(model, batch):
    """Sum of log p(token) over each row's completion tokens: a plain forward, float64 log-softmax."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    tok = torch.gather(logp, 2, batch["input_ids"][:, 1:, None])[..., 0]
    return (tok * batch["completion_mask"][:, 1:]).sum(dim=1).numpy()


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # transformers, via DPOConfig
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_matches_trl(loss_type, tmp_path):
    """TRL's DPOTrainer (trl==1.16.0) computes its loss from its models; ours gets the same models' log-probs."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rng = np.random.default_rng(0)
    words = lambda n: " ".join(f"w{i}" for i in rng.integers(0, 30, n))
    data = Dataset.from_dict({"prompt": [words(4), words(3), words(5), words(2)],
                              "chosen": [f" {words(n)} <eos>" for n in (3, 5, 2, 4)],
                              "rejected": [f" {words(n)} <eos>" for n in (4, 2, 6, 3)]})
    policy, reference = tiny_lm(0), tiny_lm(1)
    beta = 0.3
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=[loss_type], report_to="none", use_cpu=True,
                     bf16=False, fp16=False, per_device_train_batch_size=4, precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(data))])
    trl_loss = float(trainer.compute_loss(trainer.model, batch).detach())

    pol, ref = sequence_logps(policy, batch), sequence_logps(reference, batch)
    n = batch["completion_mask"].sum(dim=1).numpy()
    c, r = slice(0, 4), slice(4, 8)  # TRL's batch: the chosen rows, then the rejected rows
    ours = dpo_loss(jnp.asarray(pol[c]), jnp.asarray(pol[r]), jnp.asarray(ref[c]), jnp.asarray(ref[r]), beta=beta,
                    loss_type=loss_type, chosen_tokens=jnp.asarray(n[c]), rejected_tokens=jnp.asarray(n[r]))
    print(f"{loss_type}: TRL {trl_loss:.8f} ours {float(ours.mean()):.8f} |diff| {abs(float(ours.mean()) - trl_loss):.1e}")
    assert abs(float(ours.mean()) - trl_loss) < 1e-6, (float(ours.mean()), trl_loss)
    # TRL's logged implicit-reward statistics equal ours on the same log-probs
    seq = jnp.asarray(np.stack([pol[c], pol[r]], axis=1).reshape(-1))
    refs = jnp.asarray(np.stack([ref[c], ref[r]], axis=1).reshape(-1))
    st = pair_stats(seq, refs, beta)
    metrics = trainer._metrics["train"]
    assert abs(float(st["margin"]) - metrics["rewards/margins"][-1]) < 1e-6
    assert abs(float(st["reward_accuracy"]) - metrics["rewards/accuracies"][-1]) < 1e-6


def test_dpo_loss_against_float64():
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.normal(-20, 5, 6) for _ in range(4))
    nc, nr = rng.integers(3, 30, 6), rng.integers(3, 30, 6)
    h = (pc - rc) - (pr - rr)
    expected = {"sigmoid": np.log1p(np.exp(-0.1 * h)), "hinge": np.maximum(0, 1 - 0.1 * h),
                "ipo": ((pc - rc) / nc - (pr - rr) / nr - 1 / 0.2) ** 2}
    for kind, want in expected.items():
        got = dpo_loss(*(jnp.asarray(a, jnp.float32) for a in (pc, pr, rc, rr)), beta=0.1, loss_type=kind,
                       chosen_tokens=jnp.asarray(nc), rejected_tokens=jnp.asarray(nr))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(*(jnp.zeros(1),) * 4, beta=0.1, loss_type="ipo")


def test_pairs_layout_and_corruptions_are_wrong():
    from examples.dpo_smollm import corrupt

    exs = extraction.make_examples(200, "train")
    rng = np.random.default_rng(0)
    kinds = set()
    for ex in exs:
        kind, text = corrupt(ex, rng)
        kinds.add(kind)
        assert extraction.score([text], [ex])["exact_match"] == 0.0, (kind, text)
    assert kinds == {"first_name", "last_name", "city", "extra_key", "age", "missing_key", "prose"}
    ids, mask, tokens, completion = pack([{"chosen": [5, 6, 2], "rejected": [7, 2]}], [[9, 9, 9]], 4, 4, 2)
    assert ids.tolist() == [[2, 9, 9, 9]] and mask.tolist() == [[0, 1, 1, 1]]
    assert tokens.tolist() == [[5, 6, 2, 2], [7, 2, 2, 2]]
    assert completion.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]


def test_dpo_smoke_run(tmp_path):
    """The loop end to end on the first 2 layers of SmolLM2: 3 steps, compilations constant, adapter restorable."""
    out = tmp_path / "run"
    assert main(["--steps", "3", "--batch-size", "2", "--self-negatives", "2", "--eval-size", "2", "--num-layers", "2",
                 "--rank", "2", "--targets", "q_proj,v_proj", "--max-new-tokens", "8", "--no-plot",
                 "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["compilations_constant_after_first_step"] and len(r["history"]) == 3
    assert all(np.isfinite(h["loss"]) for h in r["history"])
    assert r["held_out_pairs_before"]["margin"] == 0.0  # B = 0: the policy is the reference
    lora, cfg, meta = jlora.restore_adapter(out / "adapter")
    assert meta["method"] == "DPO (sigmoid)" and cfg.rank == 2
    assert (out / "peft_adapter" / "adapter_config.json").exists()
    assert jax.tree.leaves(lora)
