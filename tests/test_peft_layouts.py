"""PEFT interop for kernels stored in PyTorch's own layouts, against real PEFT (float32, 1e-4).

The jlora model here keeps PyTorch's tensors as they are: a Linear weight ``(out, in)`` used as
``x @ W.T``, a conv weight ``OIHW`` used with ``lax.conv_general_dilated`` (plain and grouped).
``jlora.init`` reads the roles from the trace, ``jlora.peft.save`` writes PEFT's tensors from the
layout, ``PeftModel.from_pretrained`` reproduces jlora's outputs, and ``jlora.peft.load`` reads
a PEFT adapter back with the roles from ``apply_fn``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jlora
from jlora import peft as jpeft

import torch  # noqa: E402  (the test extra installs it; a missing one must fail, not skip)
import peft  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)
MAP = [(r"(lin|conv)/(kernel|bias)", r"\1")]


class Net(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1, groups=groups)
        self.lin = torch.nn.Linear(6 * 5 * 5, 7)

    def forward(self, x):
        return self.lin(torch.tanh(self.conv(x)).flatten(1))


def params_of(net):
    return {name: {"kernel": jnp.asarray(getattr(net, name).weight.detach().numpy()),
                   "bias": jnp.asarray(getattr(net, name).bias.detach().numpy())} for name in ("conv", "lin")}


def apply_fn(groups):
    def apply(p, x):  # x NCHW as in torch; kernels in torch's layouts
        h = lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=groups)
        h = jnp.tanh(h + p["conv"]["bias"][None, :, None, None])
        return h.reshape(h.shape[0], -1) @ p["lin"]["kernel"].T + p["lin"]["bias"]
    return apply


@pytest.fixture(params=[1, 2], ids=["conv", "grouped_conv"])
def setup(request):
    groups = request.param
    torch.manual_seed(0)
    net = Net(groups).eval()
    x = np.random.default_rng(0).normal(size=(2, 4, 5, 5)).astype(np.float32)
    params = params_of(net)
    apply = apply_fn(groups)
    np.testing.assert_allclose(np.asarray(apply(params, jnp.asarray(x))), net(torch.tensor(x)).detach().numpy(), **TOL)
    return groups, net, params, apply, x


def test_jlora_adapter_runs_in_peft(setup, tmp_path):
    groups, net, params, apply, x = setup
    cfg = jlora.LoraConfig(rank=4, alpha=6, targets=r".*/kernel")
    frozen, lora = jlora.init(jax.random.key(0), params, cfg, apply_fn=apply, args=(jnp.asarray(x),))
    assert lora["lin"]["kernel"].layout.roles == "oi" and lora["lin"]["kernel"]["A"].shape == (150, 4)
    want_a = (groups, 2, 3, 3, 4 // groups) if groups > 1 else (4, 3, 3, 4)
    assert lora["conv"]["kernel"]["A"].shape == want_a
    lora = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape) * 0.3, lora)
    ours = np.asarray(jlora.lora_apply(apply, cfg, strict=True)(frozen, lora, jnp.asarray(x)))
    out = jpeft.save(tmp_path / "mine", lora, cfg, MAP)
    torch.manual_seed(0)
    clean = Net(groups).eval()
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(clean, out).eval()(torch.tensor(x)).numpy()
    np.testing.assert_allclose(got, ours, **TOL)


def test_peft_adapter_loads_with_roles_from_the_trace(setup, tmp_path):
    groups, net, params, apply, x = setup
    pm = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=5, target_modules=["conv", "lin"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if groups > 1:  # jlora keeps LoRA inside the groups: PEFT's full lora_A must be block-diagonal
            a = pm.base_model.model.conv.lora_A["default"].weight
            mask = torch.zeros_like(a)
            r, cin = a.shape[0] // groups, a.shape[1] // groups
            for i in range(groups):
                mask[i * r : (i + 1) * r, i * cin : (i + 1) * cin] = 1
            a.mul_(mask)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        ref = pm(torch.tensor(x)).numpy()
    lora, cfg = jpeft.load(tmp_path / "peft", params, MAP, apply_fn=apply, args=(jnp.asarray(x),))
    assert lora["lin"]["kernel"].layout.roles == "oi"
    ours = jlora.lora_apply(apply, cfg, strict=True)(params, lora, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours), ref, **TOL)
    np.testing.assert_allclose(np.asarray(apply(jlora.merge(params, lora, cfg), jnp.asarray(x))), ref, **TOL)


def test_grouped_peft_adapter_mixing_groups_is_refused(tmp_path):
    torch.manual_seed(0)
    net = Net(2).eval()
    params, apply = params_of(net), apply_fn(2)
    x = jnp.zeros((1, 4, 5, 5))
    pm = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["conv"]))
    with torch.no_grad():
        pm.base_model.model.conv.lora_A["default"].weight.fill_(1.0)
    pm.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match=r"grouped conv 'conv/kernel', 2 groups.*connects channels across groups"):
        jpeft.load(tmp_path / "peft", params, MAP, apply_fn=apply, args=(x,))
