"""The steps of :func:`jlora.peft.save`: collect the lora tree's leaves, resolve each kernel's layout,
convert them to PEFT tensors, write ``adapter_config.json`` and ``adapter_model.safetensors``.

Each step is one function; :func:`jlora.peft.save` runs them in that order. A kernel's axis roles come
from its :class:`~jlora.layout.Layout` (the ``LoraKernel`` nodes of :func:`jlora.init`); a plain-dict
node has none and is read ``(in..., out...)`` by :func:`jlora.core.layout.layout_without_trace`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jlora.core import paths
from jlora.core._config import LoraConfig
from jlora.core.layout import Layout, layout_without_trace
from jlora.io import _peft_experts as peft_experts
from jlora.io._peft_keys import CONFIG_NAME, PREFIX, WEIGHTS_NAME, _check_exportable, _number, _place, _torch_param
from jlora.io._peft_layout import factors_to_torch, whole_to_torch


def check_arguments(lora: Any, config: Any) -> None:
    """Refuses a config or lora tree that is not jlora's, and a config PEFT cannot express."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"jlora.peft.save: config must be a jlora.LoraConfig, got {type(config).__name__}; fix: pass "
                        "the config the lora tree was made with (jlora.restore_adapter returns it too)")
    if not isinstance(lora, Mapping):
        raise TypeError(f"jlora.peft.save: lora must be the nested-dict lora tree, got {type(lora).__name__}; fix: "
                        "pass the lora tree from jlora.init (or jlora.restore_adapter)")
    _check_exportable(config)


def refuse_existing(out_dir: Path, overwrite: bool) -> None:
    """Refuses to replace an adapter already in ``out_dir`` unless ``overwrite``."""
    existing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if (out_dir / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"jlora.peft.save: {out_dir} already holds an adapter ({', '.join(existing)}); fix: pass "
            "overwrite=True to replace it, or choose another directory/adapter_name"
        )


def placer(fn: Callable[[str], str | None]) -> Callable[[str], str]:
    """jlora path -> torch module name through the key map; a path it cannot place is refused."""
    def place(path: str) -> str:
        name = _place(fn, path)
        if name is None:
            raise ValueError(
                f"jlora.peft.save: key_map cannot place lora path {path!r} (it returned None / no regex "
                "matched); fix: add a (regex, module name) pair for it to key_map"
            )
        return name
    return place


# --- collect -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Collected:
    """The lora tree's leaves by role: factor pairs, trained-whole leaves, trained embedding rows."""

    pairs: dict[str, tuple[Any, Any, Any]] = dataclasses.field(default_factory=dict)  # path -> (A, B, m or None)
    whole: dict[str, Any] = dataclasses.field(default_factory=dict)
    rows: dict[str, Any] = dataclasses.field(default_factory=dict)


def collect(lora: Mapping[str, Any]) -> Collected:
    """Walks the lora tree: ``{"A", "B"(, "m")}`` nodes are factor pairs, ``rows`` leaves trained rows,
    every other leaf trained whole.

    >>> c = collect({"d": {"kernel": {"A": 1, "B": 2}, "bias": 3}})
    >>> c.pairs, c.whole
    ({'d/kernel': (1, 2, None)}, {'d/bias': 3})
    """
    out = Collected()

    def walk(tree: Any, prefix: str) -> None:
        if not isinstance(tree, Mapping):
            out.whole[prefix] = tree
        elif "rows" in tree and not isinstance(tree["rows"], Mapping):
            out.rows[prefix] = tree["rows"]
            rest = {k: v for k, v in tree.items() if k != "rows"}
            if rest:
                walk(rest, prefix)
        elif set(tree) in ({"A", "B"}, {"A", "B", "m"}) and not isinstance(tree["A"], Mapping):
            out.pairs[prefix] = (tree["A"], tree["B"], tree.get("m"))
        else:
            for key, value in tree.items():
                walk(value, f"{prefix}/{key}" if prefix else str(key))

    walk(lora, "")
    return out


# --- resolve layouts -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Factors:
    """One adapted kernel's factors (NumPy), its layout and PEFT's rank for it."""

    path: str
    A: np.ndarray
    B: np.ndarray
    m: np.ndarray | None
    layout: Layout
    rank: int


