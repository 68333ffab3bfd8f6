"""jlora.peft against real PEFT: adapters move both ways and give the same outputs (float32, 1e-4).

Each adapter has random non-zero factors (PEFT's lora_B and jlora's B are zero at init, which would
make every comparison trivially pass). References are PEFT/PyTorch forward passes.
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import peft as jpeft
from jlora.io import _peft_keys

from examples.models import llama

import torch  # noqa: E402  (installed by the test extra)
import transformers  # noqa: E402  (installed by the test extra)
import peft  # noqa: E402  (installed by the test extra)

TOL = dict(atol=1e-4, rtol=1e-4)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True)
IDS = np.random.default_rng(0).integers(0, 128, (2, 9)).astype(np.int64)
HAS_LAZY = importlib.util.find_spec("jlora.trace._lazy") is not None


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random LlamaForCausalLM checkpoint and its Flax port: (dir, flax model, params)."""
    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, attn_implementation="eager"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(d, safe_serialization=True)
    flax_model, params = llama.load_llama(d)
    return d, flax_model, params


def torch_base(d):
    return transformers.LlamaForCausalLM.from_pretrained(d, attn_implementation="eager").eval()


def randomise(model, seed=1):
    """Non-zero values for everything the adapter trains (factors, saved modules, trainable biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("lora_" in name or "modules_to_save" in name or "trainable_tokens_delta" in name
                    or (p.requires_grad and name.endswith("bias"))):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def torch_logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


def jlora_logits(flax_model, params, lora, cfg, mode="merged"):
    if mode == "merged":
        return np.asarray(flax_model.apply(jlora.merge(params, lora, cfg), jnp.asarray(IDS)))
    return np.asarray(jlora.lora_apply(flax_model.apply, cfg, mode=mode)(params, lora, jnp.asarray(IDS)))


PEFT_CONFIGS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora_patterns": dict(
        r=4, lora_alpha=6, use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 3},
        alpha_pattern={"v_proj": 5, "^model.layers.0.mlp.up_proj": 11}),
    "embedding_head_bias": dict(r=3, lora_alpha=4, target_modules=["embed_tokens", "q_proj", "up_proj"],
                                modules_to_save=["lm_head"], bias="all"),
    "lora_only_bias_layers": dict(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj", "k_proj"], bias="lora_only",
                                  layers_to_transform=[1], exclude_modules=["model.layers.1.self_attn.k_proj"]),
    "regex_targets": dict(r=2, lora_alpha=3, target_modules=r"model\.layers\.\d+\.(self_attn\.o_proj|mlp\.gate_proj)"),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"],
                 rank_pattern={"down_proj": 2}),
    "trainable_tokens": dict(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=[3, 5, 7]),
}


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_peft_adapter_loads_into_jlora(base, tmp_path, name):
    d, flax_model, params = base
    pm = peft.get_peft_model(torch_base(d), peft.LoraConfig(**PEFT_CONFIGS[name]))
    randomise(pm)
    pm.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(torch_base(d), tmp_path / "adapter").eval()
    ref = torch_logits(reloaded)
    assert not np.allclose(ref, torch_logits(torch_base(d)), atol=1e-3)  # the adapter changes the output

    lora, cfg = jpeft.load(tmp_path / "adapter", params, jpeft.LLAMA_KEY_MAP)
    np.testing.assert_allclose(jlora_logits(flax_model, params, lora, cfg), ref, **TOL)
    if HAS_LAZY:
        np.testing.assert_allclose(jlora_logits(flax_model, params, lora, cfg, "lazy"), ref, **TOL)


def test_peft_config_translated(base, tmp_path):
    d, _, params = base
    pm = peft.get_peft_model(torch_base(d), peft.LoraConfig(**PEFT_CONFIGS["rslora_patterns"]))
    randomise(pm)
    pm.save_pretrained(tmp_path)
    lora, cfg = jpeft.load(tmp_path, params, jpeft.LLAMA_KEY_MAP)
    q1, q0 = "params/layers_1/attn/q_proj/kernel", "params/layers_0/attn/q_proj/kernel"
    assert cfg.rslora and cfg.rank == 4 and cfg.alpha == 6
    assert (cfg.rank_for(q1), cfg.rank_for(q0), cfg.rank_for("params/layers_0/mlp/down_proj/kernel")) == (2, 4, 3)
    assert cfg.alpha_for("params/layers_1/attn/v_proj/kernel") == 5
    assert cfg.alpha_for("params/layers_0/mlp/up_proj/kernel") == 11
    assert cfg.alpha_for("params/layers_1/mlp/up_proj/kernel") == 6
    assert cfg.scale_for(q1) == pytest.approx(6 / np.sqrt(2))
    assert lora["params"]["layers_1"]["attn"]["q_proj"]["kernel"]["A"].shape == (64, 2)
    # torch lora_A (r, in) is the transpose of jlora's A (in, r)
    tA = pm.base_model.model.model.layers[1].self_attn.q_proj.lora_A["default"].weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(lora["params"]["layers_1"]["attn"]["q_proj"]["kernel"]["A"]), tA.T)
    assert jlora.LoraConfig.from_json(cfg.to_json()) == cfg


def jlora_adapter(params, cfg, seed=2):
    _, lora = jlora.init(jax.random.key(seed), params, cfg)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.1 * rng.standard_normal(x.shape), x.dtype), lora)


JLORA_CONFIGS = {
    "rslora_patterns_embedding": jlora.LoraConfig(
        rank=4, alpha=6, rslora=True, targets=r"params/(embed_tokens/embedding|layers_\d+/(attn|mlp)/\w+_proj/kernel)",
        rank_pattern={r"params/layers_1/.*": 2, r".*/embedding": 3}, alpha_pattern={r".*/v_proj/kernel": 9}),
    "head_and_biases": jlora.LoraConfig(
        rank=2, alpha=4, targets=r".*/(q_proj|v_proj)/kernel",
        trainable=(r"params/lm_head/kernel", r".*/(q_proj|o_proj)/bias")),
    "lora_only_bias": jlora.LoraConfig(rank=3, alpha=3, targets=r".*/q_proj/kernel", trainable=r".*/q_proj/bias"),
    "dora": jlora.LoraConfig(
        rank=3, alpha=5, use_dora=True,
        targets=r"params/(embed_tokens/embedding|layers_\d+/(attn/(q|k)_proj|mlp/up_proj)/kernel)"),
    "embedding_rows": jlora.LoraConfig(rank=2, alpha=4, targets=r".*/v_proj/kernel",
                                       embedding_rows={r"params/embed_tokens/embedding": (9, 2, 4)}),
}


@pytest.mark.parametrize("name", list(JLORA_CONFIGS))
def test_jlora_adapter_loads_into_peft(base, tmp_path, name):
    d, flax_model, params = base
    cfg = JLORA_CONFIGS[name]
    lora = jlora_adapter(params, cfg)
    out = jpeft.save(tmp_path / "adapter", lora, cfg, jpeft.LLAMA_KEY_MAP, params=params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. PEFT's "unexpected keys" warning
        pm = peft.PeftModel.from_pretrained(torch_base(d), out).eval()
    np.testing.assert_allclose(torch_logits(pm), jlora_logits(flax_model, params, lora, cfg), **TOL)
    # and back: the same arrays, an equivalent config
    back, cfg2 = jpeft.load(out, params, jpeft.LLAMA_KEY_MAP)
    flat, flat2 = jlora.paths.flatten(lora), jlora.paths.flatten(back)
    assert flat.keys() == flat2.keys()
    for p in flat:
        np.testing.assert_array_equal(np.asarray(flat[p]), np.asarray(flat2[p]), err_msg=p)
        if p.endswith("/A"):
            k = p[:-2]
            assert (cfg2.rank_for(k), cfg2.scale_for(k)) == (cfg.rank_for(k), pytest.approx(cfg.scale_for(k)))


def test_saved_config_and_keys(base, tmp_path):
    _, _, params = base
    cfg = JLORA_CONFIGS["head_and_biases"]
    out = jpeft.save(tmp_path, jlora_adapter(params, cfg), cfg, jpeft.LLAMA_KEY_MAP, params=params)
    body = json.loads((out / "adapter_config.json").read_text())
    assert body["peft_type"] == "LORA" and body["bias"] == "all" and body["modules_to_save"] == ["lm_head"]
    assert "model.layers.0.self_attn.q_proj" in body["target_modules"]
    from safetensors.numpy import load_file
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 64)
    assert keys["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (32, 2)
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in keys
    assert "base_model.model.model.layers.0.self_attn.o_proj.bias" in keys


def test_named_adapters_both_ways(base, tmp_path):
    d, flax_model, params = base
    pm = peft.get_peft_model(torch_base(d), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    pm.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["v_proj", "down_proj"]))
    randomise(pm)
    pm.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "second" / "adapter_model.safetensors").is_file()
    pm.set_adapter("second")
    pm.eval()
    lora, cfg = jpeft.load(tmp_path / "peft", params, jpeft.LLAMA_KEY_MAP, adapter_name="second")
    np.testing.assert_allclose(jlora_logits(flax_model, params, lora, cfg), torch_logits(pm), **TOL)

    mine = jlora.LoraConfig(rank=2, alpha=3, targets=r".*/k_proj/kernel")
    mine_lora = jlora_adapter(params, mine)
    out = jpeft.save(tmp_path / "mine", mine_lora, mine, jpeft.LLAMA_KEY_MAP, adapter_name="kx")
    assert out == tmp_path / "mine" / "kx"
    pm2 = peft.PeftModel.from_pretrained(torch_base(d), tmp_path / "mine", subfolder="kx", adapter_name="kx").eval()
    np.testing.assert_allclose(torch_logits(pm2), jlora_logits(flax_model, params, mine_lora, mine), **TOL)


# --- conv and multi-axis kernels (a tiny custom model on both sides) ---------------------------------

class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.fc = torch.nn.Linear(5, 6)

    def forward(self, x):  # x: (batch, 3, H, W)
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def flax_net(params, x):  # x: (batch, H, W, 3); fc is a DenseGeneral kernel (5, 2, 3)
    p = params["params"]
    y = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv"]["bias"]
    return jnp.einsum("bi,ijk->bjk", y.mean(axis=(1, 2)), p["fc"]["kernel"]) + p["fc"]["bias"]


NET_MAP = [(r"params/(conv|fc)/(?:kernel|bias)", r"\1")]


def net_params(net):
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    return {"params": {"conv": {"kernel": jnp.asarray(sd["conv.weight"].transpose(2, 3, 1, 0)),
                                "bias": jnp.asarray(sd["conv.bias"])},
                       "fc": {"kernel": jnp.asarray(sd["fc.weight"].T.reshape(5, 2, 3)),
                              "bias": jnp.asarray(sd["fc.bias"].reshape(2, 3))}}}


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv_and_multi_axis_both_ways(tmp_path, use_dora):
    torch.manual_seed(0)
    net = TorchNet().eval()
    params = net_params(net)
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(flax_net(params, x.transpose(0, 2, 3, 1))).reshape(2, 6),
                               net(torch.tensor(x)).detach().numpy(), **TOL)

    pm = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=3, target_modules=["conv", "fc"],
                                                  use_dora=use_dora))
    randomise(pm)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        ref = pm(torch.tensor(x)).numpy()
    lora, cfg = jpeft.load(tmp_path / "peft", params, NET_MAP)
    assert lora["params"]["conv"]["kernel"]["A"].shape == (3, 3, 3, 2)
    assert lora["params"]["fc"]["kernel"]["B"].shape == (2, 2, 3)
    if use_dora:  # PEFT's conv magnitude is (1, cout, 1, 1), its linear one (out,)
        m_conv, m_fc = lora["params"]["conv"]["kernel"]["m"], lora["params"]["fc"]["kernel"]["m"]
        assert (m_conv.shape, m_fc.shape) == ((5,), (2, 3))
    ours = flax_net(jlora.merge(params, lora, cfg), x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(ours).reshape(2, 6), ref, **TOL)

    out = jpeft.save(tmp_path / "mine", lora, cfg, NET_MAP, conv=r"params/conv/kernel")
    torch.manual_seed(0)
    clean = TorchNet().eval()  # the same base weights as `net` (same seed)
    pm2 = peft.PeftModel.from_pretrained(clean, out).eval()
    with torch.no_grad():
        np.testing.assert_allclose(pm2(torch.tensor(x)).numpy(), ref, **TOL)


# --- PEFT's module-name matching rules, checked against PEFT itself ---------------------------------

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj",
         "model.layers.1.mlp.down_proj", "model.embed_tokens", "lm_head", "q_proj",
         "encoder.layer.3.attention.self.query"]


@pytest.mark.parametrize("body", [
    dict(target_modules=["q_proj", "query"]),
    dict(target_modules=["q_proj"], exclude_modules=["model.layers.1.self_attn.q_proj"]),
    dict(target_modules=["q_proj", "down_proj"], exclude_modules=r".*layers\.0.*"),
    dict(target_modules=r".*layers\.1\..*", modules_to_save=["mlp"]),
    dict(target_modules=["q_proj", "query"], layers_to_transform=[1, 3]),
    dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers"),
])
def test_target_rules_match_peft(body):
    from peft.tuners.tuners_utils import check_target_module_exists
    pc = peft.LoraConfig(**body)
    for name in NAMES:
        want = check_target_module_exists(pc, name)
        want = bool(want) and type(want).__name__ != "_ExcludedModule"
        assert _peft_keys._peft_targets(body, name) == want, (body, name)


def test_pattern_keys_match_peft():
    from peft.utils.other import get_pattern_key
    patterns = {"layers.1.self_attn.q_proj": 1, "q_proj": 2, r"^model.embed\w+": 3, "down_proj": 4}
    for name in NAMES:
        key = _peft_keys._pattern_key(patterns, name)
        assert (key if key is not None else name) == get_pattern_key(list(patterns), name), name


# --- bad input ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_dir(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("peft_adapter")
    pm = peft.get_peft_model(torch_base(base[0]), peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    randomise(pm)
    pm.save_pretrained(d)
    return d


def copy_adapter(src, dst, edit=None):
    dst.mkdir(parents=True, exist_ok=True)
    body = json.loads((src / "adapter_config.json").read_text())
    if edit:
        edit(body)
    (dst / "adapter_config.json").write_text(json.dumps(body))
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    return dst


def test_pickled_adapter_refused(base, peft_dir, tmp_path):
    (tmp_path / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(ValueError, match=r"adapter_model\.bin.*never unpickles.*safe_serialization=True"):
        jpeft.load(tmp_path, base[2], jpeft.LLAMA_KEY_MAP)


def test_missing_files(base, peft_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jpeft.load(tmp_path / "nope", base[2], jpeft.LLAMA_KEY_MAP)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        jpeft.load(tmp_path, base[2], jpeft.LLAMA_KEY_MAP)
    (tmp_path / "adapter_model.safetensors").write_bytes((peft_dir / "adapter_model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        jpeft.load(tmp_path, base[2], jpeft.LLAMA_KEY_MAP)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jpeft.load(tmp_path, base[2], jpeft.LLAMA_KEY_MAP, adapter_name="second")


def test_unplaceable_key_names_key_and_module(base, peft_dir):
    attn_only = [pair for pair in jpeft.LLAMA_KEY_MAP if "mlp" not in pair[0]]
    with pytest.raises(ValueError, match=r"'base_model\.model\.model\.layers\.0\.mlp\.down_proj\.lora_A\.weight'.*"
                                         r"'model\.layers\.0\.mlp\.down_proj'"):
        jpeft.load(peft_dir, base[2], attn_only)


def test_shape_mismatch_names_key_path_shapes(base, peft_dir):
    params = jax.tree.map(lambda x: x, base[2])
    params["params"]["layers_0"]["attn"]["q_proj"]["kernel"] = jnp.zeros((64, 32))
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight.*'params/layers_0/attn/q_proj/kernel' of shape "
                                         r"\(64, 32\).*got lora_A \(2, 64\), lora_B \(64, 2\)"):
        jpeft.load(peft_dir, params, jpeft.LLAMA_KEY_MAP)


def test_unsupported_refused_unknown_keys_warned(base, peft_dir, tmp_path):
    params = base[2]
    d = copy_adapter(peft_dir, tmp_path / "dora", lambda b: b.update(use_dora=True))
    with pytest.raises(ValueError, match="has no lora_magnitude_vector but adapter_config.json has use_dora=True"):
        jpeft.load(d, params, jpeft.LLAMA_KEY_MAP)
    d = copy_adapter(peft_dir, tmp_path / "bias", lambda b: b.update(lora_bias=True))
    with pytest.raises(ValueError, match="lora_bias=True"):
        jpeft.load(d, params, jpeft.LLAMA_KEY_MAP)
    d = copy_adapter(peft_dir, tmp_path / "params", lambda b: b.update(target_parameters=["mlp.experts.w"]))
    with pytest.raises(ValueError, match=r"target_parameters \['mlp.experts.w'\] match no 3-D params leaf"):
        jpeft.load(d, params, jpeft.LLAMA_KEY_MAP)
    d = copy_adapter(peft_dir, tmp_path / "pissa", lambda b: b.update(init_lora_weights="pissa_niter_4"))
    with pytest.raises(ValueError, match="init_lora_weights='pissa_niter_4'.*changes the base weights"):
        jpeft.load(d, params, jpeft.LLAMA_KEY_MAP)
    d = copy_adapter(peft_dir, tmp_path / "new", lambda b: b.update(shiny_new_option=3, other_new={"a": 1}))
    with pytest.warns(UserWarning, match=r"\['other_new', 'shiny_new_option'\]"):
        lora, _ = jpeft.load(d, params, jpeft.LLAMA_KEY_MAP)
    assert "q_proj" in lora["params"]["layers_1"]["attn"]


def test_adapter_not_targeted_by_config_refused(base, peft_dir, tmp_path):
    d = copy_adapter(peft_dir, tmp_path / "t", lambda b: b.update(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.down_proj'.*does not target it"):
        jpeft.load(d, base[2], jpeft.LLAMA_KEY_MAP)


def test_save_errors_and_no_stray_files(base, tmp_path):
    params = base[2]
    cfg = jlora.LoraConfig(rank=2, targets=r".*/q_proj/kernel")
    lora = jlora_adapter(params, cfg)
    with pytest.raises(ValueError, match=r"cannot place lora path 'params/layers_0/attn/q_proj/kernel'"):
        jpeft.save(tmp_path / "x", lora, cfg, [(r"params/lm_head/kernel", "lm_head")])
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written on failure

    out = jpeft.save(tmp_path / "out", lora, cfg, jpeft.LLAMA_KEY_MAP, adapter_name="named")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "out", "out/named", "out/named/adapter_config.json", "out/named/adapter_model.safetensors"]
    before = (out / "adapter_model.safetensors").read_bytes()
    other = jlora_adapter(params, cfg, seed=7)
    with pytest.raises(FileExistsError, match="already holds an adapter.*overwrite=True"):
        jpeft.save(tmp_path / "out", other, cfg, jpeft.LLAMA_KEY_MAP, adapter_name="named")
    assert (out / "adapter_model.safetensors").read_bytes() == before
    jpeft.save(tmp_path / "out", other, cfg, jpeft.LLAMA_KEY_MAP, adapter_name="named", overwrite=True)
    assert (out / "adapter_model.safetensors").read_bytes() != before
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ValueError, match="adapter_name"):
        jpeft.save(tmp_path / "out", lora, cfg, jpeft.LLAMA_KEY_MAP, adapter_name="../escape")
    wrong = cfg.replace(rank=3)
    with pytest.raises(ValueError, match="has rank 2.*rank_for gives 3"):
        jpeft.save(tmp_path / "w", lora, wrong, jpeft.LLAMA_KEY_MAP)


def test_key_map_forms():
    assert jpeft.module_name("params/layers_3/mlp/up_proj/kernel", jpeft.LLAMA_KEY_MAP) == "model.layers.3.mlp.up_proj"
    assert jpeft.module_name("params/layers_3/attn/q_proj/bias", lambda p: None) is None
    fn = lambda p: re.sub(r"/kernel$", "", p).replace("/", ".") if p.endswith("kernel") else None  # noqa: E731
    assert jpeft.module_name("a/b/bias", fn) == "a.b"  # a bias is placed at its kernel's module
    with pytest.raises(TypeError, match="key_map"):
        jpeft.module_name("a", "not a map")


# --- BERT (examples/models/minilm.py) --------------------------------------------------------------------------

BERT = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=32, type_vocab_size=2)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from examples.models import minilm
    d = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**BERT, attn_implementation="eager"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(d, safe_serialization=True)
    cfg = minilm.MiniLMConfig(**BERT)
    params = minilm.load_params(d / "model.safetensors", cfg)
    ids = np.random.default_rng(0).integers(0, 128, (2, 7)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0

    def run_flax(p):
        out = minilm.MiniLM(cfg).apply(p, jnp.asarray(ids), jnp.asarray(mask), method=minilm.MiniLM.hidden_states)
        return np.asarray(out)[mask == 1]

    def run_torch(m):
        with torch.no_grad():
            out = m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
        return out[mask == 1]

    def fresh():
        return transformers.BertModel.from_pretrained(d, attn_implementation="eager").eval()

    return params, run_flax, run_torch, fresh


def test_bert_both_ways(bert, tmp_path):
    params, run_flax, run_torch, fresh = bert
    np.testing.assert_allclose(run_flax(params), run_torch(fresh()), **TOL)
    pm = peft.get_peft_model(fresh(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense", "word_embeddings"],
        modules_to_save=["LayerNorm"], bias="lora_only", rank_pattern={"value": 2}))
    randomise(pm)
    pm.save_pretrained(tmp_path / "peft")
    ref = run_torch(peft.PeftModel.from_pretrained(fresh(), tmp_path / "peft").eval())
    lora, cfg = jpeft.load(tmp_path / "peft", params, jpeft.BERT_KEY_MAP)
    assert "params/encoder/layer_1/mlp_norm/scale" in jlora.paths.flatten(lora)
    np.testing.assert_allclose(run_flax(jlora.merge(params, lora, cfg)), ref, **TOL)

    mine = jlora.LoraConfig(rank=3, alpha=5, targets=r".*/attention/(key|output)/kernel",
                            trainable=(r".*/attention_norm/(scale|bias)", r".*/attention/key/bias"))
    mine_lora = jlora_adapter(params, mine)
    out = jpeft.save(tmp_path / "mine", mine_lora, mine, jpeft.BERT_KEY_MAP)
    pm2 = peft.PeftModel.from_pretrained(fresh(), out).eval()
    np.testing.assert_allclose(run_torch(pm2), run_flax(jlora.merge(params, mine_lora, mine)), **TOL)


def test_bert_dense_target_also_adapts_the_pooler(bert, tmp_path):
    """PEFT's ``dense`` target also matches BertModel's ``pooler.dense``, which the Flax port has not."""
    params, run_flax, run_torch, fresh = bert
    pm = peft.get_peft_model(fresh(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["dense"]))
    randomise(pm)
    pm.save_pretrained(tmp_path / "peft")
    ref = run_torch(peft.PeftModel.from_pretrained(fresh(), tmp_path / "peft").eval())
    with pytest.raises(ValueError, match=r"module 'pooler\.dense'.*Fix: extend key_map.*or pass ignore=.*BERT's pooler"):
        jpeft.load(tmp_path / "peft", params, jpeft.BERT_KEY_MAP)
    lora, cfg = jpeft.load(tmp_path / "peft", params, jpeft.BERT_KEY_MAP, ignore=r"pooler\.dense")
    assert not any("pooler" in p for p in jlora.paths.flatten(lora))
    np.testing.assert_allclose(run_flax(jlora.merge(params, lora, cfg)), ref, **TOL)  # hidden states: no pooler


def test_save_refuses_mismatched_dora_and_residual_inits(base, tmp_path):
    params = base[2]
    lora = jlora_adapter(params, jlora.LoraConfig(rank=2, targets=r".*/q_proj/kernel"))
    for change, match in [({"use_dora": True}, "use_dora is True but the lora tree has no DoRA magnitude 'm'"),
                          ({"init": "pissa"}, r"init='pissa'.*convert it first with jlora\.to_plain_adapter"),
                          ({"init": "olora"}, r"init='olora'.*convert it first with jlora\.to_plain_adapter")]:
        cfg = jlora.LoraConfig(rank=2, targets=r".*/q_proj/kernel", **change)
        with pytest.raises(ValueError, match=match):
            jpeft.save(tmp_path / "x", lora, cfg, jpeft.LLAMA_KEY_MAP)
    assert not (tmp_path / "x").exists()


def test_load_with_abstract_params(base, peft_dir):
    params = base[2]
    lora, cfg = jpeft.load(peft_dir, params, jpeft.LLAMA_KEY_MAP)
    abstract = jax.eval_shape(lambda: params)
    lora2, cfg2 = jpeft.load(peft_dir, abstract, jpeft.LLAMA_KEY_MAP)
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), lora, lora2)
