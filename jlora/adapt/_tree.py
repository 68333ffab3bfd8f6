"""init, merge, unmerge and delta: pure functions over (frozen, lora) trees.

``frozen`` is the user's parameter tree, unchanged. ``lora`` holds only what trains, with the
same nesting: a :class:`~jlora.layout.LoraKernel` node (``"A"``, ``"B"``, DoRA's ``"m"``) at an
adapted kernel's path, ``{"rows": ...}`` at a table with trained rows, the whole array at a path
trained in full (a bias, a new head). ``init`` decides each kernel's :class:`~jlora.layout.Layout`
once (trace, stated roles, or :func:`~jlora.layout.layout_without_trace`); the rest reads it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core import _checks as checks
from jlora.core import _extras as extras
from jlora.core import _inits as inits
from jlora.core import _kinds as kinds
from jlora.core import dora, paths
from jlora.core._config import LoraConfig
from jlora.core._describe import adapted, configured_rank, nest
from jlora.core._kinds import Factored
from jlora.core.layout import Layout, layout_without_trace
from jlora.quant import _loftq as loftq
from jlora.quant import _quant as quant
from jlora.trace import _analysis as analysis

__all__ = ["init", "delta", "merge", "unmerge"]


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def _targets(flat: Mapping[str, Any], config: LoraConfig) -> list[str]:
    if not config.targets:
        raise ValueError(
            "LoraConfig.targets: no target regexes; fix: e.g. LoraConfig(targets=r'.*/(query|value)/kernel')"
        )
    paths.check_rules_match("targets", config.targets, flat)
    paths.check_rules_match("exclude", config.exclude, flat)
    chosen = [p for p in flat if paths.matches(config.targets, p) and not paths.matches(config.exclude, p)]
    for p in chosen:
        leaf = flat[p]
        if not hasattr(leaf, "shape") or len(leaf.shape) < 2 or not _is_float(leaf):
            what = f"shape {tuple(getattr(leaf, 'shape', ()))}, dtype {getattr(leaf, 'dtype', type(leaf).__name__)}"
            raise ValueError(
                f"LoraConfig.targets: {p!r} ({what}) is not a kernel: LoRA adapts float arrays with at least "
                "2 axes; fix: narrow the target regex, or list the leaf in `trainable` to train it whole"
            )
    if not chosen:
        matched = [p for p in flat if paths.matches(config.targets, p)]
        raise ValueError(
            f"LoraConfig.targets: every matched path ({', '.join(matched[:5])}) is excluded by LoraConfig.exclude "
            f"{list(config.exclude)}, so nothing would adapt; fix: narrow the exclude regexes or widen the targets"
        )
    return chosen


def _base(w: Any) -> Any:
    """The float W0 that init's magnitude and rows start from (LoftQ's quantized Q, dequantized)."""
    return quant.dequantize(w, dtype=None) if quant.is_quantized(w) else w


def _stated(path: str, shape: tuple[int, ...], roles: str, found: Layout | str | None) -> Layout:
    """The layout of roles the config states: the traced kind (a conv's stated roles read as dense), or
    the no-trace rule's."""
    try:
        if isinstance(found, Layout):
            return Layout(shape, roles, None, "dense" if found.kind == "conv" else found.kind)
        return layout_without_trace(path, shape, roles=roles)
    except ValueError as err:
        raise ValueError(f"LoraConfig.layout for {path!r} (shape {shape}): {err}") from None


def _layouts(flat: Mapping[str, Any], chosen: Sequence[str], config: LoraConfig,
             apply_fn: Callable[..., Any] | None, params: Any, args: Sequence[Any]) -> dict[str, Layout]:
    traced: dict[str, Layout | str] = {}
    if apply_fn is not None:
        traced = analysis.read_layouts(apply_fn, params, args, list(chosen))
    out: dict[str, Layout] = {}
    for p in chosen:
        shape, found = tuple(flat[p].shape), traced.get(p)
        plain = (found.n_stack, found.n_in) if isinstance(found, Layout) and found.is_plain else None
        roles = config.roles_for(p, shape, plain)
        if roles is not None:
            lay: Layout | str = _stated(p, shape, roles, found)
        elif isinstance(found, Layout):
            lay = found
        else:
            lay = layout_without_trace(p, shape) if found is None else f"the trace says {found}"
            if isinstance(lay, str):
                raise ValueError(
                    f"jlora.init: cannot tell the axis roles of {p!r}: {lay}. Fix: pass "
                    "apply_fn=model.apply and args=(example inputs or jax.ShapeDtypeStructs) so init reads "
                    f"the roles from the model, or state them: LoraConfig(layout={{{p!r}: 'io...'}}) with one "
                    "letter per axis: 's' stack, 'i' input, 'o' output"
                )
        fused = config.fused_for(p)
        if fused is not None and lay.out_shape[-1] % len(fused):
            raise ValueError(
                f"LoraConfig.fused: kernel {p!r} has last output axis {lay.out_shape[-1]}, not divisible into "
                f"{len(fused)} groups; fix the fused rule for it"
            )
        out[p] = lay.with_fused(fused)
    return out


def _factors(key: jax.Array, path: str, leaf: Any, lay: Layout, config: LoraConfig, dtype: Any
             ) -> tuple[jax.Array, jax.Array, Any]:
    """A and B of one kernel at init, and its new base (None: the base is unchanged)."""
    rank = configured_rank(config, path, lay)
    limit = lay.max_rank()
    if rank > limit:
        per = f" per group ({config.rank_for(path)} over {lay.feature_groups} groups)" if lay.feature_groups > 1 else ""
        raise ValueError(
            f"LoraConfig.rank: rank {rank}{per} for {path!r} (shape {tuple(leaf.shape)}, axis roles "
            f"{lay.describe()}) exceeds the largest useful rank {limit}; fix: use rank <= "
            f"{limit * lay.feature_groups} (rank_pattern for this path)"
        )
    k = jax.random.fold_in(key, zlib.crc32(path.encode()))
    scale = config.scale_for(path, config.rank_for(path))
    if config.init == "loftq":
        return loftq.loftq_kernel(leaf, lay, rank, scale, config.loftq_bits, config.loftq_iter, dtype, path=path,
                                  groups=lay.fused)
    if inits.changes_base(config.init):
        return inits.init_from_kernel(k, leaf, lay, rank, scale, config.init, dtype, path=path)
    return (*kinds.init_factors(k, lay, rank, config.init, dtype), None)


def _magnitude(path: str, leaf: Any, w0: Any, a: Any, b: Any, lay: Layout, config: LoraConfig, dtype: Any) -> Any:
    """DoRA's magnitude at init: ``||W0 + s A B||`` per output unit (``||W0||`` with B zero)."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise ValueError(
            f"LoraConfig.use_dora: the magnitude of {path!r} starts at ||W0||, which needs the kernel's "
            "values, got a jax.ShapeDtypeStruct; fix: pass arrays (jax.eval_shape can abstract them)"
        )
    rank = configured_rank(config, path, lay)
    f = Factored(path, lay, rank, config.scale_for(path, config.rank_for(path)), dora=True)
    return dora.magnitude(_base(w0), a, b, f).astype(dtype)


def _trained_whole(flat: Mapping[str, Any], chosen: Sequence[str], config: LoraConfig,
                   residual: Mapping[str, Any]) -> dict[str, Any]:
    """The leaves trained whole (``trainable``) and the trained rows (``embedding_rows``) at init, by path."""
    out: dict[str, Any] = {}
    if config.trainable:
        paths.check_rules_match("trainable", config.trainable, flat)
    if config.embedding_rows:
        paths.check_rules_match("embedding_rows", [r for r, _ in config.embedding_rows], flat)
    for p, leaf in flat.items():
        if config.trainable and paths.matches(config.trainable, p):
            if p in chosen:
                raise ValueError(
                    f"LoraConfig.trainable: {p!r} is also a LoRA target; a leaf is either adapted or "
                    "trained whole. Fix: exclude it from one of the two"
                )
            out[p] = jnp.array(leaf, copy=True)
        rows = config.rows_for(p)
        if rows is not None:
            if p in out:
                raise ValueError(
                    f"LoraConfig.embedding_rows: {p!r} is also trained whole (LoraConfig.trainable); fix: "
                    "drop one of the two rules"
                )
            out[p + "/rows"] = extras.init_rows(_base(residual.get(p, leaf)), rows, p)
    return out


def init(key: jax.Array, params: Any, config: LoraConfig, apply_fn: Callable[..., Any] | None = None,
         args: Sequence[Any] = (), *, dtype: Any = None) -> tuple[Any, dict[str, Any]]:
    """Splits a parameter tree into ``(frozen, lora)``: the unchanged base and the trainable factors.

    Args:
      key: a PRNG key (required; each kernel gets its own key folded from its path).
      params: the model's parameters: a Linen variable dict, an ``nnx.State`` or nested dicts; arrays
        or ``jax.ShapeDtypeStruct`` (under ``jax.eval_shape`` nothing is allocated).
      config: the :class:`LoraConfig`.
      apply_fn: the model's apply function ``apply_fn(params, *args)``; with ``args`` it lets init
        read each kernel's input/output split from its use (traced abstractly, no FLOPs).
      args: example inputs (arrays or ``jax.ShapeDtypeStruct``) for ``apply_fn``.
      dtype: the factors' (and DoRA magnitudes') dtype. Default float32 whatever the kernel's dtype (as
        PEFT does): a bf16/fp16 base keeps its dtype, the low-rank branch computes in float32 and
        merges round once into the kernel's dtype. Pass ``dtype=jnp.bfloat16`` for half-size factors.

    Returns:
      ``(frozen, lora)``: ``frozen`` holds ``params``' arrays in new containers (new dicts, a new
      ``nnx.State`` with new Variables: updating the model later never changes ``frozen``); for
      ``init='pissa'``/``'olora'`` each adapted kernel is replaced by its residual (:mod:`jlora.core._inits`).
      ``lora`` holds ``{"A", "B"}`` per adapted kernel (A: ``stack + in + (r,)``, B: ``stack + (r,) + out``), plus
      ``"m"`` (``stack + out``) with ``use_dora`` (:mod:`jlora.dora`), ``"rows"`` per
      ``embedding_rows`` table, and a copy of each leaf matched by ``config.trainable``. The model
      output is unchanged at init, except with ``init='loftq'``: ``frozen`` then holds each adapted
      kernel's quantized base Q (a ``QuantizedArray``) and the model starts at ``Q + s·A⊗B ≈ W0``
      (:mod:`jlora.quant._loftq`).

    >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> frozen, lora = init(jax.random.key(0), params, LoraConfig(rank=2, targets=".*kernel"))
    >>> jax.tree.map(jnp.shape, lora)
    {'dense': {'kernel': LoraKernel({'A': (4, 2), 'B': (2, 3)}, layout='io' (4:in, 3:out))}}
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"jlora.init: config must be a jlora.LoraConfig, got {type(config).__name__}; fix: "
                        "jlora.init(key, params, jlora.LoraConfig(rank=8, targets=r'.*/query/kernel'))")
    checks.prng_key("jlora.init", "key", key)
    dtype = checks.float_dtype("jlora.init", dtype) or jnp.float32
    checks.no_none_targets("jlora.init", params, config)
    flat = paths.flatten(params)
    chosen = _targets(flat, config)
    checks.pattern_keys_match(config, chosen)
    layouts = _layouts(flat, chosen, config, apply_fn, params, args)
    out: dict[str, Any] = {}
    residual: dict[str, Any] = {}
    for p in chosen:
        a, b, base = _factors(key, p, flat[p], layouts[p], config, dtype)
        if base is not None:
            residual[p] = base
        out[p + "/A"], out[p + "/B"] = a, b
        if config.use_dora:
            out[p + "/m"] = _magnitude(p, flat[p], residual.get(p, flat[p]), a, b, layouts[p], config, dtype)
    out.update(_trained_whole(flat, chosen, config, residual))
    # New containers (new NNX Variables) around the same immutable arrays: frozen never aliases mutable
    # model state, so nnx.update(model, merge(frozen, ...)) cannot rewrite frozen behind the user's back.
    frozen = paths.map_with_path(lambda q, w: residual.get(q, w), params)
    return frozen, nest(out, layouts)


