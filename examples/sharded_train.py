"""LoRA training of a small transformer on a 2-D (data x model) mesh of 8 CPU devices.

The base model is Megatron-style tensor parallel: q/k/v and fc1 are column-parallel
(kernel P(None, "model")), o and fc2 row-parallel (kernel P("model", None)); the batch is
split over "data". The LoRA factors take their shardings from the base kernels
(jlora.sharding.lora_shardings): A P(in, None), B P(None, out). The adapter is created
directly sharded (jit of jlora.init with out_shardings), trained with a jitted step with
explicit in/out shardings, and the base kernels are never all-gathered.

Run:
  JAX_PLATFORMS=cpu python examples/sharded_train.py            # 8 fake CPU devices
  JAX_PLATFORMS=cpu python examples/sharded_train.py --compare  # also a 1-device run

Multi-host: every host runs the same command with --distributed (jax.distributed.initialize
before anything else touches jax; on TPU/GPU clusters the arguments are auto-detected, on
CPU pass them). Two CPU processes with 4 devices each, on one machine:
  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python examples/sharded_train.py \
      --distributed --coordinator localhost:12355 --num-processes 2 --process-id 0 &
  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python examples/sharded_train.py \
      --distributed --coordinator localhost:12355 --num-processes 2 --process-id 1
The mesh is built from jax.devices() (all hosts); every array spans the hosts.
"""

from __future__ import annotations

import os

if "jax" not in __import__("sys").modules:  # must precede the first jax import
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jlora
from jlora import sharding as jsharding
from jlora.checkpoint import restore_adapter, save_adapter

VOCAB, D, HEADS, MLP, LAYERS, SEQ, BATCH = 64, 48, 4, 96, 2, 10, 8
COLUMN = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
ROW = nn.with_partitioning(nn.initializers.lecun_normal(), ("model", None))


class Block(nn.Module):
    """Pre-LN transformer block; q/k/v/fc1 column-parallel, o/fc2 row-parallel."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        q, k, v = (nn.Dense(D, kernel_init=COLUMN, name=n)(h) for n in ("q", "k", "v"))
        split = lambda t: t.reshape(t.shape[:-1] + (HEADS, D // HEADS))
        att = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(D // HEADS)
        mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, split(v)).reshape(x.shape)
        x = x + nn.Dense(D, kernel_init=ROW, name="o")(o)
        h = nn.gelu(nn.Dense(MLP, kernel_init=COLUMN, name="fc1")(nn.LayerNorm()(x)))
        return x + nn.Dense(D, kernel_init=ROW, name="fc2")(h)


class GPT(nn.Module):
    """A tiny decoder-only language model."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, D)(ids) + self.param("pos", nn.initializers.normal(0.02), (SEQ, D))
        for i in range(LAYERS):
            x = Block(name=f"block_{i}")(x)
        return nn.Dense(VOCAB, name="head")(nn.LayerNorm()(x))


CONFIG = jlora.LoraConfig(rank=4, alpha=8.0, targets=r".*/(q|k|v|o|fc1|fc2)/kernel")
KERNELS = r"params/block_\d+/(q|k|v|o|fc1|fc2)/kernel"


