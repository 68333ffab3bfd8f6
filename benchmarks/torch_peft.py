"""PyTorch mirror of the GPT decoder: full fine-tuning vs PEFT LoRA, as a ratio inside PyTorch (CPU).

Weights are copied from the JAX workload (torch Linear stores W as (out, in); PEFT stores A as (r, in),
B as (out, r)), so the losses are comparable with the JAX ones.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from benchmarks.workloads import GPT_TARGETS, GPTConfig, LoraSpec


def _model_cls():
    import torch
    from torch import nn

    class Attn(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.heads = heads

        def forward(self, x):
            b, s, d = x.shape
            h = self.heads
            q, k, v = (t(x).view(b, s, h, d // h).transpose(1, 2) for t in (self.q, self.k, self.v))
            logits = q @ k.transpose(-1, -2) / math.sqrt(d // h)
            mask = torch.ones(s, s, dtype=torch.bool).tril()
            logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
            att = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
            return self.o(att)

    class MLP(nn.Module):
        def __init__(self, d, m):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(d, m), nn.Linear(m, d)

        def forward(self, x):
            return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))

    class Block(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model, eps=1e-6), nn.LayerNorm(cfg.d_model, eps=1e-6)
            self.attn, self.mlp = Attn(cfg.d_model, cfg.heads), MLP(cfg.d_model, cfg.mlp)

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
            self.pos = nn.Parameter(torch.zeros(cfg.seq, cfg.d_model))
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
            self.ln_f = nn.LayerNorm(cfg.d_model, eps=1e-6)
            self.head = nn.Linear(cfg.d_model, cfg.vocab)

        def forward(self, tokens):
            h = self.embed(tokens) + self.pos[: tokens.shape[1]]
            for blk in self.blocks:
                h = blk(h)
            return self.head(self.ln_f(h))

    return GPT


def _load(model, flat: dict[str, np.ndarray], cfg: GPTConfig) -> None:
    import torch

    def t(a):
        return torch.from_numpy(np.array(a, dtype=np.float32))

    with torch.no_grad():
        model.embed.weight.copy_(t(flat["params/embed/embedding"]))
        model.pos.copy_(t(flat["params/pos"]))
        for i, blk in enumerate(model.blocks):
            p = f"params/block_{i}"
            for ln in ("ln1", "ln2"):
                getattr(blk, ln).weight.copy_(t(flat[f"{p}/{ln}/scale"]))
                getattr(blk, ln).bias.copy_(t(flat[f"{p}/{ln}/bias"]))
            for n in GPT_TARGETS:
                group = "attn" if n in ("q", "k", "v", "o") else "mlp"
                lin = getattr(getattr(blk, group), n)
                lin.weight.copy_(t(flat[f"{p}/{group}/{n}/kernel"]).T)
                lin.bias.copy_(t(flat[f"{p}/{group}/{n}/bias"]))
        model.ln_f.weight.copy_(t(flat["params/ln_f/scale"]))
        model.ln_f.bias.copy_(t(flat["params/ln_f/bias"]))
        model.head.weight.copy_(t(flat["params/head/kernel"]).T)
        model.head.bias.copy_(t(flat["params/head/bias"]))


def run_torch(cfg: GPTConfig, lora: LoraSpec, flat_base: dict, flat_merged: dict, factors: dict,
              batch: tuple, rounds: int, threads: int = 2) -> dict[str, Any]:
    """Times full FT vs PEFT LoRA steps round-robin; returns losses, medians and ratio range."""
    import peft
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gpt = _model_cls()
    full = gpt(cfg)
    _load(full, flat_merged, cfg)
    base = gpt(cfg)
    _load(base, flat_base, cfg)
    pcfg = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(GPT_TARGETS), lora_dropout=0.0)
    lmodel = peft.get_peft_model(base, pcfg)
    with torch.no_grad():
        for name, mod in lmodel.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                # name: base_model.model.blocks.0.attn.q
                parts = name.split(".")
                i, group, n = parts[-3], parts[-2], parts[-1]
                a, b = factors[f"params/block_{i}/{group}/{n}/kernel"]
                mod.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(a)).T)
                mod.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(b)).T)
    x = torch.from_numpy(np.asarray(batch[0]).astype(np.int64))
    y = torch.from_numpy(np.asarray(batch[1]).astype(np.int64))

    def loss_of(m):
        logits = m(x)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    with torch.no_grad():
        losses = {"full": float(loss_of(full)), "peft": float(loss_of(lmodel))}
    runs = {
        "full": (full, torch.optim.AdamW(full.parameters(), lr=1e-3)),
        "peft": (lmodel, torch.optim.AdamW([p for p in lmodel.parameters() if p.requires_grad], lr=1e-3)),
    }

    def step(name):
        m, opt = runs[name]
        opt.zero_grad(set_to_none=True)
        loss = loss_of(m)
        loss.backward()
        opt.step()

    for name in runs:  # warm-up
        step(name)
    times: dict[str, list[float]] = {n: [] for n in runs}
    for r in range(rounds):
        for name in (("full", "peft") if r % 2 == 0 else ("peft", "full")):
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)
    ratios = [p / f for p, f in zip(times["peft"], times["full"])]
    trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, (m, _) in runs.items()}
    return {"losses": losses, "times": times, "ratios": ratios, "trainable": trainable, "threads": threads}