def delta(frozen: Any, lora: Any, config: LoraConfig) -> dict[str, jax.Array]:
    """The full-size update ``s * A ⊗ B`` of every adapted kernel, by path, in float32.

    >>> frozen = {"d": {"kernel": jnp.zeros((2, 2))}}
    >>> lora = {"d": {"kernel": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2))}}}
    >>> delta(frozen, lora, LoraConfig(rank=1, alpha=2, targets=".*"))["d/kernel"].tolist()
    [[2.0, 2.0], [2.0, 2.0]]
    """
    info = adapted(frozen, lora, config)
    flat = paths.flatten(lora)
    return {p: kinds.factors_delta(flat[p + "/A"], flat[p + "/B"], f) for p, f in info.items()}


INTO = (None, "float")


def _combine(frozen: Any, lora: Any, config: LoraConfig, sign: float, whole: bool, *, name: str = "merge",
             into: str | None = None, dtype: Any = None) -> Any:
    if into not in INTO:
        raise ValueError(
            f"jlora.{name}: into must be None or 'float', got {into!r}; a quantized result is never made "
            "implicitly: fix: jlora.quant.quantize(jlora.merge(frozen, lora, config, into='float'), ...)"
        )
    if dtype is not None and into is None:
        raise TypeError(f"jlora.{name}: dtype= sets the dtype of dequantized kernels; it needs into='float'; fix: "
                        f"jlora.{name}(..., into='float', dtype=...) for a quantized base, or cast the frozen tree "
                        "yourself (jax.tree.map(lambda w: w.astype(dtype), frozen)) for a float base")
    checks.lora_tree(f"jlora.{name}", lora)  # a non-array leaf is named by its path, under this function's name
    quantized = [p for p, x in paths.flatten(frozen).items() if quant.is_quantized(x)]
    if quantized and into is None:
        raise ValueError(
            f"jlora.{name}: frozen leaf {quantized[0]!r} is quantized ({paths.flatten(frozen)[quantized[0]]!r}"
            f"{f' and {len(quantized) - 1} more' if len(quantized) > 1 else ''}); adding a delta to it would "
            f"have to re-quantize, which jlora never does silently. Fix: "
            + ("jlora.merge(..., into='float') for float kernels (dequantized W0 + delta, float32 or dtype=), "
               if name == "merge" else "unmerge float params (what jlora.merge(..., into='float') returns); ")
            + "or keep the base quantized and run jlora.lora_apply(...)(frozen, lora, x)"
        )
    info = adapted(frozen, lora, config)
    flat = paths.flatten(lora)
    deltas = {p: kinds.factors_delta(flat[p + "/A"], flat[p + "/B"], f) for p, f in info.items()}
    out_dtype = jnp.float32 if dtype is None else dtype
    doras = [p for p, f in info.items() if f.dora]
    if sign < 0 and doras:
        raise ValueError(
            f"jlora.unmerge: {doras[0]!r} is a DoRA kernel: the merged kernel m·V/||V|| keeps only V's "
            "direction, so W0 needs ||V||, which the lora tree does not hold; fix: norms = jlora.dora.norms(frozen, "
            "lora, config) before merging, then jlora.unmerge(params, lora, config, norms=norms) (it calls "
            "jlora.dora.unmerge)"
        )

    def one(path: str, w: Any) -> Any:
        if quant.is_quantized(w):  # dequantized W0 (+ delta) in float32, cast once to out_dtype
            return checks.cast_checked(f"jlora.{name}", path, plain(path, quant.dequantize(w, jnp.float32)), out_dtype)
        return plain(path, w)

    def plain(path: str, w: Any) -> Any:
        if whole and path + "/rows" in flat:
            w = extras.scatter_rows(w, flat[path + "/rows"], config.rows_for(path), path)
        if path in info and info[path].dora:
            return dora.dora_kernel(w, deltas[path], flat[path + "/m"], info[path])
        if path in deltas:
            return checks.cast_checked(f"jlora.{name}", path, w.astype(jnp.float32) + sign * deltas[path], w.dtype)
        if whole and path in flat:
            return flat[path]
        return w

    return paths.map_with_path(one, frozen)


