"""Train-step variants over one workload: each is a loss of (trainable, frozen, batch) plus an optax transform.

Every JAX variant is built from the same base weights W0 and the same (non-zero) LoRA factors, so all of
them compute the same loss; ``run.py`` checks that before timing anything.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

from benchmarks import workloads as W
from benchmarks.fast_lora import fast_gpt_logits

LR = 1e-3


@dataclasses.dataclass
class Variant:
    """One train step. ``loss_fn(trainable, frozen, batch) -> scalar``; ``error`` set when not available."""

    name: str
    loss_fn: Callable[..., Any] | None = None
    trainable: Any = None
    frozen: Any = None
    tx: optax.GradientTransformation | None = None
    forward: Callable[..., Any] | None = None  # (trainable, frozen, x) -> outputs, for the inference table
    note: str = ""
    error: str | None = None
    loss0: float | None = None  # loss at the initial weights, set by the loss check


def train_step(loss_fn: Callable[..., Any], tx: optax.GradientTransformation) -> Callable[..., Any]:
    def step(trainable, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def unavailable(name: str, exc: BaseException | str, note: str = "") -> Variant:
    if isinstance(exc, BaseException):
        last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" ({last.filename.split('/')[-1]}:{last.lineno})" if last else ""
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{where}"
    else:
        reason = exc
    return Variant(name, error=f"not available: {reason[:300]}", note=note)


def guarded(name: str, note: str = ""):
    """Decorator: a builder that raises becomes a visible 'not available: <reason>' row."""

    def wrap(builder):
        def build(*args, **kwargs):
            try:
                v = builder(*args, **kwargs)
                v.name = name
                v.note = v.note or note
                return v
            except Exception as exc:  # noqa: BLE001 - any failure becomes a row, the run goes on
                return unavailable(name, exc, note)

        return build

    return wrap


# --------------------------------------------------------------------------------------------
# tree helpers (independent of jlora)


def flat(tree: Any) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep="/")


def unflat(d: dict[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(d, sep="/")


def combine(frozen: Any, trainable: Any) -> dict[str, Any]:
    return unflat({**flat(frozen), **flat(trainable)})


def copy_tree(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def merged_params(params: dict, factors: dict, scale: float) -> dict:
    f = flat(params)
    for path, (a, b) in factors.items():
        f[path] = f[path] + W.factor_delta(a, b, scale)
    return unflat(f)


def lora_tree(factors: dict) -> dict:
    """jlora's lora-tree layout: {"A": A, "B": B} at each adapted kernel's path."""
    out = {}
    for path, (a, b) in factors.items():
        out[path + "/A"] = a
        out[path + "/B"] = b
    return unflat(out)


def import_jlora():
    import jlora  # noqa: F401 - raise here when the package is not importable yet

    for attr in ("LoraConfig", "lora_apply", "optimizer", "merge"):
        if not hasattr(jlora, attr):
            raise ImportError(f"jlora has no attribute {attr!r} yet")
    return jlora


# --------------------------------------------------------------------------------------------
# Workload context


@dataclasses.dataclass
class Workload:
    name: str
    model: nn.Module
    params: dict  # base W0 (Linen tree)
    factors: dict  # path -> (A, B)
    lora: W.LoraSpec
    regex: str
    batch: tuple  # (x, labels)
    loss_of_output: Callable[[jax.Array, jax.Array], jax.Array]
    naive_model: nn.Module
    cfg: Any

    @property
    def merged(self) -> dict:
        return merged_params(self.params, self.factors, self.lora.scale)

    def apply_loss(self, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
        def loss(out_args, batch):
            return self.loss_of_output(apply_fn(*out_args, batch[0]), batch[1])

        return loss


def gpt_workload(cfg: W.GPTConfig, lora: W.LoraSpec, seed: int = 0) -> Workload:
    model = W.GPT(cfg)
    batch = W.gpt_batch(cfg, seed)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), batch[0])
    factors = W.make_factors(jax.random.PRNGKey(seed + 1), flat(params), W.GPT_TARGET_REGEX, lora.rank)
    loss = lambda logits, y: W.lm_loss(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))  # noqa: E731
    return Workload("gpt", model, params, factors, lora, W.GPT_TARGET_REGEX, batch, loss, W.GPT(cfg, lora), cfg)


def conv_workload(cfg: W.ConvConfig, lora: W.LoraSpec, seed: int = 0) -> Workload:
    model = W.ConvNet(cfg)
    batch = W.conv_batch(cfg, seed)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), batch[0])
    factors = W.make_factors(jax.random.PRNGKey(seed + 1), flat(params), W.CONV_TARGET_REGEX, lora.rank)
    loss = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()  # noqa: E731
    return Workload("conv", model, params, factors, lora, W.CONV_TARGET_REGEX, batch, loss,
                    W.ConvNet(cfg, lora), cfg)


# --------------------------------------------------------------------------------------------
# Variants


@guarded("full fine-tuning")
def full_ft(wl: Workload) -> Variant:
    apply = wl.model.apply
    return Variant("", loss_fn=lambda t, f, b: wl.loss_of_output(apply(t, b[0]), b[1]),
                   trainable=wl.merged, frozen=None, tx=optax.adamw(LR),
                   forward=lambda t, f, x: apply(t, x), note="all weights train")


def _jlora(wl: Workload, mode: str) -> Variant:
    jlora = import_jlora()
    cfg = jlora.LoraConfig(rank=wl.lora.rank, alpha=wl.lora.alpha, targets=wl.regex)
    frozen = wl.params
    lora = lora_tree(wl.factors)
    note = ""
    try:  # the lora tree built here by hand must be the one jlora.init builds
        _, ref = jlora.init(jax.random.PRNGKey(0), frozen, cfg, apply_fn=wl.model.apply, args=(wl.batch[0],))
        if jax.tree.map(jnp.shape, lora) != jax.tree.map(jnp.shape, ref):
            note = "jlora.init builds a different lora tree layout than the contract"
    except Exception as exc:  # noqa: BLE001
        note = f"jlora.init failed: {type(exc).__name__}: {str(exc)[:120]}"
    fn = jlora.lora_apply(wl.model.apply, cfg, mode=mode)
    return Variant("", loss_fn=lambda t, f, b: wl.loss_of_output(fn(f, t, b[0]), b[1]),
                   trainable=lora, frozen=frozen, tx=jlora.optimizer(optax.adamw(LR), lora),
                   forward=lambda t, f, x: fn(f, t, x), note=note)


@guarded("jlora lazy", note="lora_apply(mode='lazy')")
def jlora_lazy(wl: Workload) -> Variant:
    return _jlora(wl, "lazy")


@guarded("jlora merged-in-step", note="lora_apply(mode='merged'): W0 + s·A@B formed in the step")
def jlora_merged(wl: Workload) -> Variant:
    return _jlora(wl, "merged")


@guarded("hand-written lazy (naive)", note="Linen module: x@W0 + b + s·(x@A)@B on 3-D activations")
def naive_lazy(wl: Workload) -> Variant:
    f = flat(wl.params)
    trainable = {}
    for path, (a, b) in wl.factors.items():
        mod = path.rsplit("/", 1)[0]
        trainable[mod + "/lora_a"] = a
        trainable[mod + "/lora_b"] = b
    trainable = unflat(trainable)
    apply = wl.naive_model.apply
    return Variant("", loss_fn=lambda t, fr, b: wl.loss_of_output(apply(combine(fr, t), b[0]), b[1]),
                   trainable=trainable, frozen=unflat(f), tx=optax.adamw(LR),
                   forward=lambda t, fr, x: apply(combine(fr, t), x))


@guarded("hand-written lazy (fast, ANCHORS)",
         note="2-D tokens, custom VJP, s folded into B, (r,T)·(T,n) products, shared A for q/k/v")
def fast_lazy(wl: Workload) -> Variant:
    if wl.name != "gpt":
        raise NotImplementedError("dense-only reference, written for the GPT decoder")
    cfg, scale = wl.cfg, wl.lora.scale

    def loss(t, fr, b):
        return W.lm_loss(fast_gpt_logits(fr, t, b[0], cfg, scale), b[1].reshape(-1))

    return Variant("", loss_fn=loss, trainable=lora_tree(wl.factors), frozen=wl.params, tx=optax.adamw(LR),
                   forward=lambda t, fr, x: fast_gpt_logits(fr, t, x, cfg, scale).reshape(*x.shape, -1))


@guarded("flax nnx.LoRALinear", note="no alpha/r scaling in nnx: B stored as s·B")
def nnx_lora(wl: Workload) -> Variant:
    if wl.name != "gpt":
        raise NotImplementedError("nnx.LoRA is dense-only")
    model = W.nnx_gpt_from_linen(wl.cfg, wl.params, wl.factors, wl.lora)
    graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)

    def run(t, fr, x):
        return nnx.merge(graphdef, t, fr)(x)

    return Variant("", loss_fn=lambda t, fr, b: wl.loss_of_output(run(t, fr, b[0]), b[1]),
                   trainable=lora_state, frozen=rest, tx=optax.adamw(LR), forward=run)


@guarded("qwix LoRA", note="qwix.LoraProvider interception of dot_general/conv")
def qwix_lora(wl: Workload) -> Variant:
    import qwix

    module_path = ".*/(q|k|v|o|fc1|fc2)" if wl.name == "gpt" else ".*conv_\\d+"
    provider = qwix.LoraProvider(module_path=module_path, rank=wl.lora.rank, alpha=wl.lora.alpha)
    model = qwix.apply_lora_to_model(wl.model, provider)  # linen: no example inputs
    init = jax.eval_shape(model.init, jax.random.PRNGKey(0), wl.batch[0])
    f = flat(wl.params)
    trainable = {}
    for path, sds in flat(init).items():
        if path.endswith("_lora_a") or path.endswith("_lora_b"):
            a, b = wl.factors[path[: -len("_lora_a")]]
            val = a if path.endswith("_lora_a") else b
            if val.shape != sds.shape:
                val = val.reshape(sds.shape)
            trainable[path] = val
        elif path not in f:
            raise KeyError(f"qwix model has an unexpected leaf {path}")
    trainable = unflat(trainable)
    apply = model.apply
    return Variant("", loss_fn=lambda t, fr, b: wl.loss_of_output(apply(combine(fr, t), b[0]), b[1]),
                   trainable=trainable, frozen=wl.params, tx=optax.adamw(LR),
                   forward=lambda t, fr, x: apply(combine(fr, t), x))


@guarded("probe: no weight gradients", note="grad only of a zero vector added to the input: the floor")
def probe(wl: Workload) -> Variant:
    apply = wl.model.apply
    x = wl.batch[0]
    width = wl.cfg.d_model if wl.name == "gpt" else x.shape[-1]
    return Variant("", loss_fn=lambda t, f, b: wl.loss_of_output(apply(f, b[0], embed_offset=t["offset"]), b[1]),
                   trainable={"offset": jnp.zeros((width,), jnp.float32)}, frozen=wl.merged, tx=optax.adamw(LR))


GPT_VARIANTS = (full_ft, jlora_lazy, jlora_merged, naive_lazy, fast_lazy, nnx_lora, qwix_lora, probe)
CONV_VARIANTS = (full_ft, jlora_lazy, jlora_merged, naive_lazy, qwix_lora, probe)
