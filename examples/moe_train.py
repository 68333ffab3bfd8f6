"""LoRA on the experts of a small MoE decoder (top-k routing, ``ragged_dot`` experts), end to end.

The base model (``examples/models/moe.py``) is random; the task is synthetic next-token prediction
(``t[i+1] = (3 * t[i] + t[i-1]) mod vocab``). jlora reads every expert kernel ``(E, in, out)`` as a
stack of E kernels from the trace (``ragged_dot``'s group axis), gives each expert its own factors
``A (E, in, r)``, ``B (E, r, out)``, and trains them lazily: ``ragged_dot`` on A and on B with the
router's group sizes, never an ``(E, in, out)`` delta. With ``--devices 8`` the experts are sharded
on a mesh axis ``expert`` (expert parallelism: the base kernels ``P('expert', None, None)``, the
factors take the same expert sharding from :func:`jlora.lora_shardings`); the losses equal one
device's.

Run (under a minute on 2 CPU cores):
  JAX_PLATFORMS=cpu python examples/moe_train.py                # 1 device
  JAX_PLATFORMS=cpu python examples/moe_train.py --devices 8    # 8 simulated devices, experts sharded
"""

from __future__ import annotations

import os
import sys

if "--devices" in sys.argv and "jax" not in sys.modules:  # must precede the first jax import
    n = sys.argv[sys.argv.index("--devices") + 1]
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={n}")

import argparse  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jlora  # noqa: E402

try:
    from examples.models import moe as M
except ImportError:  # run as a script: examples/ is not a package on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from examples.models import moe as M

CFG = M.MoEConfig(vocab=32, d=32, hidden=64, experts=8, top_k=2, layers=2)
LORA = jlora.LoraConfig(rank=8, alpha=16.0, targets=M.ALL_TARGETS)
BATCH, SEQ = 16, 16


def make_batch(step: int, vocab: int = CFG.vocab) -> jax.Array:
    """Sequences of the synthetic recurrence, two random seed tokens each."""
    rng = np.random.default_rng(step)
    t = np.zeros((BATCH, SEQ), np.int32)
    t[:, :2] = rng.integers(0, vocab, (BATCH, 2))
    for i in range(2, SEQ):
        t[:, i] = (3 * t[:, i - 1] + t[:, i - 2]) % vocab
    return jnp.asarray(t)


def loss_fn(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def _base_specs(params: Any) -> Any:
    """Experts on the ``expert`` mesh axis (their stored axis 0), everything else replicated."""
    return jlora.paths.map_with_path(lambda p, w: P("expert", None, None) if w.ndim == 3 else P(), params)


def train(steps: int = 40, devices: int = 1, lr: float = 1e-2, seed: int = 0, cfg: M.MoEConfig = CFG
          ) -> dict[str, Any]:
    """Trains the experts' (and attention's) LoRA factors; returns losses, the final lora tree (flat
    NumPy) and the factors' partition specs."""
    apply = lambda p, t: M.apply(p, t, cfg)  # noqa: E731
    params = M.init_params(jax.random.key(seed), cfg)
    frozen, lora = jlora.init(jax.random.key(seed + 1), params, LORA, apply_fn=apply,
                              args=(make_batch(0, cfg.vocab),))
    fn = jlora.lora_apply(apply, LORA, "lazy", strict=True)
    tx = jlora.optimizer(optax.adam(lr), lora)
    opt = tx.init(lora)

    def step(lora, opt, frozen, tokens):
        loss, g = jax.value_and_grad(lambda l: loss_fn(fn(frozen, l, tokens), tokens))(lora)
        updates, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, updates), opt, loss

    specs: dict[str, str] = {}
    if devices > 1:
        if jax.device_count() < devices:
            raise ValueError(f"--devices {devices}: only {jax.device_count()} devices; fix: set XLA_FLAGS="
                             f"--xla_force_host_platform_device_count={devices} before importing jax")
        if cfg.experts % devices:
            raise ValueError(f"--devices {devices} must divide the {cfg.experts} experts")
        mesh = Mesh(np.array(jax.devices()[:devices]), ("expert",))
        base = jax.tree.map(lambda s: NamedSharding(mesh, s), _base_specs(frozen), is_leaf=lambda x: isinstance(x, P))
        lora_sh = jlora.lora_shardings(base, lora, LORA, frozen=frozen)
        opt_sh = jlora.sharding.state_shardings(opt, lora, lora_sh)
        frozen, lora, opt = jax.device_put(frozen, base), jax.device_put(lora, lora_sh), jax.device_put(opt, opt_sh)
        rep = NamedSharding(mesh, P())
        jstep = jax.jit(step, in_shardings=(lora_sh, opt_sh, base, rep), out_shardings=(lora_sh, opt_sh, rep))
        specs = {p: str(s.spec) for p, s in jlora.paths.flatten(lora_sh).items()}
    else:
        jstep = jax.jit(step)
    losses = []
    for i in range(steps):
        lora, opt, loss = jstep(lora, opt, frozen, make_batch(i % 8, cfg.vocab))
        losses.append(float(loss))
    return {"losses": losses, "lora": {p: np.asarray(x) for p, x in jlora.paths.flatten(lora).items()},
            "specs": specs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1, help="shard the experts on this many devices")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    out = train(args.steps, args.devices)
    losses = out["losses"]
    for i in range(0, len(losses), max(1, len(losses) // 8)):
        print(f"step {i:3d}  loss {losses[i]:.4f}")
    print(f"final loss {losses[-1]:.4f} (from {losses[0]:.4f}) on {args.devices} device(s)")


if __name__ == "__main__":
    main()