def merge(frozen: Any, lora: Any, config: LoraConfig, *, into: str | None = None, dtype: Any = None) -> Any:
    """The parameters with LoRA folded in: ``W0 + s * A ⊗ B`` per adapted kernel, summed in float32
    and cast once to W0's dtype; trained-whole leaves take the lora tree's value. Inputs are not
    modified; the result has frozen's type (Linen dict, ``nnx.State``, nested dicts).

    DoRA kernels (an ``'m'`` beside A and B) merge to ``m * V / ||V||_in``, ``V = W0 + s A ⊗ B``
    (:func:`jlora.dora.dora_kernel`); trained ``'rows'`` are scattered into their table first.

    A quantized base (:func:`jlora.quant.quantize`) needs an explicit target: ``into='float'``
    dequantizes every quantized kernel and adds its delta, in float32 (or ``dtype``); without it a
    quantized leaf is a ValueError (jlora never re-quantizes silently).

    A kernel whose ``W0 + delta`` overflows W0's dtype (an fp16 base, a large delta) raises a ValueError
    naming the path when the values are concrete; under ``jax.jit`` they are not known, and the
    overflowing entries become ``inf`` as ``astype`` makes them (lazy mode has no such limit).

    >>> frozen = {"d": {"kernel": jnp.zeros((2, 2))}}
    >>> lora = {"d": {"kernel": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2))}}}
    >>> merge(frozen, lora, LoraConfig(rank=1, alpha=1, targets=".*"))["d"]["kernel"].tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    return _combine(frozen, lora, config, 1.0, whole=True, into=into, dtype=dtype)


def unmerge(params: Any, lora: Any, config: LoraConfig, norms: Mapping[str, Any] | None = None) -> Any:
    """Inverts :func:`merge` on the adapted kernels: ``W - s * A ⊗ B`` (float32, cast to W's dtype).

    Trained-whole leaves and trained rows are left as they are in ``params``: their originals are not
    stored in ``lora``. Exact up to one rounding of the kernel dtype (|error| <= ulp(W) for float32).
    DoRA kernels need the norms merge divided by: pass ``norms=jlora.dora.norms(frozen, lora, config)``
    computed before merging (:func:`jlora.dora.unmerge` does the work; without norms a DoRA kernel raises).

    >>> frozen = {"d": {"kernel": jnp.zeros((2, 2))}}
    >>> lora = {"d": {"kernel": {"A": jnp.ones((2, 1)), "B": jnp.ones((1, 2))}}}
    >>> cfg = LoraConfig(rank=1, alpha=1, targets=".*")
    >>> unmerge(merge(frozen, lora, cfg), lora, cfg)["d"]["kernel"].tolist()
    [[0.0, 0.0], [0.0, 0.0]]
    """
    if norms is not None:
        if not isinstance(norms, Mapping):
            raise TypeError(f"jlora.unmerge: norms must be a dict {{path: ||V||_in}}, got {type(norms).__name__}; fix: "
                            "norms=jlora.dora.norms(frozen, lora, config), computed before merging")
        return dora.unmerge(params, lora, config, norms)
    return _combine(params, lora, config, -1.0, whole=False, name="unmerge")
