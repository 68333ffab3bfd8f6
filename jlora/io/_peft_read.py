"""The steps of :func:`jlora.peft.load`: read the files, classify the keys, resolve each kernel's layout,
convert the factors and the whole leaves, build the :class:`~jlora.LoraConfig`.

Each step is one function; :func:`jlora.peft.load` runs them in that order. A kernel's axis roles come
from a :class:`~jlora.layout.Layout` (``layouts=`` or the trace of ``apply_fn``); without either, the
key map's stated kernel order or the factor sizes decide (:func:`jlora.io._peft_layout.untraced_layout`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import paths
from jlora.core._config import LoraConfig
from jlora.core.layout import Layout
from jlora.io._peft_keys import (CONFIG_NAME, PICKLED_NAMES, PREFIX, WEIGHTS_NAME, _group, _pattern_key, _peft_targets,
                                 _read_config, _token_indices)
from jlora.io._peft_layout import factors_from_torch, untraced_layout, whole_from_torch
from jlora.trace import _analysis as analysis

Tensor = tuple[str, np.ndarray]  # (adapter key, tensor)


# --- read the files ------------------------------------------------------------------------------

def read_files(src: Path) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]]:
    """``(weights file, adapter_config.json body, tensors)`` of the adapter folder ``src``; a pickled
    file is refused, never unpickled."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not src.is_dir():
        raise FileNotFoundError(f"jlora.peft.load: adapter folder {src} does not exist; fix: "
                                "pass the folder holding adapter_config.json and adapter_model.safetensors")
    weights = src / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [n for n in PICKLED_NAMES if (src / n).is_file()]
        if pickled:
            raise ValueError(
                f"jlora.peft.load: {src} holds {pickled[0]}, a pickled PyTorch file, and no {WEIGHTS_NAME}; "
                "jlora never unpickles (loading a pickle can run arbitrary code). Fix: in PyTorch, load the "
                "adapter with PeftModel.from_pretrained and save it again with "
                "save_pretrained(..., safe_serialization=True)"
            )
        raise FileNotFoundError(
            f"jlora.peft.load: {weights} is missing (folder holds: {sorted(p.name for p in src.iterdir())}); fix: "
            "pass the folder PEFT's save_pretrained wrote (for a named adapter: adapter_name=...)"
        )
    cfg_path = src / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"jlora.peft.load: {cfg_path} is missing; a PEFT adapter needs its config; fix: "
                                "copy adapter_config.json from where the adapter was saved, beside its weights")
    body = _read_config(cfg_path)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"jlora.peft.load: {weights} is not a readable safetensors file ({err}); fix: save the "
                         "adapter again (PEFT's save_pretrained or jlora.peft.save)") from None
    return weights, body, tensors


@dataclasses.dataclass(frozen=True)
class Owners:
    """Which params leaf each ``(torch module, torch parameter)`` is, through the key map."""

    by_key: Mapping[tuple[str, str], str]

    @classmethod
    def of(cls, flat: Mapping[str, Any], place: Callable[[str], str | None],
           torch_param: Callable[[str], str]) -> Owners:
        """Places every params leaf; two leaves on one torch parameter are refused."""
        owner: dict[tuple[str, str], str] = {}
        for path in flat:
            module = place(path)
            if module is None:
                continue
            key = (module, torch_param(path))
            if key in owner:
                raise ValueError(f"jlora.peft.load: key_map sends both {owner[key]!r} and {path!r} to "
                                 f"{'.'.join(key)}; fix: make the key_map give each params leaf its own torch module")
            owner[key] = path
        return cls(owner)

    def where(self, key: str, module: str, param: str) -> str:
        """The params leaf of adapter key ``key`` (torch ``module.param``), or the error naming the closest."""
        path = self.by_key.get((module, param))
        if path is None:
            near = ", ".join(paths.closest(module, sorted({m for m, _ in self.by_key}), 3))
            raise ValueError(
                f"jlora.peft.load: adapter key {key!r}: key_map places no params leaf at torch module {module!r} "
                f"(parameter {param!r}); closest modules the map produces: {near}. Fix: extend key_map if the "
                f"model has that module, or pass ignore=[{re.escape(module)!r}] to skip a module the Flax model "
                "does not have (e.g. BERT's pooler)"
            )
        return path