def plain_dict_layout(path: str, A: np.ndarray, B: np.ndarray, conv: tuple[str, ...]) -> Layout:
    """The layout of a plain-dict node (no ``Layout``): stored ``in + out``, a conv if ``conv`` names it."""
    if A.ndim < 2 or B.ndim < 2 or B.shape[0] != A.shape[-1]:
        raise ValueError(
            f"jlora.peft.save: lora factors of {path!r}: A {A.shape} and B {B.shape} are not a rank-r pair "
            "(expected A = in... + (r,), B = (r,) + out...); fix: save the lora tree jlora.init made"
        )
    shape = A.shape[:-1] + B.shape[1:]
    if paths.matches(conv, path):
        return Layout.plain(shape, 0, A.ndim - 1, "conv")
    return layout_without_trace(path, shape, 0, A.ndim - 1)


def resolve(path: str, pair: tuple[Any, Any, Any], layout: Layout | None, config: LoraConfig,
            conv: tuple[str, ...]) -> Factors:
    """Checks one kernel against ``config`` (DoRA, fused, stacked, rank) and resolves its layout."""
    A, B, m = pair
    if (m is not None) != config.use_dora:
        raise ValueError(
            f"jlora.peft.save: {path!r}: config.use_dora is {config.use_dora} but the lora tree "
            f"{'has' if m is not None else 'has no'} DoRA magnitude 'm' there; fix: pass the config the lora "
            "tree was made with"
        )
    if config.fused_for(path) is not None:
        raise ValueError(
            f"jlora.peft.save: {path!r} is a fused partial kernel (LoraConfig.fused); PEFT has no such "
            "layer; fix: split the fused kernel into separate modules before exporting"
        )
    if config.stack_for(path):
        raise ValueError(
            f"jlora.peft.save: {path!r} is a stacked (nn.scan) kernel; PEFT stores one module per layer; "
            "fix: unstack the layer axis into per-layer paths before exporting"
        )
    A, B = np.asarray(A), np.asarray(B)
    if layout is None:
        layout = plain_dict_layout(path, A, B, conv)
    r = A.shape[-1] * layout.feature_groups  # PEFT's rank: the total over a grouped conv's groups
    if r != config.rank_for(path):
        raise ValueError(
            f"jlora.peft.save: {path!r} has rank {r} (A {A.shape}) but config.rank_for gives "
            f"{config.rank_for(path)}; fix: pass the config the lora tree was made with"
        )
    return Factors(path, A, B, None if m is None else np.asarray(m), layout, r)


# --- convert -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Converted:
    """The PEFT tensors and the config entries they need, filled step by step."""

    tensors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    modules: dict[str, str] = dataclasses.field(default_factory=dict)  # LoRA module -> jlora kernel path
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, int | float] = dataclasses.field(default_factory=dict)
    target_parameters: list[str] = dataclasses.field(default_factory=list)
    token_indices: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    modules_to_save: list[str] = dataclasses.field(default_factory=list)
    bias: str = "none"


def convert_kernels(kernels: Sequence[Factors], place: Callable[[str], str], config: LoraConfig,
                    param_order: Sequence[str], into: Converted) -> None:
    """LoRA factors as PEFT tensors: one module each, expert kernels as ``target_parameters``."""
    experts: dict[str, tuple[Any, Any, Layout]] = {}
    for k in kernels:
        if peft_experts.is_expert(k.layout):  # one (E, ., .) parameter: PEFT target_parameters
            experts[k.path] = (k.A, k.B, k.layout)
            continue
        module = place(k.path)
        if module in into.modules:
            raise ValueError(f"jlora.peft.save: key_map sends both {into.modules[module]!r} and {k.path!r} to "
                             f"{module!r}; fix: make the key_map give each kernel its own torch module")
        into.modules[module] = k.path
        for suffix, tensor in factors_to_torch(k.path, k.A, k.B, k.m, k.layout).items():
            into.tensors[f"{PREFIX}{module}.{suffix}"] = tensor
        if k.rank != config.rank:
            into.rank_pattern[re.escape(module)] = int(k.rank)
        if config.alpha_for(k.path) != config.alpha:
            into.alpha_pattern[re.escape(module)] = _number(config.alpha_for(k.path))
    tensors, into.target_parameters, ranks, alphas = peft_experts.export(experts, place, config, param_order)
    into.tensors.update(tensors)
    into.rank_pattern.update(ranks)
    into.alpha_pattern.update(alphas)


def convert_rows(rows: Mapping[str, Any], place: Callable[[str], str], config: LoraConfig, into: Converted) -> None:
    """Trained embedding rows as PEFT's ``trainable_token_indices`` deltas."""
    for path, value in sorted(rows.items()):
        indices = config.rows_for(path)
        if indices is None:
            raise ValueError(f"jlora.peft.save: lora leaf {path + '/rows'!r} has no LoraConfig.embedding_rows "
                             "rule; fix: pass the config the lora tree was made with")
        module = place(path)
        into.token_indices[module] = [int(i) for i in indices]
        into.tensors[f"{PREFIX}{module}.token_adapter.trainable_tokens_delta"] = np.asarray(value)


