"""What a new user hit (issue 23), each written as that user's flow: NNX merge-and-update, PEFT adapters for
models that keep PyTorch's kernel layout, serving stacks on disk, rank and leaf-type errors.

References are independent: float64 NumPy for the merged weights and model outputs, PyTorch + PEFT for
a PEFT adapter's function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from jlora import peft as jpeft

import torch  # noqa: E402  (the test extra installs it; a missing one must fail, not skip)
import peft  # noqa: E402


# --- 1. NNX: frozen never aliases the model -----------------------------------------------------

class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(4, 8, rngs=rngs)
        self.down = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def _np_forward(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.maximum(x @ w["up/kernel"] + w["up/bias"], 0.0)
    return h @ w["down/kernel"] + w["down/bias"]


def _np_merged(frozen, lora, cfg) -> dict[str, np.ndarray]:
    """W0 + (alpha / r) A @ B in float64 from the arrays alone."""
    w = {p: np.asarray(v, np.float64) for p, v in jlora.paths.flatten(frozen).items()}
    f = jlora.paths.flatten(lora)
    for p in ("up/kernel", "down/kernel"):
        w[p] = w[p] + cfg.alpha / cfg.rank * np.asarray(f[p + "/A"], np.float64) @ np.asarray(f[p + "/B"], np.float64)
    return w


def _nnx_setup():
    model = MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (6, 4))
    graphdef, state = nnx.split(model)
    apply = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731  (docs/getting-started.md's NNX example)
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=r"(up|down)/kernel")
    frozen, lora = jlora.init(jax.random.key(1), state, cfg, apply_fn=apply, args=(x,))
    return model, x, apply, cfg, frozen, lora


def test_nnx_merge_and_update_twice_is_once():
    model, x, _, cfg, frozen, lora = _nnx_setup()
    w0 = {p: np.asarray(v) for p, v in jlora.paths.flatten(frozen).items()}
    lora = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape) * 0.3, lora)  # "trained"
    want = _np_forward(_np_merged(frozen, lora, cfg), np.asarray(x, np.float64))
    for _ in range(2):  # getting started's NNX merge line, run again (e.g. after more training, or by habit)
        nnx.update(model, jlora.merge(frozen, lora, cfg))
        np.testing.assert_allclose(np.asarray(model(x)), want, rtol=1e-5, atol=1e-5)
    for p, v in jlora.paths.flatten(frozen).items():  # frozen is still W0, bit for bit
        np.testing.assert_array_equal(np.asarray(v), w0[p], err_msg=p)


def test_nnx_train_update_train_is_training_once():
    model, x, apply, cfg, frozen, lora0 = _nnx_setup()
    y = jnp.sin(x[:, :3])
    fn = jlora.lora_apply(apply, cfg)
    tx = jlora.optimizer(optax.adam(1e-2), lora0)

    @jax.jit
    def step(frozen, lora, opt_state):
        loss, grads = jax.value_and_grad(lambda l: jnp.mean((fn(frozen, l, x) - y) ** 2))(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state

    def train(lora, opt_state, n):
        for _ in range(n):
            lora, opt_state = step(frozen, lora, opt_state)
        return lora, opt_state

    once, _ = train(lora0, tx.init(lora0), 10)
    lora, opt_state = train(lora0, tx.init(lora0), 5)
    nnx.update(model, jlora.merge(frozen, lora, cfg))  # look at the model half-way
    lora, _ = train(lora, opt_state, 5)
    for (p, a), b in zip(jlora.paths.flatten(once).items(), jax.tree.leaves(lora)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)
    nnx.update(model, jlora.merge(frozen, lora, cfg))
    want = _np_forward(_np_merged(frozen, once, cfg), np.asarray(x, np.float64))
    np.testing.assert_allclose(np.asarray(model(x)), want, rtol=1e-5, atol=1e-5)


def test_init_returns_new_containers_over_the_same_arrays():
    params = {"params": {"d": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}}
    frozen, _ = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets=".*kernel"))
    assert frozen is not params and frozen["params"] is not params["params"]
    assert frozen["params"]["d"]["kernel"] is params["params"]["d"]["kernel"]  # arrays are immutable: no copy


# --- 6. PEFT: a square kernel of unknown layout is refused ---------------------------------------

class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 8)  # square: (out, in) and (in, out) have the same shape
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _torch_layout_apply(p, x):  # a plain-JAX port that keeps PyTorch's (out, in) weights
    h = jnp.tanh(x @ p["fc1"]["kernel"].T + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"].T + p["fc2"]["bias"]


TORCH_MAP = [(r"(fc1|fc2)/(kernel|bias)", r"\1")]


def test_peft_square_kernel_needs_its_layout(tmp_path):
    torch.manual_seed(0)
    net = TorchMLP().eval()
    params = {n: {"kernel": jnp.asarray(getattr(net, n).weight.detach().numpy()),
                  "bias": jnp.asarray(getattr(net, n).bias.detach().numpy())} for n in ("fc1", "fc2")}
    pm = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    pm.eval().save_pretrained(tmp_path / "peft")
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    with torch.no_grad():
        ref = pm(torch.tensor(x)).numpy()
    assert np.abs(ref - np.asarray(_torch_layout_apply(params, x))).max() > 0.05  # the adapter matters

    with pytest.raises(ValueError, match=r"cannot tell the axis roles of 'fc1/kernel' \(shape \(8, 8\)\).*Fix: pass "
                                         r"apply_fn=model.apply.*layouts=.*PortKeyMap"):
        jpeft.load(tmp_path / "peft", params, TORCH_MAP)
    for kw in (dict(apply_fn=_torch_layout_apply, args=(jnp.asarray(x),)),
               dict(layouts={"fc1/kernel": jlora.Layout((8, 8), "oi"), "fc2/kernel": jlora.Layout((3, 8), "oi")})):
        lora, cfg = jpeft.load(tmp_path / "peft", params, TORCH_MAP, **kw)
        np.testing.assert_allclose(np.asarray(_torch_layout_apply(jlora.merge(params, lora, cfg), x)), ref,
                                   atol=1e-5, rtol=1e-5)
    lora, cfg = jpeft.load(tmp_path / "peft", params, jpeft.PortKeyMap(TORCH_MAP, kernels="out_in"))
    np.testing.assert_allclose(np.asarray(_torch_layout_apply(jlora.merge(params, lora, cfg), x)), ref,
                               atol=1e-5, rtol=1e-5)
    assert {jpeft.LLAMA_KEY_MAP.kernels, jpeft.BERT_KEY_MAP.kernels, jpeft.GPT2_KEY_MAP.kernels} == {"in_out"}


def test_peft_square_module_saved_whole_needs_its_layout(tmp_path):
    torch.manual_seed(0)
    net = TorchMLP().eval()
    params = {n: {"kernel": jnp.asarray(getattr(net, n).weight.detach().numpy()),
                  "bias": jnp.asarray(getattr(net, n).bias.detach().numpy())} for n in ("fc1", "fc2")}
    pm = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc2"], modules_to_save=["fc1"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    pm.eval().save_pretrained(tmp_path / "peft")
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    with torch.no_grad():
        ref = pm(torch.tensor(x)).numpy()
    layouts = {"fc2/kernel": jlora.Layout((3, 8), "oi")}  # the factors' kernel is known: only fc1 is in question
    with pytest.raises(ValueError, match=r"'base_model.model.fc1.weight' is the square weight "
                                         r"\(8, 8\) of a module saved whole.*Fix: layouts=.*PortKeyMap"):
        jpeft.load(tmp_path / "peft", params, TORCH_MAP, layouts=layouts)
    for key_map, kw in ((TORCH_MAP, dict(layouts={**layouts, "fc1/kernel": jlora.Layout((8, 8), "oi")})),
                        (jpeft.PortKeyMap(TORCH_MAP, kernels="out_in"), {})):
        lora, cfg = jpeft.load(tmp_path / "peft", params, key_map, **kw)
        np.testing.assert_allclose(np.asarray(_torch_layout_apply(jlora.merge(params, lora, cfg), x)), ref,
                                   atol=1e-5, rtol=1e-5)


# --- 7. serving stacks round-trip bit for bit ----------------------------------------------------

def test_saved_stack_restores_bit_identical(tmp_path):
    frozen = {"w": jnp.zeros((8, 6)), "v": jnp.zeros((6, 5))}

    def adapter(seed, rank, alpha, targets, **kw):
        cfg = jlora.LoraConfig(rank=rank, alpha=alpha, targets=targets, **kw)
        _, lora = jlora.init(jax.random.key(seed), frozen, cfg)
        return jax.tree.map(lambda a: jax.random.normal(jax.random.key(seed + a.size), a.shape), lora), cfg

    adapters = {"a": adapter(0, 3, 7.0, "w|v"), "b": adapter(2, 5, 16.0, "w", rslora=True)}  # scales 7/3, 16/sqrt(5)
    s = jlora.multi.stack(frozen, adapters)
    jlora.multi.save_stack(tmp_path / "stack", s)
    back = jlora.multi.restore_stack(tmp_path / "stack", frozen)
    assert back.names == s.names and back.configs == s.configs and back.folded
    for (p, a), b in zip(jlora.paths.flatten(s.lora).items(), jax.tree.leaves(back.lora)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)
    for p in s.scales:
        np.testing.assert_array_equal(back.scales[p], s.scales[p])
    for name, (lora, cfg) in adapters.items():  # one adapter restored alone computes what the user trained
        got, got_cfg, _ = jlora.restore_adapter(tmp_path / "stack" / name, frozen=frozen)
        assert got_cfg == cfg
        f = jlora.paths.flatten(lora)
        for p in jlora.kernel_layouts(lora):
            want = cfg.scale_for(p) * np.asarray(f[p + "/A"], np.float64) @ np.asarray(f[p + "/B"], np.float64)
            np.testing.assert_allclose(np.asarray(jlora.delta(frozen, got, got_cfg)[p]), want, rtol=1e-5, atol=1e-5)
    again = jlora.multi.stack(frozen, jlora.multi.unstack(s))  # unstack, stack again: the same bits too
    for (p, a), b in zip(jlora.paths.flatten(s.lora).items(), jax.tree.leaves(again.lora)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)


# --- 8. the same rank error in every mode; leaf-type errors name the path ------------------------

def test_rank_mismatch_is_the_same_error_in_every_multi_mode():
    frozen = {"w": jnp.ones((4, 3))}
    cfg = jlora.LoraConfig(rank=2, alpha=2, targets="w")
    one = {"a": ({"w": {"A": jnp.ones((4, 2)), "B": jnp.ones((2, 3))}}, cfg)}
    s2, s3 = jlora.multi.stack(frozen, one), jlora.multi.stack(frozen, one, rank=3)
    messages = set()
    for mode in ("lazy", "merged", "rows"):
        fn = jax.jit(jlora.multi.mixed_apply(lambda p, x: x @ p["w"], s2.config, mode=mode))
        with pytest.raises(ValueError, match=r"lora factors of 'w' have rank 3 .* config gives rank 2.*fix:") as e:
            fn(frozen, s3.lora, jnp.array([0, 1]), jnp.ones((2, 4)))
        messages.add(str(e.value))
    assert len(messages) == 1


def test_leaf_type_errors_name_the_path_and_the_fix():
    frozen = {"d": {"kernel": jnp.zeros((2, 2))}}
    cfg = jlora.LoraConfig(rank=1, alpha=1, targets=".*")
    for fn in (jlora.merge, jlora.unmerge):
        with pytest.raises(TypeError, match=rf"jlora.{fn.__name__}: lora leaf 'd/kernel/A' is a Python list, not an "
                                            r"array.*fix: jnp.asarray"):
            fn(frozen, {"d": {"kernel": {"A": [[1.0], [1.0]], "B": jnp.ones((1, 2))}}}, cfg)
    with pytest.raises(TypeError, match=r"lora leaf 'd/kernel/B' is str 'x'.*fix"):
        jlora.merge(frozen, {"d": {"kernel": {"A": jnp.ones((2, 1)), "B": "x"}}}, cfg)


@pytest.mark.parametrize("case", ["bias", "peft_type", "rank", "no_config", "combine_svd", "key_map_pair"])
def test_bad_input_messages_say_the_fix(tmp_path, case):
    params = {"params": {"lm_head": {"kernel": jnp.zeros((4, 3))}}}
    lora = {"params": {"lm_head": {"kernel": {"A": jnp.ones((4, 2)), "B": jnp.ones((2, 3))}}}}
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=".*")
    d = jpeft.save(tmp_path / "a", lora, cfg, jpeft.LLAMA_KEY_MAP)
    body = (d / "adapter_config.json").read_text()
    if case == "bias":
        (d / "adapter_config.json").write_text(body.replace('"bias": "none"', '"bias": "some"'))
    elif case == "peft_type":
        (d / "adapter_config.json").write_text(body.replace('"LORA"', '"IA3"'))
    elif case == "rank":
        (d / "adapter_config.json").write_text(body.replace('"r": 2', '"r": 3'))
    elif case == "no_config":
        (d / "adapter_config.json").unlink()
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=r"(?i)fix:"):
        if case == "combine_svd":
            jlora.multi.combine(params, [(lora, cfg)], [1.0], "svd")
        elif case == "key_map_pair":
            jpeft.load(d, params, [("params/lm_head/kernel",)])
        else:
            jpeft.load(d, params, jpeft.LLAMA_KEY_MAP)