# --- classify the keys ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Classified:
    """The adapter's tensors by what they are (torch module names, PEFT's prefix removed).

    Attributes:
      factors: module -> ``{"A": ..., "B": ...}`` (plus ``"m"``: DoRA magnitude, ``"embed"``: the
        module is an ``nn.Embedding``: ``lora_embedding_A``/``_B``).
      whole: ``(module, torch parameter)`` -> a weight saved whole (``modules_to_save``, ``bias``).
      token_rows: module -> its ``trainable_token_indices`` rows.
    """

    factors: dict[str, dict[str, Tensor]]
    whole: dict[tuple[str, str], Tensor]
    token_rows: dict[str, Tensor]


def module_of(name: str) -> str:
    """The torch module name of an adapter tensor key (after PEFT's prefix).

    >>> module_of("pooler.dense.lora_A.weight"), module_of("classifier.modules_to_save.default.bias")
    ('pooler.dense', 'classifier')
    """
    m = re.fullmatch(r"(.+?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|token_adapter)"
                     r"(\..*)?", name)
    if m:
        return m.group(1)
    module = name.rpartition(".")[0].removesuffix(".base_layer")
    return re.sub(r"\.modules_to_save(\.[^.]+)?$", "", module)


def classify(tensors: Mapping[str, np.ndarray], weights: Path, ignore: tuple[str, ...]) -> Classified:
    """Sorts the adapter keys into LoRA factors, whole weights and token rows; a key of a LoRA variant
    jlora does not read, or one outside PEFT's prefix, is refused."""
    out = Classified({}, {}, {})
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"jlora.peft.load: {weights}: key {key!r} does not start with {PREFIX!r}; not a PEFT file")
        name = key[len(PREFIX):]
        if ignore and paths.matches(ignore, module_of(name)):
            continue  # a module the caller skips on purpose
        m = re.fullmatch(r"(.+)\.token_adapter\.trainable_tokens_delta", name)
        if m:
            out.token_rows[m.group(1)] = (key, value)
            continue
        m = re.fullmatch(r"(.+)\.lora_magnitude_vector(?:\.weight)?", name)
        if m:
            out.factors.setdefault(m.group(1), {})["m"] = (key, value)
            continue
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
        if m:
            module = m.group(1) or m.group(3)
            out.factors.setdefault(module, {})[(m.group(2) or m.group(4))[-1]] = (key, value)
            if m.group(4):
                out.factors[module]["embed"] = (key, value)
            continue
        if ".lora_" in name:
            raise ValueError(
                f"jlora.peft.load: {weights}: key {key!r} belongs to a LoRA variant jlora does not read yet; fix: "
                "merge the adapter in PEFT (merge_and_unload) and load the merged weights as params instead"
            )
        module, _, param = name.rpartition(".")
        module = re.sub(r"\.modules_to_save(\.[^.]+)?$", "", module.removesuffix(".base_layer"))
        out.whole[(module, param)] = (key, value)
    return out


# --- resolve each kernel's layout ----------------------------------------------------------------

def traced_layouts(found: Classified, owners: Owners, layouts: Mapping[str, Layout] | None,
                   apply_fn: Callable[..., Any] | None, params: Any, args: Sequence[Any]) -> dict[str, Layout]:
    """The layouts known before reading any factor: ``layouts=``, then the trace of ``apply_fn``."""
    known = dict(layouts or {})
    if apply_fn is not None:
        adapted_paths = [owners.where(parts["A"][0], module, "weight")
                         for module, parts in sorted(found.factors.items()) if "A" in parts]
        for p, lay in analysis.read_layouts(apply_fn, params, args, adapted_paths).items():
            if isinstance(lay, str) and p not in known:
                raise ValueError(f"jlora.peft.load: cannot tell the axis roles of {p!r}: the trace says {lay}; fix: "
                                 "pass layouts={path: jlora.Layout(shape, roles)} for it")
            known.setdefault(p, lay)
    return known