def _whole_modules(whole: dict[str, Any], place: Callable[[str], str], params: Any, into: Converted
                   ) -> tuple[dict[str, list[str]], list[str]]:
    """Trained-whole leaves by torch module: ``modules_to_save`` (with the frozen bias from ``params``
    added to ``whole``, as PEFT saves every parameter of such a module) and the bias-only modules."""
    by_module: dict[str, list[str]] = {}
    for path in sorted(whole):
        by_module.setdefault(place(path), []).append(path)
    bias_modules = []
    for module, leaf_paths in by_module.items():
        if all(_torch_param(p) == "bias" for p in leaf_paths):
            bias_modules.append(module)
            continue
        if module in into.modules:
            raise ValueError(
                f"jlora.peft.save: module {module!r} is both LoRA-adapted ({into.modules[module]!r}) and trained whole "
                f"({leaf_paths}); PEFT cannot express both; fix: drop one of them"
            )
        into.modules_to_save.append(module)
        kernel = next((p for p in leaf_paths if _torch_param(p) == "weight"), None)
        bias_path = kernel.rsplit("/", 1)[0] + "/bias" if kernel is not None else None
        if "bias" not in {_torch_param(p) for p in leaf_paths} and bias_path is not None:
            base = paths.flatten(params) if params is not None else {}
            if bias_path in base:
                whole[bias_path] = base[bias_path]
                leaf_paths.append(bias_path)
            elif params is None:
                raise ValueError(
                    f"jlora.peft.save: {kernel!r} is trained whole (module {module!r}, PEFT modules_to_save) without "
                    "its bias; PEFT saves and loads every parameter of such a module, so the file would lack "
                    f"'{module}.bias'. Fix: pass params=<the base parameters> (the frozen bias is written), or train "
                    "the bias too (LoraConfig.trainable)"
                )
    return by_module, bias_modules


def convert_whole(whole: Mapping[str, Any], place: Callable[[str], str], params: Any, conv: tuple[str, ...],
                  fan_in_fan_out: tuple[str, ...], into: Converted) -> None:
    """Trained-whole leaves as PEFT's ``modules_to_save`` weights and ``bias``, in PyTorch's layout."""
    whole = dict(whole)
    by_module, bias_modules = _whole_modules(whole, place, params, into)
    for module, leaf_paths in by_module.items():
        for path in leaf_paths:
            param = _torch_param(path)
            value = whole_to_torch(path, np.asarray(whole[path]), param, paths.matches(conv, path),
                                   paths.matches(fan_in_fan_out, path))
            inner = ".base_layer" if module in into.modules else ""
            into.tensors[f"{PREFIX}{module}{inner}.{param}"] = value
    if bias_modules:
        into.bias = "lora_only" if all(m in into.modules for m in bias_modules) else "all"


# --- write ---------------------------------------------------------------------------------------

def config_body(config: LoraConfig, got: Converted, fan_in_fan_out: tuple[str, ...], task_type: str | None,
                base_model_name_or_path: str | None) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for the converted adapter."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(config.rank),
        "lora_alpha": _number(config.alpha),
        "lora_dropout": float(config.dropout),
        "use_rslora": bool(config.rslora),
        "target_modules": sorted(got.modules),
        "target_parameters": got.target_parameters or None,
        "exclude_modules": None,
        "rank_pattern": got.rank_pattern,
        "alpha_pattern": got.alpha_pattern,
        "bias": got.bias,
        "modules_to_save": sorted(got.modules_to_save) or None,
        "fan_in_fan_out": any(paths.matches(fan_in_fan_out, p) for p in got.modules.values()),
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": bool(config.use_dora),
        "trainable_token_indices": got.token_indices or None,
        "lora_bias": False,
    }


def write_files(out_dir: Path, tensors: Mapping[str, np.ndarray], body: Mapping[str, Any]) -> None:
    """Writes the weights and the config into ``out_dir`` (created if needed), each file atomically."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    contiguous = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    _atomic_write(out_dir / WEIGHTS_NAME, lambda p: save_file(contiguous, p, metadata={"format": "pt"}))
    _atomic_write(out_dir / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(body, indent=2, sort_keys=True)))


def _atomic_write(target: Path, write: Callable[[str], Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
