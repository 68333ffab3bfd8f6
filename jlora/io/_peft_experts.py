"""PEFT ``target_parameters`` interop: LoRA on expert kernels stored as one parameter of E experts.

PEFT (0.17+) adapts an ``nn.Parameter`` of shape ``(E, d1, d2)`` (transformers' fused experts:
Qwen3-MoE, OLMoE, Mixtral, GPT-OSS ``gate_up_proj`` / ``down_proj``) with ``lora.ParamWrapper``.
Read from ``peft/tuners/lora/layer.py`` (``ParamWrapper.update_layer``, ``get_delta_weight``)::

    lora_A.weight  (E·r, in)    row    e·r + k   (expert-major): A_e = lora_A[e·r:(e+1)·r]  (r, in)
    lora_B.weight  (out, r·E)   column k·E + e   (rank-major):   B_e = lora_B[:, e::E]      (out, r)
    delta_e = scaling · (B_e · A_e)ᵀ-or-not, scaling = lora_alpha / r (or / sqrt(r) with rslora)

**Rank convention**: PEFT's ``r`` (and ``rank_pattern``) is the rank *per expert*; the stored
factors hold ``r·E`` rows / columns. jlora's ``A (E, in, r)``, ``B (E, r, out)`` use the same r and
scale, so ``A = lora_A.reshape(E, r, in).transpose(0, 2, 1)`` and
``B = lora_B.reshape(out, r, E).transpose(2, 1, 0)``. A file whose factor sizes are not
``r·E`` for the parameter's E (or disagree with its ``r`` / ``rank_pattern``) is refused.

``in`` / ``out`` are the expert's input and output features whatever the stored order: PEFT reads
``(E, out, in)`` (``nn.Linear``-style, transformers' default) unless the experts module sets
``is_transposed = True`` (``(E, in, out)``); jlora takes them from the kernel's
:class:`~jlora.layout.Layout`, so a JAX port may store the kernel either way.

Naming: several parameters of one module nest ``ParamWrapper``\\ s in the order the module
registers them (``named_parameters``; transformers' experts: ``gate_up_proj`` then ``down_proj``):
the first wrapped is innermost, so its keys carry one ``.base_layer`` per later wrapper, e.g.
``...mlp.experts.base_layer.lora_A.weight`` (gate_up_proj) and ``...mlp.experts.lora_A.weight``
(down_proj). ``param_order`` states that registration order. In a key map, an expert kernel maps
to the torch *parameter* name (``model.layers.0.mlp.experts.gate_up_proj``), and
``adapter_config.json`` lists it in ``target_parameters``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jlora.core import paths
from jlora.core.layout import Layout
from jlora.trace import _analysis as analysis

__all__ = ["PARAM_ORDER", "is_expert", "factors_to_torch", "factors_from_torch", "wrapper_prefixes", "export",
           "read"]

PARAM_ORDER = ("gate_up_proj", "down_proj", "w1", "w2", "w3")
"""Registration order of expert parameters on one module (transformers' fused experts)."""

PREFIX = "base_model.model."


def is_expert(layout: Layout | None) -> bool:
    """True for a kernel PEFT's ``ParamWrapper`` can hold: 3 axes, one stack (expert), one in, one out.

    >>> is_expert(Layout((8, 32, 16), "soi")), is_expert(Layout((32, 16), "io"))
    (True, False)
    """
    return (layout is not None and len(layout.shape) == 3 and layout.splits is None and layout.n_stack == 1
            and layout.kind == "dense")


def factors_to_torch(A: np.ndarray, B: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """jlora ``A (E, in, r)``, ``B (E, r, out)`` -> PEFT ``lora_A (E·r, in)``, ``lora_B (out, r·E)``.

    >>> a, b = factors_to_torch(np.zeros((4, 6, 2)), np.zeros((4, 2, 5)), Layout((4, 5, 6), "soi"))
    >>> a.shape, b.shape
    ((8, 6), (5, 8))
    """
    e, n_in, r = A.shape
    n_out = B.shape[-1]
    return (np.ascontiguousarray(np.transpose(A, (0, 2, 1)).reshape(e * r, n_in)),
            np.ascontiguousarray(np.transpose(B, (2, 1, 0)).reshape(n_out, r * e)))


def factors_from_torch(path: str, key: str, tA: np.ndarray, tB: np.ndarray, layout: Layout, rank: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`factors_to_torch`, checking PEFT's sizes for ``rank`` per expert.

    >>> A, B = factors_from_torch("w", "k", np.zeros((8, 6)), np.zeros((5, 8)), Layout((4, 5, 6), "soi"), 2)
    >>> A.shape, B.shape
    ((4, 6, 2), (4, 2, 5))
    """
    (e,), (n_in,), (n_out,) = layout.stack_shape, layout.in_shape, layout.out_shape
    if tA.ndim != 2 or tB.ndim != 2 or tA.shape[1] != n_in or tB.shape[0] != n_out:
        raise ValueError(
            f"jlora.peft.load: {key!r}: lora_A {tuple(tA.shape)} / lora_B {tuple(tB.shape)} do not fit the expert "
            f"kernel {path!r} {layout.describe()}; expected lora_A (E·r, {n_in}), lora_B ({n_out}, r·E); fix: check "
            "the key_map, the base model and the kernel's layout (apply_fn/args or layouts=)"
        )
    for name, size in (("lora_A rows", tA.shape[0]), ("lora_B columns", tB.shape[1])):
        if size != e * rank:
            raise ValueError(
                f"jlora.peft.load: {key!r}: {name} = {size}, but PEFT stores rank r per expert as r·E = {rank}·{e} "
                f"= {rank * e} for the {e} experts of {path!r}"
                + (f" ({size} is not a multiple of {e} experts)" if size % e else
                   f" (it fits rank {size // e}, not the config's r / rank_pattern {rank})")
                + "; fix: the adapter must come from a model with the same expert count and its own config"
            )
    A = np.transpose(tA.reshape(e, rank, n_in), (0, 2, 1))
    B = np.transpose(tB.reshape(n_out, rank, e), (2, 1, 0))
    return A, B


def wrapper_prefixes(names: Sequence[str], param_order: Sequence[str] = PARAM_ORDER) -> dict[str, str]:
    """Torch parameter name -> the module prefix of its ``ParamWrapper`` keys (nesting: see above).

    >>> wrapper_prefixes(["m.experts.down_proj", "m.experts.gate_up_proj"])
    {'m.experts.gate_up_proj': 'm.experts.base_layer', 'm.experts.down_proj': 'm.experts'}
    """
    by_module: dict[str, list[str]] = {}
    for name in names:
        module, _, param = name.rpartition(".")
        by_module.setdefault(module, []).append(param)
    out: dict[str, str] = {}
    for module, params in by_module.items():
        unknown = [p for p in params if p not in param_order]
        if unknown and len(params) > 1:
            raise ValueError(
                f"jlora.peft: module {module!r} has several targeted parameters {sorted(params)}; PEFT nests their "
                f"wrappers in the order the module registers them, and {unknown} is not in param_order "
                f"{tuple(param_order)}; fix: pass param_order listing them in the torch module's order"
            )
        ordered = sorted(params, key=lambda p: param_order.index(p) if p in param_order else 0)
        for depth, param in enumerate(ordered):
            out[f"{module}.{param}"] = module + ".base_layer" * (len(ordered) - 1 - depth)
    return out


def export(experts: Mapping[str, tuple[Any, Any, Layout]], place: Callable[[str], str], config: Any,
           param_order: Sequence[str] = PARAM_ORDER) -> tuple[dict[str, np.ndarray], list[str], dict[str, int],
                                                               dict[str, float]]:
    """PEFT tensors, ``target_parameters``, ``rank_pattern`` and ``alpha_pattern`` of expert kernels.

    Args:
      experts: jlora path -> ``(A, B, layout)`` of each expert kernel.
      place: jlora path -> the torch parameter name (``model.layers.0.mlp.experts.gate_up_proj``).
      config: the :class:`jlora.LoraConfig` (ranks and alphas per path).
      param_order: the torch module's registration order of its expert parameters.

    >>> from jlora import LoraConfig
    >>> t, names, _, _ = export({"w": (np.ones((2, 3, 1)), np.ones((2, 1, 4)), Layout((2, 4, 3), "soi"))},
    ...                         lambda p: "m.experts.down_proj", LoraConfig(rank=1, targets="w"))
    >>> sorted((k.removeprefix(PREFIX), v.shape) for k, v in t.items()), names
    ([('m.experts.lora_A.weight', (2, 3)), ('m.experts.lora_B.weight', (4, 2))], ['m.experts.down_proj'])
    """
    if experts and (config.dropout or config.use_dora):
        raise ValueError(
            f"jlora.peft.save: {sorted(experts)[0]!r} is an expert kernel (PEFT target_parameters), and PEFT's "
            f"ParamWrapper refuses lora_dropout != 0 and use_dora (config: dropout={config.dropout}, use_dora="
            f"{config.use_dora}); fix: save with config.replace(dropout=0.0) (dropout does not change a trained "
            "adapter), or target the experts without DoRA"
        )
    names = {path: place(path) for path in experts}
    seen: dict[str, str] = {}
    for path, name in names.items():
        if name in seen:
            raise ValueError(f"jlora.peft.save: key_map sends both {seen[name]!r} and {path!r} to {name!r}; fix: "
                             "make the key_map give each expert kernel its own torch parameter")
        seen[name] = path
    prefixes = wrapper_prefixes(list(names.values()), param_order)
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, (A, B, layout) in sorted(experts.items()):
        A, B = np.asarray(A), np.asarray(B)
        tA, tB = factors_to_torch(A, B, layout)
        key = PREFIX + prefixes[names[path]]
        tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = tA, tB
        if A.shape[-1] != config.rank:
            ranks[re.escape(names[path])] = int(A.shape[-1])
        if config.alpha_for(path) != config.alpha:
            alphas[re.escape(names[path])] = config.alpha_for(path)
    return tensors, sorted(names.values()), ranks, alphas


def _layout_from_sizes(path: str, shape: tuple[int, ...], tA: np.ndarray, key: str) -> Layout:
    if len(shape) != 3:
        raise ValueError(f"jlora.peft.load: {key!r} targets {path!r} of shape {shape}; a PEFT target parameter "
                         "of E experts is 3-D (E, ., .); fix: check the key_map (it places this parameter at a "
                         "leaf that is not an expert kernel)")
    n_in = tA.shape[1] if tA.ndim == 2 else -1
    if shape[1] == shape[2] or n_in not in shape[1:]:
        raise ValueError(
            f"jlora.peft.load: cannot tell which axis of the expert kernel {path!r} {shape} is the input from "
            f"{key!r} {tuple(tA.shape)}; fix: pass apply_fn/args (the roles are read from the trace) or "
            f"layouts={{{path!r}: jlora.Layout({shape}, 'sio' or 'soi')}}"
        )
    return Layout(shape, "sio" if shape[1] == n_in else "soi")


def _targeted(flat: Mapping[str, Any], place: Callable[[str], str | None], targets: Sequence[str]) -> dict[str, str]:
    """torch parameter name -> params path of each 3-D leaf that ``target_parameters`` names."""
    owner: dict[str, str] = {}
    for path, leaf in flat.items():
        name = place(path)
        if name is not None and len(getattr(leaf, "shape", ())) == 3 and any(
                name == t or name.endswith("." + t) for t in targets):
            owner[name] = path
    if not owner:
        raise ValueError(
            f"jlora.peft.load: adapter_config.json's target_parameters {list(targets)} match no 3-D params leaf "
            "through key_map (an expert kernel maps to its torch parameter name, e.g. "
            "'model.layers.0.mlp.experts.gate_up_proj'); fix: add a (regex, parameter name) pair to key_map"
        )
    return owner


def _known_layouts(owner: Mapping[str, str], layouts: Mapping[str, Layout] | None, apply_fn: Callable[..., Any] | None,
                   params: Any, args: Sequence[Any]) -> dict[str, Layout]:
    """``layouts=``, completed from the trace of ``apply_fn`` where it tells a kernel's layout."""
    known = dict(layouts or {})
    todo = [p for p in owner.values() if p not in known]
    if apply_fn is not None and todo:
        for p, lay in analysis.read_layouts(apply_fn, params, args, todo).items():
            if isinstance(lay, Layout):
                known[p] = lay
    return known


def _pop_factors(tensors: dict[str, np.ndarray], key: str, name: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Pops the parameter's ``lora_A`` / ``lora_B`` (under its wrapper key) out of ``tensors``."""
    ka, kb = key + ".lora_A.weight", key + ".lora_B.weight"
    if ka not in tensors or kb not in tensors:
        near = sorted(k for k in tensors if k.startswith(PREFIX + name.rpartition(".")[0]))
        raise ValueError(
            f"jlora.peft.load: adapter_config.json targets parameter {name!r} ({path!r}) but the file has no "
            f"{ka!r} / {kb!r} (keys of its module: {near}); fix: check param_order (the torch module's "
            "parameter order) and the key_map"
        )
    return tensors.pop(ka), tensors.pop(kb)


def read(tensors: dict[str, np.ndarray], body: Mapping[str, Any], params: Any,
         place: Callable[[str], str | None], *, layouts: Mapping[str, Layout] | None = None,
         apply_fn: Callable[..., Any] | None = None, args: Sequence[Any] = (),
         param_order: Sequence[str] = PARAM_ORDER) -> dict[str, tuple[np.ndarray, np.ndarray, Layout, int, float]]:
    """Pops the ``target_parameters`` tensors out of ``tensors`` and converts them.

    Returns jlora path -> ``(A, B, layout, rank, alpha)`` (PEFT ``r`` / ``rank_pattern`` /
    ``alpha_pattern`` resolved per parameter, as PEFT does with the parameter's full name).
    ``tensors`` keeps every other key for the module reader.

    >>> read({}, {"target_parameters": None}, {}, lambda p: None)
    {}
    """
    targets = body.get("target_parameters") or []
    if not targets:
        return {}
    flat = paths.flatten(params)
    owner = _targeted(flat, place, targets)
    prefixes = wrapper_prefixes(list(owner), param_order)
    rank, alpha = int(body["r"]), float(body["lora_alpha"])
    rank_pattern, alpha_pattern = body.get("rank_pattern") or {}, body.get("alpha_pattern") or {}

    def pattern(keys: Any, name: str) -> str | None:  # PEFT's get_pattern_key
        return next((k for k in keys if re.match(rf"(.*\.)?({k})$", name)), None)

    known = _known_layouts(owner, layouts, apply_fn, params, args)
    out: dict[str, tuple[np.ndarray, np.ndarray, Layout, int, float]] = {}
    for name, path in sorted(owner.items()):
        ka = PREFIX + prefixes[name] + ".lora_A.weight"
        tA, tB = _pop_factors(tensors, PREFIX + prefixes[name], name, path)
        shape = tuple(flat[path].shape)
        lay = known.get(path) or _layout_from_sizes(path, shape, tA, ka)
        if not is_expert(lay):
            raise ValueError(f"jlora.peft.load: {path!r} {lay.describe()} is not an expert kernel (E, in, out) "
                             "in any order; PEFT target_parameters hold one; fix: pass apply_fn/args or layouts= "
                             "that give this kernel its expert (stack) axis")
        rp, ap = pattern(rank_pattern, name), pattern(alpha_pattern, name)
        r = int(rank_pattern[rp]) if rp is not None else rank
        A, B = factors_from_torch(path, ka, tA, tB, lay, r)
        out[path] = (A, B, lay, r, float(alpha_pattern[ap]) if ap is not None else alpha)
    return out