@dataclasses.dataclass(frozen=True)
class ReadContext:
    """What every load step reads: the files, the params and where each torch module lives."""

    weights: Path
    body: Mapping[str, Any]
    flat: Mapping[str, Any]
    owners: Owners
    known: Mapping[str, Layout]
    kernel_order: str | None  # the key map's stated kernel order (PortKeyMap), or None


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One adapted module of the file: its params leaf and the leaf's resolved layout."""

    module: str
    path: str
    layout: Layout
    parts: Mapping[str, Tensor]


def peft_kind(parts: Mapping[str, Tensor]) -> str:
    """The torch module type the PEFT tensors show: ``lora_embedding_*`` an ``nn.Embedding``, a
    ``lora_A`` with kernel axes ``(r, cin, k...)`` a conv, else an ``nn.Linear`` (a file format fact)."""
    return "embed" if "embed" in parts else "conv" if parts["A"][1].ndim > 2 else "dense"


def resolve_kernel(module: str, parts: Mapping[str, Tensor], ctx: ReadContext) -> Kernel:
    """Checks one module's factors against the file's config and resolves its kernel's layout."""
    if "A" not in parts or "B" not in parts:
        have = next(iter(parts.values()))[0]
        raise ValueError(f"jlora.peft.load: {ctx.weights}: {have!r} has no partner factor (need both A and B); fix: "
                         "save the adapter again (the file is incomplete)")
    key_a, tA = parts["A"]
    tB = parts["B"][1]
    path = ctx.owners.where(key_a, module, "weight")
    if not _peft_targets(ctx.body, module):
        raise ValueError(
            f"jlora.peft.load: {ctx.weights} holds factors for {module!r} ({path!r}) but {CONFIG_NAME} does not "
            "target it (target_modules / exclude_modules / layers_to_transform); PEFT would ignore them; fix: "
            "correct target_modules in the config, or save the adapter again from PEFT"
        )
    shape = tuple(ctx.flat[path].shape)
    bad = [k for k, t in parts.values() if t.dtype.kind != "f"]
    if bad:
        raise ValueError(f"jlora.peft.load: {bad[0]!r} has dtype {tA.dtype if bad[0] == key_a else 'int'}, "
                         "expected float LoRA factors; fix: re-save the adapter from a float PEFT model")
    layout = ctx.known.get(path)
    if layout is None:
        layout = untraced_layout(path, key_a, shape, tA.shape[-1] if tA.ndim == 2 else 0,
                                 tB.shape[0] if tB.ndim == 2 else 0, peft_kind(parts), ctx.kernel_order)
    elif layout.shape != shape:
        raise ValueError(f"jlora.peft.load: the layout given for {path!r} is for shape {layout.shape}, the "
                         f"params leaf has shape {shape}; fix: layouts=jlora.kernel_layouts(lora) of a lora tree "
                         "made on these params, or jlora.Layout(leaf.shape, roles)")
    if "embed" in parts and layout.kind != "embed":
        layout = Layout(layout.shape, layout.roles, layout.splits, "embed")
    return Kernel(module, path, layout, parts)


# --- convert ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Converted:
    """The lora tree's flat leaves and what the config needs of them, filled step by step."""

    out: dict[str, Any] = dataclasses.field(default_factory=dict)
    used: dict[str, Layout] = dataclasses.field(default_factory=dict)
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)
    alphas: dict[str, float] = dataclasses.field(default_factory=dict)
    axes: dict[str, int] = dataclasses.field(default_factory=dict)
    embedding_rows: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    trainable: list[str] = dataclasses.field(default_factory=list)


