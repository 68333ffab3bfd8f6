"""examples/models/llama.py: the Flax Llama port against transformers' LlamaForCausalLM (float32, 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from examples.models import llama

import torch  # noqa: E402  (installed by the test extra)
import transformers  # noqa: E402  (installed by the test extra)

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-6)


def make_checkpoint(directory: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random LlamaForCausalLM saved as safetensors (weights scaled up so every layer matters)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TINY, **overrides}, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def torch_logits(directory: Path, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    model = transformers.LlamaForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(input_ids=torch.tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "mlp_bias": True, "rope_theta": 500.0},
                                       {"tie_word_embeddings": True, "num_key_value_heads": 4}])
def test_logits_match_transformers(tmp_path, overrides):
    d = make_checkpoint(tmp_path / "ckpt", **overrides)
    model, params = llama.load_llama(d)
    ids = np.random.default_rng(0).integers(0, 128, (2, 11)).astype(np.int64)
    ours = np.asarray(model.apply(params, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, torch_logits(d, ids), atol=1e-4, rtol=1e-4)


def test_padding_mask_matches_transformers(tmp_path):
    d = make_checkpoint(tmp_path / "ckpt")
    model, params = llama.load_llama(d)
    ids = np.random.default_rng(1).integers(0, 128, (2, 7)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0  # right padding: real tokens see the same context
    ours = np.asarray(model.apply(params, jnp.asarray(ids), jnp.asarray(mask)))
    ref = torch_logits(d, ids, mask)
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=1e-4, rtol=1e-4)


def test_config_read_from_json(tmp_path):
    d = make_checkpoint(tmp_path / "ckpt", rope_theta=1234.0)
    cfg = llama.LlamaConfig.from_json(d / "config.json")
    assert (cfg.hidden_size, cfg.kv_heads, cfg.head_size, cfg.rope_theta) == (64, 2, 16, 1234.0)


def test_refuses_pickle_and_unsupported(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="never unpickles.*safe_serialization=True"):
        llama.load_params(tmp_path, llama.LlamaConfig(**{k: v for k, v in TINY.items()}))
    rope = {"rope_type": "llama3"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_parameters": rope}))
    with pytest.raises(ValueError, match="rope_type 'llama3'"):
        llama.LlamaConfig.from_json(tmp_path / "config.json")


def test_shape_mismatch_names_tensor(tmp_path):
    d = make_checkpoint(tmp_path / "ckpt")
    cfg = llama.LlamaConfig.from_json(d / "config.json")
    wrong = llama.LlamaConfig(**{**cfg.__dict__, "intermediate_size": 32})
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape .* expects"):
        llama.load_params(d, wrong)
