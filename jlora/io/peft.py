"""PEFT interop: read and write ``adapter_config.json`` + ``adapter_model.safetensors``.

Key maps, module names and PEFT's matching/config rules live in :mod:`jlora.io._peft_keys` (re-exported
here: ``module_name``, ``LLAMA_KEY_MAP``, ``BERT_KEY_MAP``, ``KeyMap``); this module converts tensor
layouts and does the file I/O.

Layouts (PyTorch on the left, jlora on the right)::

    Linear     lora_A.weight (r, in)           A (in..., r)     multi-axis kernels flattened, C order
               lora_B.weight (out, r)          B (r, out...)
    Embedding  lora_embedding_A (r, vocab)     A (vocab, r)
               lora_embedding_B (d, r)         B (r, d)
    Conv       lora_A.weight (r, cin, k...)    A (k..., cin, r)  a conv to r channels
               lora_B.weight (cout, r, 1...)   B (r, cout)       a 1x1 conv
    Experts    lora_A.weight (E·r, in)         A (E, in, r)      PEFT target_parameters (one (E, ., .)
               lora_B.weight (out, r·E)        B (E, r, out)     parameter; see jlora.io._peft_experts)

Whole trained leaves (jlora's ``trainable``) become PEFT's ``modules_to_save`` (weights of a whole
module) and ``bias`` (``'lora_only'`` or ``'all'``). Only safetensors is read or written; a
pickled ``adapter_model.bin`` is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.trace import _analysis as analysis
from jlora.core import paths
from jlora.io import _peft_experts as peft_experts
from jlora.core._config import LoraConfig
from jlora.core._describe import kernel_layouts, nest
from jlora.core.layout import Layout
from jlora.io._peft_layout import (factors_from_torch, factors_to_torch, untraced_layout, whole_from_torch,
                               whole_to_torch)
from jlora.io._peft_keys import (BERT_KEY_MAP, CONFIG_NAME, GPT2_FAN_IN_FAN_OUT, GPT2_KEY_MAP, LLAMA_KEY_MAP, PICKLED_NAMES,
                             PREFIX, WEIGHTS_NAME, KeyMap, PortKeyMap, _check_exportable, _group, _mapper, _number,
                             _peft_targets, _pattern_key, _place, _read_config, _token_indices, _torch_param,
                             module_name, stated_kernels)

__all__ = ["save", "load", "module_name", "KeyMap", "PortKeyMap", "LLAMA_KEY_MAP", "BERT_KEY_MAP", "GPT2_KEY_MAP",
           "GPT2_FAN_IN_FAN_OUT"]


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------

def _walk(tree: Any, prefix: str, pairs: dict[str, tuple[Any, Any, Any]], whole: dict[str, Any],
          rows: dict[str, Any]) -> None:
    if not isinstance(tree, Mapping):
        whole[prefix] = tree
    elif "rows" in tree and not isinstance(tree["rows"], Mapping):
        rows[prefix] = tree["rows"]
        rest = {k: v for k, v in tree.items() if k != "rows"}
        if rest:
            _walk(rest, prefix, pairs, whole, rows)
    elif set(tree) in ({"A", "B"}, {"A", "B", "m"}) and not isinstance(tree["A"], Mapping):
        pairs[prefix] = (tree["A"], tree["B"], tree.get("m"))
    else:
        for key, value in tree.items():
            _walk(value, f"{prefix}/{key}" if prefix else str(key), pairs, whole, rows)


def _square_kernel(path: str, value: np.ndarray, shape: tuple[int, ...]) -> bool:
    return path.rsplit("/", 1)[-1] == "kernel" and value.ndim == 2 and len(shape) == 2 and shape[0] == shape[1]


def _module_of(name: str) -> str:
    """The torch module name of an adapter tensor key (after PEFT's prefix).

    >>> _module_of("pooler.dense.lora_A.weight"), _module_of("classifier.modules_to_save.default.bias")
    ('pooler.dense', 'classifier')
    """
    m = re.fullmatch(r"(.+?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|token_adapter)"
                     r"(\..*)?", name)
    if m:
        return m.group(1)
    module = name.rpartition(".")[0].removesuffix(".base_layer")
    return re.sub(r"\.modules_to_save(\.[^.]+)?$", "", module)


def _adapter_dir(directory: str | os.PathLike[str], adapter_name: str | None) -> Path:
    root = Path(directory)
    if adapter_name is None or adapter_name == "default":
        return root
    if not isinstance(adapter_name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", adapter_name) or adapter_name in (
            ".", ".."):
        raise ValueError(
            f"adapter_name: expected a plain folder name (letters, digits, '_', '-', '.'), got {adapter_name!r}; "
            "fix: a name such as 'sql' (PEFT writes a named adapter to directory/adapter_name)"
        )
    return root / adapter_name


def save(directory: str | os.PathLike[str], lora: Mapping[str, Any], config: LoraConfig, key_map: KeyMap, *,
         adapter_name: str | None = None, overwrite: bool = False, conv: str | Sequence[str] = (),
         fan_in_fan_out: str | Sequence[str] = (), params: Any = None,
         base_model_name_or_path: str | None = None, task_type: str | None = None,
         param_order: Sequence[str] = peft_experts.PARAM_ORDER) -> Path:
    """Writes a jlora adapter as a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``peft.PeftModel.from_pretrained(model, directory)`` then loads it onto the equivalent
    ``transformers`` model (``subfolder=adapter_name, adapter_name=adapter_name`` for a named one).

    Args:
      directory: the output folder (created if needed). Nothing is written outside it.
      lora: the lora tree (nested dicts: ``{"A": (in..., r), "B": (r, out...)}`` per adapted kernel,
        whole arrays for trained leaves).
      config: the :class:`jlora.LoraConfig` the tree was made with.
      key_map: jlora leaf path -> torch module name (callable or ``(regex, replacement)`` pairs).
      adapter_name: write into ``directory/adapter_name`` as PEFT does for a non-default adapter.
      overwrite: replace an existing adapter in the target folder (refused otherwise).
      conv: regexes of plain-dict kernel paths that are convolutions (``(k..., cin, cout)``); a
        multi-axis kernel is otherwise a dense map flattened to ``nn.Linear``. Not needed for trees
        from :func:`jlora.init` (their layout says it).
      fan_in_fan_out: regexes of kernel paths whose torch module stores its weight ``(in, out)``
        (GPT-2's ``Conv1D``: :data:`GPT2_FAN_IN_FAN_OUT`): PEFT's ``fan_in_fan_out`` is written for
        them and their trained-whole weights are not transposed.
      params: the base parameters: a module saved whole (``modules_to_save``) whose bias was not
        trained takes it from here (PEFT saves every parameter of such a module).
      base_model_name_or_path: recorded in the config (PEFT uses it only when no model is passed).
      task_type: PEFT task type (e.g. ``'CAUSAL_LM'``), or None for a plain ``PeftModel``.
      param_order: expert kernels (a stack axis, e.g. ``(E, in, out)``) are written as PEFT
        ``target_parameters`` (key_map gives the torch parameter name); this is the torch module's
        order of its expert parameters (:mod:`jlora.io._peft_experts`).

    Returns:
      The folder holding the two files.

    >>> import tempfile, jax.numpy as jnp
    >>> lora = {"params": {"lm_head": {"kernel": {"A": jnp.ones((4, 2)), "B": jnp.ones((2, 3))}}}}
    >>> out = save(tempfile.mkdtemp(), lora, LoraConfig(rank=2, targets=".*"), LLAMA_KEY_MAP)
    >>> sorted(p.name for p in out.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    from safetensors.numpy import save_file

    if not isinstance(config, LoraConfig):
        raise TypeError(f"jlora.peft.save: config must be a jlora.LoraConfig, got {type(config).__name__}; fix: pass "
                        "the config the lora tree was made with (jlora.restore_adapter returns it too)")
    if not isinstance(lora, Mapping):
        raise TypeError(f"jlora.peft.save: lora must be the nested-dict lora tree, got {type(lora).__name__}; fix: "
                        "pass the lora tree from jlora.init (or jlora.restore_adapter)")
    _check_exportable(config)
    fn = _mapper(key_map)
    conv = (conv,) if isinstance(conv, str) else tuple(conv)
    fan_in_fan_out = (fan_in_fan_out,) if isinstance(fan_in_fan_out, str) else tuple(fan_in_fan_out)
    out_dir = _adapter_dir(directory, adapter_name)
    existing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if (out_dir / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"jlora.peft.save: {out_dir} already holds an adapter ({', '.join(existing)}); fix: pass "
            "overwrite=True to replace it, or choose another directory/adapter_name"
        )

    pairs: dict[str, tuple[Any, Any, Any]] = {}
    whole: dict[str, Any] = {}
    rows: dict[str, Any] = {}
    _walk(lora, "", pairs, whole, rows)
    layouts = kernel_layouts(lora)
    tensors: dict[str, np.ndarray] = {}
    modules: dict[str, str] = {}  # module -> jlora kernel path
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, int | float] = {}
    experts: dict[str, tuple[Any, Any, Layout]] = {}

    def place(path: str) -> str:
        name = _place(fn, path)
        if name is None:
            raise ValueError(
                f"jlora.peft.save: key_map cannot place lora path {path!r} (it returned None / no regex "
                "matched); fix: add a (regex, module name) pair for it to key_map"
            )
        return name

    for path, (A, B, m) in sorted(pairs.items()):
        if (m is not None) != config.use_dora:
            raise ValueError(
                f"jlora.peft.save: {path!r}: config.use_dora is {config.use_dora} but the lora tree "
                f"{'has' if m is not None else 'has no'} DoRA magnitude 'm' there; fix: pass the config the lora "
                "tree was made with"
            )
        if config.groups_for(path) is not None:
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
        layout = layouts.get(path)
        if layout is None:  # a plain dict node: stored in + out; conv= names the (k..., cin, cout) kernels
            if A.ndim < 2 or B.ndim < 2 or B.shape[0] != A.shape[-1]:
                raise ValueError(
                    f"jlora.peft.save: lora factors of {path!r}: A {A.shape} and B {B.shape} are not a rank-r pair "
                    "(expected A = in... + (r,), B = (r,) + out...); fix: save the lora tree jlora.init made"
                )
            shape = A.shape[:-1] + B.shape[1:]
            kind = "conv" if paths.matches(conv, path) else "embed" if path.endswith("/embedding") else "dense"
            layout = Layout.plain(shape, 0, A.ndim - 1, kind)
        r = A.shape[-1] * layout.groups  # PEFT's rank: the total over a grouped conv's groups
        if r != config.rank_for(path):
            raise ValueError(
                f"jlora.peft.save: {path!r} has rank {r} (A {A.shape}) but config.rank_for gives "
                f"{config.rank_for(path)}; fix: pass the config the lora tree was made with"
            )
        if peft_experts.is_expert(layout):  # one (E, ., .) parameter: PEFT target_parameters
            experts[path] = (A, B, layout)
            continue
        module = place(path)
        if module in modules:
            raise ValueError(f"jlora.peft.save: key_map sends both {modules[module]!r} and {path!r} to {module!r}; "
                             "fix: make the key_map give each kernel its own torch module")
        modules[module] = path
        key = PREFIX + module
        for suffix, tensor in factors_to_torch(path, A, B, None if m is None else np.asarray(m), layout).items():
            tensors[f"{key}.{suffix}"] = tensor
        if r != config.rank:
            rank_pattern[re.escape(module)] = int(r)
        if config.alpha_for(path) != config.alpha:
            alpha_pattern[re.escape(module)] = _number(config.alpha_for(path))

    expert_tensors, target_parameters, expert_ranks, expert_alphas = peft_experts.export(experts, place, config,
                                                                                         param_order)
    tensors.update(expert_tensors)
    rank_pattern.update(expert_ranks)
    alpha_pattern.update(expert_alphas)

    token_indices: dict[str, list[int]] = {}
    for path, value in sorted(rows.items()):
        indices = config.rows_for(path)
        if indices is None:
            raise ValueError(f"jlora.peft.save: lora leaf {path + '/rows'!r} has no LoraConfig.embedding_rows "
                             "rule; fix: pass the config the lora tree was made with")
        module = place(path)
        token_indices[module] = [int(i) for i in indices]
        tensors[f"{PREFIX}{module}.token_adapter.trainable_tokens_delta"] = np.asarray(value)

    whole_by_module: dict[str, list[str]] = {}
    for path in sorted(whole):
        whole_by_module.setdefault(place(path), []).append(path)
    modules_to_save, bias_modules = [], []
    for module, leaf_paths in whole_by_module.items():
        if all(_torch_param(p) == "bias" for p in leaf_paths):
            bias_modules.append(module)
            continue
        if module in modules:
            raise ValueError(
                f"jlora.peft.save: module {module!r} is both LoRA-adapted ({modules[module]!r}) and trained whole "
                f"({leaf_paths}); PEFT cannot express both; fix: drop one of them"
            )
        modules_to_save.append(module)
        have = {_torch_param(p) for p in leaf_paths}
        kernel = next((p for p in leaf_paths if _torch_param(p) == "weight"), None)
        bias_path = kernel.rsplit("/", 1)[0] + "/bias" if kernel is not None else None
        if "bias" not in have and bias_path is not None:
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
    for module, leaf_paths in whole_by_module.items():
        for path in leaf_paths:
            param = _torch_param(path)
            value = whole_to_torch(path, np.asarray(whole[path]), param, paths.matches(conv, path),
                                   paths.matches(fan_in_fan_out, path))
            inner = ".base_layer" if module in modules else ""
            tensors[f"{PREFIX}{module}{inner}.{param}"] = value
    bias = "none"
    if bias_modules:
        bias = "lora_only" if all(m in modules for m in bias_modules) else "all"

    body = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(config.rank),
        "lora_alpha": _number(config.alpha),
        "lora_dropout": float(config.dropout),
        "use_rslora": bool(config.rslora),
        "target_modules": sorted(modules),
        "target_parameters": target_parameters or None,
        "exclude_modules": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": bias,
        "modules_to_save": sorted(modules_to_save) or None,
        "fan_in_fan_out": any(paths.matches(fan_in_fan_out, p) for p in modules.values()),
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": bool(config.use_dora),
        "trainable_token_indices": token_indices or None,
        "lora_bias": False,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    contiguous = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    _atomic_write(out_dir / WEIGHTS_NAME, lambda p: save_file(contiguous, p, metadata={"format": "pt"}))
    _atomic_write(out_dir / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(body, indent=2, sort_keys=True)))
    return out_dir


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


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------

def load(directory: str | os.PathLike[str], params: Any, key_map: KeyMap, *,
         adapter_name: str | None = None, apply_fn: Callable[..., Any] | None = None, args: Sequence[Any] = (),
         layouts: Mapping[str, Layout] | None = None, ignore: str | Sequence[str] = (),
         fan_in_fan_out: str | Sequence[str] | None = None,
         param_order: Sequence[str] = peft_experts.PARAM_ORDER) -> tuple[dict[str, Any], LoraConfig]:
    """Reads a PEFT LoRA adapter into a jlora ``(lora, config)`` pair for ``params``.

    Args:
      directory: the folder PEFT's ``save_pretrained`` wrote (``adapter_config.json`` and
        ``adapter_model.safetensors``; pickled ``.bin`` files are refused, never unpickled).
      params: the base parameter tree (arrays or ``jax.ShapeDtypeStruct``s); its paths, through
        ``key_map``, tell where each torch module lives.
      key_map: jlora leaf path -> torch module name (callable or ``(regex, replacement)`` pairs).
      adapter_name: read ``directory/adapter_name`` (PEFT's folder for a non-default adapter).
      apply_fn, args: the model's apply function and example inputs: the axis roles of each adapted
        kernel are read from the trace (needed for kernels not stored ``(in..., out...)``, e.g. an
        ``(out, in)`` PyTorch-style or Gemma einsum kernel, and for OIHW or grouped convs).
      layouts: ``{path: Layout}`` given directly instead (e.g. ``jlora.kernel_layouts(lora)``).
        Without a trace or a layout, a :class:`PortKeyMap` states the order of the kernels (the Flax
        ports' maps do: ``(in, out)``); with none of the three, the sizes decide, and a kernel they do
        not tell apart (a square one: ``(in, out)`` and ``(out, in)`` both fit) is refused.
      ignore: regexes of torch module names whose adapter tensors are skipped on purpose (a module the
        Flax model does not have, e.g. BERT's ``pooler.dense`` matched by a ``dense`` target).
      fan_in_fan_out: regexes of kernel paths whose torch module stores ``(in, out)`` (GPT-2's
        ``Conv1D``: :data:`GPT2_FAN_IN_FAN_OUT`); their weights saved whole are not transposed.
        Default: inferred from shapes, and a square one is refused when the adapter says
        ``fan_in_fan_out``.
      param_order: for ``target_parameters`` (expert kernels): the torch module's order of its
        expert parameters (:mod:`jlora.io._peft_experts`).

    Returns:
      ``(lora, config)``: the lora tree (nested dicts of ``jax.Array``) and a
      :class:`jlora.LoraConfig` whose targets, ranks, alphas (PEFT's ``rank_pattern`` and
      ``alpha_pattern`` resolved per module), ``rslora``, dropout and ``trainable`` leaves
      (``modules_to_save`` and ``bias``) reproduce the adapter; use with :func:`jlora.merge` or
      :func:`jlora.lora_apply`.

    >>> import tempfile, jax.numpy as jnp
    >>> params = {"params": {"lm_head": {"kernel": jnp.zeros((4, 3))}}}
    >>> lora = {"params": {"lm_head": {"kernel": {"A": jnp.ones((4, 2)), "B": jnp.ones((2, 3))}}}}
    >>> d = save(tempfile.mkdtemp(), lora, LoraConfig(rank=2, alpha=4, targets=".*"), LLAMA_KEY_MAP)
    >>> back, cfg = load(d, params, LLAMA_KEY_MAP)
    >>> back["params"]["lm_head"]["kernel"]["A"].shape, cfg.scale_for("params/lm_head/kernel")
    ((4, 2), 2.0)
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    fn = _mapper(key_map)
    kernels = stated_kernels(key_map)
    ignore_rules = (ignore,) if isinstance(ignore, str) else tuple(ignore)
    src = _adapter_dir(directory, adapter_name)
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

    flat = paths.flatten(params)
    owner: dict[tuple[str, str], str] = {}  # (module, torch param) -> jlora path
    for path in flat:
        module = _place(fn, path)
        if module is None:
            continue
        key = (module, _torch_param(path))
        if key in owner:
            raise ValueError(f"jlora.peft.load: key_map sends both {owner[key]!r} and {path!r} to {'.'.join(key)}; "
                             "fix: make the key_map give each params leaf its own torch module")
        owner[key] = path
    known_modules = sorted({m for m, _ in owner})

    def where(key: str, module: str, param: str) -> str:
        path = owner.get((module, param))
        if path is None:
            near = ", ".join(paths.closest(module, known_modules, 3))
            raise ValueError(
                f"jlora.peft.load: adapter key {key!r}: key_map places no params leaf at torch module {module!r} "
                f"(parameter {param!r}); closest modules the map produces: {near}. Fix: extend key_map if the "
                f"model has that module, or pass ignore=[{re.escape(module)!r}] to skip a module the Flax model "
                "does not have (e.g. BERT's pooler)"
            )
        return path

    experts = peft_experts.read(tensors, body, params, lambda p: _place(fn, p), layouts=layouts, apply_fn=apply_fn,
                                args=args, param_order=param_order)  # pops the target_parameters tensors
    factors: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    full: dict[tuple[str, str], tuple[str, np.ndarray]] = {}
    token_rows: dict[str, tuple[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"jlora.peft.load: {weights}: key {key!r} does not start with {PREFIX!r}; not a PEFT file")
        name = key[len(PREFIX):]
        if ignore_rules and paths.matches(ignore_rules, _module_of(name)):
            continue  # a module the caller skips on purpose
        m = re.fullmatch(r"(.+)\.token_adapter\.trainable_tokens_delta", name)
        if m:
            token_rows[m.group(1)] = (key, value)
            continue
        m = re.fullmatch(r"(.+)\.lora_magnitude_vector(?:\.weight)?", name)
        if m:
            factors.setdefault(m.group(1), {})["m"] = (key, value)
            continue
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
        if m:
            module = m.group(1) or m.group(3)
            part = (m.group(2) or m.group(4))[-1]
            factors.setdefault(module, {})[part] = (key, value)
            if m.group(4):
                factors[module]["embed"] = (key, value)
            continue
        if ".lora_" in name:
            raise ValueError(
                f"jlora.peft.load: {weights}: key {key!r} belongs to a LoRA variant jlora does not read yet; fix: "
                "merge the adapter in PEFT (merge_and_unload) and load the merged weights as params instead"
            )
        module, _, param = name.rpartition(".")
        module = module.removesuffix(".base_layer")
        module = re.sub(r"\.modules_to_save(\.[^.]+)?$", "", module)
        full[(module, param)] = (key, value)

    rank, alpha = int(body["r"]), float(body["lora_alpha"])
    use_dora = bool(body.get("use_dora", False))
    rank_pattern = body.get("rank_pattern") or {}
    alpha_pattern = body.get("alpha_pattern") or {}
    out: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    axes: dict[str, int] = {}
    used: dict[str, Layout] = {}
    known = dict(layouts or {})
    if apply_fn is not None:
        adapted_paths = [where(parts["A"][0], module, "weight") for module, parts in sorted(factors.items())
                         if "A" in parts]
        for p, lay in analysis.read_layouts(apply_fn, params, args, adapted_paths, list(flat)).items():
            if isinstance(lay, str) and p not in known:
                raise ValueError(f"jlora.peft.load: cannot tell the axis roles of {p!r}: the trace says {lay}; fix: "
                                 "pass layouts={path: jlora.Layout(shape, roles)} for it")
            known.setdefault(p, lay)
    for module, parts in sorted(factors.items()):
        if "A" not in parts or "B" not in parts:
            have = next(iter(parts.values()))[0]
            raise ValueError(f"jlora.peft.load: {weights}: {have!r} has no partner factor (need both A and B); fix: "
                             "save the adapter again (the file is incomplete)")
        key_a, tA = parts["A"]
        path = where(key_a, module, "weight")
        if not _peft_targets(body, module):
            raise ValueError(
                f"jlora.peft.load: {weights} holds factors for {module!r} ({path!r}) but {CONFIG_NAME} does not "
                "target it (target_modules / exclude_modules / layers_to_transform); PEFT would ignore them; fix: "
                "correct target_modules in the config, or save the adapter again from PEFT"
            )
        shape = tuple(flat[path].shape)
        tA, tB = parts["A"][1], parts["B"][1]
        bad = [k for k, t in parts.values() if t.dtype.kind != "f"]
        if bad:
            raise ValueError(f"jlora.peft.load: {bad[0]!r} has dtype {parts['A'][1].dtype if bad[0] == parts['A'][0] else 'int'}, "
                             "expected float LoRA factors; fix: re-save the adapter from a float PEFT model")
        layout = known.get(path)
        if layout is None:
            kind = "embed" if "embed" in parts else "conv" if tA.ndim > 2 else "dense"
            layout = untraced_layout(path, key_a, shape, tA.shape[-1] if tA.ndim == 2 else 0,
                                     tB.shape[0] if tB.ndim == 2 else 0, kind, kernels)
        elif layout.shape != shape:
            raise ValueError(f"jlora.peft.load: the layout given for {path!r} is for shape {layout.shape}, the "
                             f"params leaf has shape {shape}; fix: layouts=jlora.kernel_layouts(lora) of a lora tree "
                             "made on these params, or jlora.Layout(leaf.shape, roles)")
        if "embed" in parts and layout.kind != "embed":
            layout = Layout(layout.shape, layout.roles, layout.splits, "embed")
        A, B, m = factors_from_torch(path, layout, parts)
        used[path] = layout
        r = A.shape[-1] * layout.groups
        pattern = _pattern_key(rank_pattern, module)
        expect_r = rank_pattern[pattern] if pattern is not None else rank
        if r != expect_r:
            raise ValueError(
                f"jlora.peft.load: {key_a!r} has rank {r} but {CONFIG_NAME} gives module {module!r} rank {expect_r} "
                "(r / rank_pattern); the file and its config disagree; fix: save the adapter again from PEFT (or "
                "correct r / rank_pattern in the config)"
            )
        pattern = _pattern_key(alpha_pattern, module)
        alphas[path] = float(alpha_pattern[pattern]) if pattern is not None else alpha
        ranks[path] = r
        if layout.is_plain and len(shape) != 2 and layout.kind != "conv":
            axes[path] = layout.n_in
        out[path + "/A"] = jnp.asarray(A)
        out[path + "/B"] = jnp.asarray(B)
        if ("m" in parts) != use_dora:
            raise ValueError(
                f"jlora.peft.load: {weights}: module {module!r} {'has' if 'm' in parts else 'has no'} "
                f"lora_magnitude_vector but {CONFIG_NAME} has use_dora={use_dora}; the file and its config disagree; "
                "fix: save the adapter again from PEFT (or correct use_dora in the config)"
            )
        if m is not None:
            out[path + "/m"] = jnp.asarray(m)

    for path, (A, B, lay, r, a) in experts.items():
        out[path + "/A"], out[path + "/B"] = jnp.asarray(A), jnp.asarray(B)
        used[path], ranks[path], alphas[path] = lay, r, a

    embedding_rows: dict[str, tuple[int, ...]] = {}
    for module, (key, value) in sorted(token_rows.items()):
        path = where(key, module, "weight")
        indices = _token_indices(body, module, len(token_rows))
        table = tuple(flat[path].shape)
        if indices is None:
            raise ValueError(f"jlora.peft.load: {weights} holds {key!r} but {CONFIG_NAME}'s trainable_token_indices "
                             f"({body.get('trainable_token_indices')!r}) names no indices for {module!r}; fix: "
                             "add the module's indices to trainable_token_indices, or save the adapter again")
        if value.shape != (len(indices),) + table[1:]:
            raise ValueError(f"jlora.peft.load: {key!r} has shape {value.shape}; expected "
                             f"{(len(indices),) + table[1:]} ({len(indices)} trainable_token_indices of the table "
                             f"{path!r} of shape {table}); fix: check the key_map and the base model (its vocabulary)")
        out[path + "/rows"] = jnp.asarray(value, dtype=flat[path].dtype)
        embedding_rows[re.escape(path)] = tuple(int(i) for i in indices)

    trainable: list[str] = []
    for (module, param), (key, value) in sorted(full.items()):
        path = where(key, module, param)
        leaf = flat[path]
        shape = tuple(leaf.shape)
        if module in factors:
            if param != "bias":  # PEFT also saves a targeted embedding's base weight
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
        ffo = (None if body.get("fan_in_fan_out") else False) if fan_in_fan_out is None else \
            paths.matches((fan_in_fan_out,) if isinstance(fan_in_fan_out, str) else tuple(fan_in_fan_out), path)
        order = {"io": "in_out", "oi": "out_in"}.get(known[path].roles, "") if path in known else kernels
        if order is None and _square_kernel(path, value, shape):
            raise ValueError(
                f"jlora.peft.load: {key!r} is the square weight {tuple(value.shape)} of a module saved whole; whether "
                f"{path!r} is stored (in, out) or (out, in) is known neither from the key map nor from layouts=. "
                f"Fix: layouts={{{path!r}: jlora.Layout({shape}, 'io')}} ('oi' for (out, in)), or a key map that "
                "states the order: jlora.peft.PortKeyMap(pairs, kernels='in_out' or 'out_in')"
            )
        if order == "out_in" and ffo is not None:
            ffo = not ffo  # the leaf is stored as torch's nn.Linear stores it: no transpose
        out[path] = jnp.asarray(whole_from_torch(path, key, value, shape, ffo), dtype=leaf.dtype)
        trainable.append(path)

    by_value = lambda d, default: _group({p: v for p, v in d.items() if v != default})  # noqa: E731
    config = LoraConfig(
        rank=rank,
        alpha=alpha,
        targets=tuple(re.escape(p) for p in sorted(ranks)),
        rank_pattern=by_value(ranks, rank),
        alpha_pattern=by_value(alphas, alpha),
        rslora=bool(body.get("use_rslora", False)),
        dropout=float(body.get("lora_dropout") or 0.0),
        init="gaussian" if body.get("init_lora_weights") == "gaussian" else "kaiming",
        trainable=tuple(re.escape(p) for p in trainable),
        axes=_group(axes),
        use_dora=use_dora,
        embedding_rows=tuple(embedding_rows.items()),
    )
    return nest(out, used), config