def convert_kernel(k: Kernel, ctx: ReadContext, into: Converted) -> None:
    """One module's PEFT factors as jlora ``A``, ``B`` (and ``m``), with its rank and alpha checked
    against ``r`` / ``rank_pattern`` / ``alpha_pattern``."""
    body = ctx.body
    key_a = k.parts["A"][0]
    A, B, m = factors_from_torch(k.path, k.layout, k.parts)
    into.used[k.path] = k.layout
    r = A.shape[-1] * k.layout.feature_groups
    rank_pattern, alpha_pattern = body.get("rank_pattern") or {}, body.get("alpha_pattern") or {}
    pattern = _pattern_key(rank_pattern, k.module)
    expect_r = rank_pattern[pattern] if pattern is not None else int(body["r"])
    if r != expect_r:
        raise ValueError(
            f"jlora.peft.load: {key_a!r} has rank {r} but {CONFIG_NAME} gives module {k.module!r} rank {expect_r} "
            "(r / rank_pattern); the file and its config disagree; fix: save the adapter again from PEFT (or "
            "correct r / rank_pattern in the config)"
        )
    pattern = _pattern_key(alpha_pattern, k.module)
    into.alphas[k.path] = float(alpha_pattern[pattern]) if pattern is not None else float(body["lora_alpha"])
    into.ranks[k.path] = r
    if k.layout.is_plain and len(k.layout.shape) != 2 and k.layout.kind != "conv":
        into.axes[k.path] = k.layout.n_in
    into.out[k.path + "/A"] = jnp.asarray(A)
    into.out[k.path + "/B"] = jnp.asarray(B)
    use_dora = bool(body.get("use_dora", False))
    if ("m" in k.parts) != use_dora:
        raise ValueError(
            f"jlora.peft.load: {ctx.weights}: module {k.module!r} {'has' if 'm' in k.parts else 'has no'} "
            f"lora_magnitude_vector but {CONFIG_NAME} has use_dora={use_dora}; the file and its config disagree; "
            "fix: save the adapter again from PEFT (or correct use_dora in the config)"
        )
    if m is not None:
        into.out[k.path + "/m"] = jnp.asarray(m)


def convert_experts(experts: Mapping[str, tuple[np.ndarray, np.ndarray, Layout, int, float]], into: Converted) -> None:
    """Expert kernels read by :func:`jlora.io._peft_experts.read` (``target_parameters``)."""
    for path, (A, B, lay, r, a) in experts.items():
        into.out[path + "/A"], into.out[path + "/B"] = jnp.asarray(A), jnp.asarray(B)
        into.used[path], into.ranks[path], into.alphas[path] = lay, r, a


def convert_rows(token_rows: Mapping[str, Tensor], ctx: ReadContext, into: Converted) -> None:
    """``trainable_token_indices`` rows as ``rows`` leaves and ``LoraConfig.embedding_rows``."""
    for module, (key, value) in sorted(token_rows.items()):
        path = ctx.owners.where(key, module, "weight")
        indices = _token_indices(ctx.body, module, len(token_rows))
        table = tuple(ctx.flat[path].shape)
        if indices is None:
            raise ValueError(f"jlora.peft.load: {ctx.weights} holds {key!r} but {CONFIG_NAME}'s "
                             f"trainable_token_indices ({ctx.body.get('trainable_token_indices')!r}) names no "
                             f"indices for {module!r}; fix: add the module's indices to trainable_token_indices, or "
                             "save the adapter again")
        if value.shape != (len(indices),) + table[1:]:
            raise ValueError(f"jlora.peft.load: {key!r} has shape {value.shape}; expected "
                             f"{(len(indices),) + table[1:]} ({len(indices)} trainable_token_indices of the table "
                             f"{path!r} of shape {table}); fix: check the key_map and the base model (its vocabulary)")
        into.out[path + "/rows"] = jnp.asarray(value, dtype=ctx.flat[path].dtype)
        into.embedding_rows[re.escape(path)] = tuple(int(i) for i in indices)


def _square_kernel(path: str, value: np.ndarray, shape: tuple[int, ...]) -> bool:
    return path.rsplit("/", 1)[-1] == "kernel" and value.ndim == 2 and len(shape) == 2 and shape[0] == shape[1]


