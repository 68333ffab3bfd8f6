"""Quickstart: pretrain a small Flax MLP on one function, then adapt it to another with LoRA only.

Run: python examples/quickstart.py [--mode lazy|merged] [--steps 300]
The base learns y = sin(3x); LoRA (rank 4 on the two hidden-to-hidden kernels) then
fits y = sin(3x) + 0.5 cos(5x) while the base stays frozen. The printed loss falls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as `python examples/quickstart.py`: make the repo root (jlora) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jlora


class MLP(nn.Module):
    width: int = 64

    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = jnp.tanh(nn.Dense(self.width, name=f"fc{i}")(x))
        return nn.Dense(1, name="out")(x)


def fit(loss_fn, params, tx, steps):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return params, losses


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=jlora.adapt._apply.MODES, default="lazy")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args(argv)

    model = MLP()
    x = jnp.linspace(-2, 2, 256)[:, None]
    base_y, new_y = jnp.sin(3 * x), jnp.sin(3 * x) + 0.5 * jnp.cos(5 * x)
    params = model.init(jax.random.key(0), x)
    params, _ = fit(lambda p: jnp.mean((model.apply(p, x) - base_y) ** 2), params, optax.adam(1e-2), 600)

    cfg = jlora.LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=r"params/fc[12]/kernel")
    frozen, lora = jlora.init(jax.random.key(1), params, cfg, apply_fn=model.apply, args=(x,))
    print(jlora.summary(frozen, lora))
    fn = jlora.lora_apply(model.apply, cfg, mode=args.mode)
    lora, losses = fit(lambda l: jnp.mean((fn(frozen, l, x) - new_y) ** 2), lora,
                       jlora.optimizer(optax.adam(1e-2), lora), args.steps)
    for i in range(0, args.steps, max(args.steps // 6, 1)):
        print(f"step {i:4d}  loss {losses[i]:.5f}")
    print(f"step {args.steps:4d}  loss {losses[-1]:.5f}  ({losses[0] / losses[-1]:.0f}x lower)")
    merged = jlora.merge(frozen, lora, cfg)  # zero-overhead inference: the plain model on merged weights
    gap = float(jnp.max(jnp.abs(model.apply(merged, x) - fn(frozen, lora, x))))
    print(f"merged vs {args.mode}: max |diff| = {gap:.2e}")
    return losses


if __name__ == "__main__":
    main()
