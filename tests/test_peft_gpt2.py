"""PEFT interop on transformers' GPT-2, whose ``Conv1D`` layers store torch weights ``(in, out)``.

A plain-JAX GPT-2 (params named like a Flax port: ``params/h_0/attn/c_attn/kernel``, kernels
``(in, out)`` exactly as GPT-2's ``Conv1D`` stores them) matches ``GPT2LMHeadModel`` within 1e-4.
Then LoRA factors on the fused ``c_attn`` and on ``c_proj``, and whole modules (PEFT
``modules_to_save``) move both ways with ``fan_in_fan_out``, checked on logits against real PEFT.
BERT: PEFT's ``dense`` target also adapts ``pooler.dense``; ``ignore=`` skips it on purpose.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import peft as jpeft

import torch  # noqa: E402  (the test extra installs it; a missing one must fail, not skip)
import transformers  # noqa: E402
import peft  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)
CFG = dict(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)
IDS = np.random.default_rng(0).integers(0, 96, (2, 7)).astype(np.int64)


def layer_norm(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def gpt2(params, ids):
    p = params["params"]
    t = ids.shape[1]
    h = p["wte"]["embedding"][ids] + p["wpe"]["embedding"][jnp.arange(t)]
    n_head = CFG["n_head"]
    mask = jnp.tril(jnp.ones((t, t), bool))
    for i in range(CFG["n_layer"]):
        blk = p[f"h_{i}"]
        a = layer_norm(h, blk["ln_1"])
        qkv = a @ blk["attn"]["c_attn"]["kernel"] + blk["attn"]["c_attn"]["bias"]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        heads = lambda z: z.reshape(z.shape[0], t, n_head, -1).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        w = jnp.where(mask, q @ k.transpose(0, 1, 3, 2) / jnp.sqrt(q.shape[-1]), -1e9)
        o = (jax.nn.softmax(w, -1) @ v).transpose(0, 2, 1, 3).reshape(h.shape)
        h = h + o @ blk["attn"]["c_proj"]["kernel"] + blk["attn"]["c_proj"]["bias"]
        m = layer_norm(h, blk["ln_2"])
        m = jax.nn.gelu(m @ blk["mlp"]["c_fc"]["kernel"] + blk["mlp"]["c_fc"]["bias"], approximate=True)
        h = h + m @ blk["mlp"]["c_proj"]["kernel"] + blk["mlp"]["c_proj"]["bias"]
    h = layer_norm(h, p["ln_f"])
    return h @ p["wte"]["embedding"].T


def params_of(model):
    sd = {k: jnp.asarray(v.detach().numpy()) for k, v in model.state_dict().items()}
    p = {"wte": {"embedding": sd["transformer.wte.weight"]}, "wpe": {"embedding": sd["transformer.wpe.weight"]},
         "ln_f": {"scale": sd["transformer.ln_f.weight"], "bias": sd["transformer.ln_f.bias"]}}
    for i in range(CFG["n_layer"]):
        pre = f"transformer.h.{i}."
        blk = {ln: {"scale": sd[pre + ln + ".weight"], "bias": sd[pre + ln + ".bias"]} for ln in ("ln_1", "ln_2")}
        blk["attn"] = {m: {"kernel": sd[f"{pre}attn.{m}.weight"], "bias": sd[f"{pre}attn.{m}.bias"]}
                       for m in ("c_attn", "c_proj")}
        blk["mlp"] = {m: {"kernel": sd[f"{pre}mlp.{m}.weight"], "bias": sd[f"{pre}mlp.{m}.bias"]}
                      for m in ("c_fc", "c_proj")}
        p[f"h_{i}"] = blk
    return {"params": p}


def fresh():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CFG, attn_implementation="eager")).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    return model


@pytest.fixture(scope="module")
def base():
    model = fresh()
    params = params_of(model)
    with torch.no_grad():
        ref = model(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(np.asarray(gpt2(params, jnp.asarray(IDS))), ref, **TOL)
    return params


def logits_peft(directory):
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(fresh(), directory).eval()(torch.tensor(IDS)).logits.numpy()


TARGETS = r".*/(c_attn|c_proj)/kernel"
WHOLE = r"params/h_1/mlp/c_fc/(kernel|bias)"


def test_jlora_to_peft_factors_and_whole_modules(base, tmp_path):
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=TARGETS, trainable=WHOLE)
    frozen, lora = jlora.init(jax.random.key(0), base, cfg, apply_fn=gpt2, args=(jnp.asarray(IDS),))
    assert lora["params"]["h_0"]["attn"]["c_attn"]["kernel"].layout.roles == "io"  # Conv1D: (in, out)
    lora = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape), lora)
    ours = np.asarray(jlora.lora_apply(gpt2, cfg, strict=True)(frozen, lora, jnp.asarray(IDS)))
    out = jpeft.save(tmp_path / "a", lora, cfg, jpeft.GPT2_KEY_MAP, fan_in_fan_out=jpeft.GPT2_FAN_IN_FAN_OUT)
    body = json.loads((out / "adapter_config.json").read_text())
    assert body["fan_in_fan_out"] is True and body["modules_to_save"] == ["transformer.h.1.mlp.c_fc"]
    np.testing.assert_allclose(logits_peft(out), ours, **TOL)
    # without fan_in_fan_out the whole (in, out) module is exported transposed: PEFT refuses or computes otherwise
    bad = jpeft.save(tmp_path / "b", lora, cfg, jpeft.GPT2_KEY_MAP)
    with pytest.raises(RuntimeError):
        logits_peft(bad)


def test_peft_to_jlora_factors_and_whole_modules(base, tmp_path):
    model = fresh()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj"],
                                                    fan_in_fan_out=True, modules_to_save=["h.1.mlp.c_fc"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, prm in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                prm.add_(torch.randn(prm.shape, generator=g) * 0.05)
    pm.eval().save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        ref = pm(torch.tensor(IDS)).logits.numpy()
    lora, cfg = jpeft.load(tmp_path / "peft", base, jpeft.GPT2_KEY_MAP, fan_in_fan_out=jpeft.GPT2_FAN_IN_FAN_OUT)
    np.testing.assert_allclose(np.asarray(gpt2(jlora.merge(base, lora, cfg), jnp.asarray(IDS))), ref, **TOL)
    # shapes alone tell a non-square module; the adapter says fan_in_fan_out, so that is enough here
    lora2, cfg2 = jpeft.load(tmp_path / "peft", base, jpeft.GPT2_KEY_MAP)
    np.testing.assert_allclose(np.asarray(gpt2(jlora.merge(base, lora2, cfg2), jnp.asarray(IDS))), ref, **TOL)


def test_square_whole_module_with_fan_in_fan_out_needs_the_rule(base, tmp_path):
    model = fresh()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                    modules_to_save=["h.0.attn.c_proj"]))
    pm.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match=r"square weight \(32, 32\).*fan_in_fan_out.*GPT2_FAN_IN_FAN_OUT"):
        jpeft.load(tmp_path / "peft", base, jpeft.GPT2_KEY_MAP)
    lora, cfg = jpeft.load(tmp_path / "peft", base, jpeft.GPT2_KEY_MAP, fan_in_fan_out=jpeft.GPT2_FAN_IN_FAN_OUT)
    np.testing.assert_array_equal(np.asarray(lora["params"]["h_0"]["attn"]["c_proj"]["kernel"]),
                                  pm.base_model.model.transformer.h[0].attn.c_proj.modules_to_save["default"]
                                  .weight.detach().numpy())


def test_kernel_trained_without_its_bias(base, tmp_path):
    cfg = jlora.LoraConfig(rank=2, targets=r".*/c_attn/kernel", trainable=r"params/h_1/mlp/c_fc/kernel")
    frozen, lora = jlora.init(jax.random.key(0), base, cfg, apply_fn=gpt2, args=(jnp.asarray(IDS),))
    with pytest.raises(ValueError, match=r"without its bias.*params=<the base parameters>"):
        jpeft.save(tmp_path / "a", lora, cfg, jpeft.GPT2_KEY_MAP, fan_in_fan_out=jpeft.GPT2_FAN_IN_FAN_OUT)
    lora = jax.tree.map(lambda a: a + 0.05, lora)
    out = jpeft.save(tmp_path / "b", lora, cfg, jpeft.GPT2_KEY_MAP, fan_in_fan_out=jpeft.GPT2_FAN_IN_FAN_OUT,
                     params=base)
    ours = np.asarray(jlora.lora_apply(gpt2, cfg)(frozen, lora, jnp.asarray(IDS)))
    np.testing.assert_allclose(logits_peft(out), ours, **TOL)


def test_integer_factor_and_non_utf8_config_refused(base, tmp_path):
    from safetensors.numpy import save_file

    d = tmp_path / "int"
    d.mkdir()
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": np.ones((2, 32), np.int32),
               "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": np.ones((96, 2), np.float32)},
              str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                       "target_modules": ["c_attn"]}))
    with pytest.raises(ValueError, match=r"lora_A.weight' has dtype int32, expected float LoRA factors"):
        jpeft.load(d, base, jpeft.GPT2_KEY_MAP)
    (d / "adapter_config.json").write_bytes(b'{"peft_type": "LORA", "r": \xff}')
    with pytest.raises(ValueError, match=r"is not UTF-8 text.*fix"):
        jpeft.load(d, base, jpeft.GPT2_KEY_MAP)