def _whole_fan_in_fan_out(path: str, ctx: ReadContext, fan_in_fan_out: str | Sequence[str] | None) -> bool | None:
    """Whether the torch module of a whole weight stores ``(in, out)``; None: unknown (the adapter says
    ``fan_in_fan_out`` without saying where)."""
    if fan_in_fan_out is None:
        return None if ctx.body.get("fan_in_fan_out") else False
    return paths.matches((fan_in_fan_out,) if isinstance(fan_in_fan_out, str) else tuple(fan_in_fan_out), path)


def convert_whole(found: Classified, ctx: ReadContext, fan_in_fan_out: str | Sequence[str] | None,
                  into: Converted) -> None:
    """Weights saved whole (``modules_to_save``, ``bias``) as trained-whole leaves in the params layout."""
    for (module, param), (key, value) in sorted(found.whole.items()):
        path = ctx.owners.where(key, module, param)
        leaf = ctx.flat[path]
        shape = tuple(leaf.shape)
        if module in found.factors and param != "bias":  # PEFT also saves a targeted embedding's base weight
            if isinstance(leaf, (np.ndarray, jax.Array)) and not np.array_equal(np.asarray(leaf), value):
                raise ValueError(
                    f"jlora.peft.load: {key!r} changes the base weight of the adapted {path!r} (a resized "
                    "vocabulary?); jlora cannot both adapt and replace one leaf; fix: load those base weights "
                    "into params first"
                )
            continue
        if value.dtype.kind != "f":
            raise ValueError(f"jlora.peft.load: {key!r} has dtype {value.dtype}, expected a float tensor; fix: "
                             "re-save the adapter from a float PEFT model")
        ffo = _whole_fan_in_fan_out(path, ctx, fan_in_fan_out)
        known = ctx.known.get(path)
        order = ctx.kernel_order if known is None else {"io": "in_out", "oi": "out_in"}.get(known.roles, "")
        if order is None and _square_kernel(path, value, shape):
            raise ValueError(
                f"jlora.peft.load: {key!r} is the square weight {tuple(value.shape)} of a module saved whole; whether "
                f"{path!r} is stored (in, out) or (out, in) is known neither from the key map nor from layouts=. "
                f"Fix: layouts={{{path!r}: jlora.Layout({shape}, 'io')}} ('oi' for (out, in)), or a key map that "
                "states the order: jlora.peft.PortKeyMap(pairs, kernels='in_out' or 'out_in')"
            )
        if order == "out_in" and ffo is not None:
            ffo = not ffo  # the leaf is stored as torch's nn.Linear stores it: no transpose
        into.out[path] = jnp.asarray(whole_from_torch(path, key, value, shape, ffo), dtype=leaf.dtype)
        into.trainable.append(path)


# --- build the config ------------------------------------------------------------------------------

def build_config(body: Mapping[str, Any], got: Converted) -> LoraConfig:
    """The :class:`~jlora.LoraConfig` that reproduces the adapter: PEFT's patterns resolved per kernel."""
    rank, alpha = int(body["r"]), float(body["lora_alpha"])
    by_value = lambda d, default: _group({p: v for p, v in d.items() if v != default})  # noqa: E731
    return LoraConfig(
        rank=rank,
        alpha=alpha,
        targets=tuple(re.escape(p) for p in sorted(got.ranks)),
        rank_pattern=by_value(got.ranks, rank),
        alpha_pattern=by_value(got.alphas, alpha),
        rslora=bool(body.get("use_rslora", False)),
        dropout=float(body.get("lora_dropout") or 0.0),
        init="gaussian" if body.get("init_lora_weights") == "gaussian" else "kaiming",
        trainable=tuple(re.escape(p) for p in got.trainable),
        axes=_group(got.axes),
        use_dora=bool(body.get("use_dora", False)),
        embedding_rows=tuple(got.embedding_rows.items()),
    )