def make_mesh(devices=None) -> Mesh:
    """A (data, model) mesh: 2 x 4 on 8 devices, 1 x 1 on one."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    model = 4 if n % 4 == 0 else 1
    return Mesh(np.array(devices).reshape(n // model, model), ("data", "model"))


def make_batch(step: int):
    """Deterministic token batch (same on every host; each host would feed its slice)."""
    rng = np.random.default_rng(step)
    return jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ + 1)), jnp.int32)


def loss_fn(apply, frozen, lora, batch):
    logits = apply(frozen, lora, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def lazy_ready() -> bool:
    try:
        import jlora.trace._lazy  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
        return False
    return True


def setup(mesh: Mesh | None, mode: str = "lazy", lr: float = 1e-2):
    """Builds frozen/lora/optimizer state (sharded on ``mesh``) and the jitted train step.

    Returns a dict with frozen, lora, opt_state, step (jitted), shardings, batch sharding.
    """
    model = GPT()
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))
    base_specs = nn.get_partition_spec(boxed)  # the Megatron layout, from nn.Partitioned
    tx = optax.adam(lr)
    apply = jlora.lora_apply(model.apply, CONFIG, mode=mode)

    if mesh is not None:
        param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), base_specs,
                                is_leaf=lambda x: isinstance(x, P))
        batch_sh = NamedSharding(mesh, P("data"))
    else:
        param_sh = batch_sh = None

    # Base params, created directly sharded (never materialised on one device).
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, SEQ), jnp.int32))),
                     out_shardings=param_sh)(jax.random.key(0))
    # The adapter: abstract first, then jit(init) with the derived factor shardings.
    make_lora = lambda k, p: jlora.init(k, p, CONFIG)[1]
    abstract = jax.eval_shape(make_lora, jax.random.key(1), params)
    if mesh is not None:
        lora_sh = jsharding.lora_shardings(boxed, abstract, CONFIG, mesh=mesh)
        opt_sh = jsharding.state_shardings(jax.eval_shape(tx.init, abstract), abstract, lora_sh)
    else:
        lora_sh = opt_sh = None
    lora = jax.jit(make_lora, out_shardings=lora_sh)(jax.random.key(1), params)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(lora)

    def train_step(frozen, lora, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda l: loss_fn(apply, frozen, l, batch))(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    if mesh is not None:
        rep = NamedSharding(mesh, P())
        step = jax.jit(train_step, in_shardings=(param_sh, lora_sh, opt_sh, batch_sh),
                       out_shardings=(lora_sh, opt_sh, rep), donate_argnums=(1, 2))
    else:
        step = jax.jit(train_step, donate_argnums=(1, 2))
    return dict(frozen=params, lora=lora, opt_state=opt_state, step=step, lora_shardings=lora_sh,
                batch_sharding=batch_sh, base_specs=base_specs)


def train(mesh: Mesh | None, steps: int = 5, mode: str = "lazy"):
    """Runs ``steps`` train steps; returns (losses, final lora, state dict)."""
    st = setup(mesh, mode)
    lora, opt_state, losses = st["lora"], st["opt_state"], []
    for i in range(steps):
        batch = make_batch(i)
        if st["batch_sharding"] is not None:
            batch = jax.device_put(batch, st["batch_sharding"])
        lora, opt_state, loss = st["step"](st["frozen"], lora, opt_state, batch)
        losses.append(float(loss))
    return losses, lora, st


_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def all_gathered_shapes(hlo_text: str) -> list[tuple[int, ...]]:
    """Output shapes of every all-gather (sync or async start) in compiled HLO text."""
    shapes = []
    for line in hlo_text.splitlines():
        m = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
        if m:
            for dims in _SHAPE.findall(m.group(1)):
                shapes.append(tuple(int(d) for d in dims.split(",") if d))
    return shapes


def gathered_kernels(step, frozen, lora, opt_state, batch) -> list[str]:
    """Paths of frozen kernels whose full shape appears as an all-gather output."""
    text = step.lower(frozen, lora, opt_state, batch).compile().as_text()
    gathered = set(all_gathered_shapes(text))
    flat = jlora.paths.flatten(frozen)
    return [p for p, x in flat.items() if re.fullmatch(KERNELS, p) and tuple(x.shape) in gathered]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mode", choices=("lazy", "merged"), default="lazy")
    parser.add_argument("--compare", action="store_true", help="also run on one device and compare")
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--save", help="save the trained adapter to this directory (replaced if present)")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize")
    parser.add_argument("--coordinator", help="host:port of process 0 (CPU; auto-detected on clusters)")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args()
    if args.distributed:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; harmless elsewhere
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    mode = args.mode
    if mode == "lazy" and not lazy_ready():
        print("jlora.trace._lazy is not available yet: using mode='merged'")
        mode = "merged"
    mesh = make_mesh()
    print(f"process {jax.process_index()}/{jax.process_count()}  devices: {jax.device_count()} "
          f"({jax.local_device_count()} local)  mesh: {dict(mesh.shape)}  mode: {mode}")
    losses, lora, st = train(mesh, args.steps, mode)
    print("losses (sharded):", " ".join(f"{x:.5f}" for x in losses))
    flat = jlora.paths.flatten(lora)
    for p in [k for k in flat if "block_0" in k]:
        print(f"  {p:34s} {str(flat[p].shape):10s} {flat[p].sharding.spec}")
    batch = jax.device_put(make_batch(0), st["batch_sharding"])
    gathered = gathered_kernels(st["step"], st["frozen"], lora, st["opt_state"], batch)
    print("full frozen kernels all-gathered by the step:", gathered or "none")
    result = dict(mode=mode, losses=losses, gathered=gathered,
                  specs={p: [list(e) if isinstance(e, tuple) else e for e in flat[p].sharding.spec]
                         for p in flat})
    if args.save:
        meta = {"example": "sharded_train", "steps": args.steps, "final_loss": losses[-1]}
        size = save_adapter(args.save, lora, CONFIG, meta, overwrite=True)
        factors = sum(x.nbytes for x in jax.tree.leaves(lora))
        base = sum(x.nbytes for x in jax.tree.leaves(st["frozen"]))
        print(f"adapter saved to {args.save}: {size} bytes on disk (factors {factors} B + metadata); "
              f"base params ({base} B) not saved")
        restored, _, _ = restore_adapter(args.save, shardings=st["lora_shardings"])  # back onto the mesh
        same = all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(lora)))
        print(f"restored onto the mesh: equal={same}")
        result["adapter_bytes"] = size
    if args.compare:
        single, _, _ = train(None, args.steps, mode)
        diff = max(abs(a - b) for a, b in zip(losses, single))
        print("losses (1 device):", " ".join(f"{x:.5f}" for x in single), f" max |diff| {diff:.2e}")
        result["single_losses"] = single
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
