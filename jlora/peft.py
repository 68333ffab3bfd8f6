"""PEFT interop: read and write ``adapter_config.json`` + ``adapter_model.safetensors``.

A PEFT LoRA adapter names its tensors after PyTorch modules
(``base_model.model.<module>.lora_A.weight``); jlora names leaves by '/'-joined pytree paths. A
*key map* connects the two: it maps a jlora leaf path (an adapted kernel, a bias, a norm scale)
to the torch module that owns the same weight, e.g. ``'params/layers_0/attn/q_proj/kernel'`` to
``'model.layers.0.self_attn.q_proj'``. It is a callable ``path -> module name | None`` or a
sequence of ``(regex, replacement)`` pairs (``re.fullmatch`` on the path, ``match.expand`` on the
replacement; the first pair that matches wins). :func:`load` inverts it by enumerating the paths
of the params, so only the forward direction is ever written down.

Layouts (PyTorch on the left, jlora on the right)::

    Linear     lora_A.weight (r, in)           A (in..., r)     multi-axis kernels flattened, C order
               lora_B.weight (out, r)          B (r, out...)
    Embedding  lora_embedding_A (r, vocab)     A (vocab, r)
               lora_embedding_B (d, r)         B (r, d)
    Conv       lora_A.weight (r, cin, k...)    A (k..., cin, r)  a conv to r channels
               lora_B.weight (cout, r, 1...)   B (r, cout)       a 1x1 conv

Whole trained leaves (jlora's ``trainable``) become PEFT's ``modules_to_save`` (weights of a whole
module) and ``bias`` (``'lora_only'`` or ``'all'``). Only safetensors is read or written; a
pickled ``adapter_model.bin`` is refused, never unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from jlora import paths
from jlora.config import LoraConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
PREFIX = "base_model.model."

KeyMap = Union[Callable[[str], Union[str, None]], Sequence[tuple[str, str]]]

# PyTorch parameter name of each Flax leaf name (kernel/embedding/scale all live in `.weight`).
_TORCH_PARAM = {"kernel": "weight", "embedding": "weight", "scale": "weight", "weight": "weight", "bias": "bias"}

# PEFT LoraConfig keys (peft 0.21) that jlora reads, or that do not change the adapter's function.
_KNOWN_KEYS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
    "fan_in_fan_out", "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_core", "qalora_group_size",
    "runtime_config", "eva_config", "corda_config", "lora_ga_config", "velora_config", "ensure_weight_tying",
}
# Keys that are fine at their default but name a feature jlora cannot reproduce otherwise.
_REFUSED_UNLESS_DEFAULT = {
    "use_dora": "DoRA (use_dora=True) is not supported yet; DoRA comes in a later jlora release. Fix: in "
                "PyTorch, merge the adapter (PeftModel.merge_and_unload()) and load the merged weights, or train "
                "a plain LoRA adapter",
    "lora_bias": "a bias on lora_B (lora_bias=True)",
    "use_qalora": "QA-LoRA (use_qalora=True)",
    "target_parameters": "LoRA on raw nn.Parameters (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
    "loftq_config": "LoftQ (loftq_config), which changes the base weights",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config), which changes the base weights",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq", "kasa")


# ---------------------------------------------------------------------------------------------
# Key maps
# ---------------------------------------------------------------------------------------------

def _mapper(key_map: KeyMap) -> Callable[[str], str | None]:
    if callable(key_map):
        return key_map
    if isinstance(key_map, (str, bytes)) or not isinstance(key_map, Sequence):
        raise TypeError(
            f"key_map: expected a callable path -> module name, or a sequence of (regex, replacement) pairs, "
            f"got {type(key_map).__name__}; fix: e.g. [(r'params/layers_(\\d+)/attn/q_proj/kernel', "
            f"r'model.layers.\\1.self_attn.q_proj')]"
        )
    compiled = []
    for item in key_map:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise TypeError(f"key_map: expected (regex, replacement) string pairs, got item {item!r}")
        try:
            compiled.append((re.compile(item[0]), item[1]))
        except re.error as err:
            raise ValueError(f"key_map: {item[0]!r} is not a valid regex ({err})") from None

    def fn(path: str) -> str | None:
        for pattern, replacement in compiled:
            m = pattern.fullmatch(path)
            if m:
                return m.expand(replacement)
        return None

    return fn


def module_name(path: str, key_map: KeyMap) -> str | None:
    """The torch module that owns the jlora leaf at ``path``, or None if the map cannot place it.

    A leaf the map does not place itself (a bias, say) is placed at the module of its sibling
    ``kernel`` or ``embedding``.

    Args:
      path: a canonical jlora leaf path.
      key_map: a callable or ``(regex, replacement)`` pairs (see the module docstring).

    >>> module_name("params/layers_0/attn/q_proj/kernel", LLAMA_KEY_MAP)
    'model.layers.0.self_attn.q_proj'
    >>> module_name("params/other/kernel", LLAMA_KEY_MAP) is None
    True
    """
    fn = _mapper(key_map)
    return _place(fn, path)


def _place(fn: Callable[[str], str | None], path: str) -> str | None:
    name = fn(path)
    if name is None and "/" in path:
        parent, leaf = path.rsplit("/", 1)
        if leaf not in ("kernel", "embedding"):
            name = fn(parent + "/kernel") or fn(parent + "/embedding")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"key_map({path!r}): expected a module name string or None, got {name!r}")
    return name


def _torch_param(path: str) -> str:
    leaf = path.rsplit("/", 1)[-1]
    return _TORCH_PARAM.get(leaf, leaf)


LLAMA_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"params/embed_tokens/embedding", "model.embed_tokens"),
    (r"params/layers_(\d+)/attn/(q_proj|k_proj|v_proj|o_proj)/(?:kernel|bias)", r"model.layers.\1.self_attn.\2"),
    (r"params/layers_(\d+)/mlp/(gate_proj|up_proj|down_proj)/(?:kernel|bias)", r"model.layers.\1.mlp.\2"),
    (r"params/layers_(\d+)/(input_layernorm|post_attention_layernorm)/scale", r"model.layers.\1.\2"),
    (r"params/norm/scale", "model.norm"),
    (r"params/lm_head/kernel", "lm_head"),
)
"""Key map of ``examples/llama.py`` onto ``transformers.LlamaForCausalLM``."""

BERT_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"params/embeddings/(word|position|token_type)_embeddings/embedding", r"embeddings.\1_embeddings"),
    (r"params/embeddings/norm/(?:scale|bias)", "embeddings.LayerNorm"),
    (r"params/encoder/layer_(\d+)/attention/(query|key|value)/(?:kernel|bias)", r"encoder.layer.\1.attention.self.\2"),
    (r"params/encoder/layer_(\d+)/attention/output/(?:kernel|bias)", r"encoder.layer.\1.attention.output.dense"),
    (r"params/encoder/layer_(\d+)/attention_norm/(?:scale|bias)", r"encoder.layer.\1.attention.output.LayerNorm"),
    (r"params/encoder/layer_(\d+)/mlp/intermediate/(?:kernel|bias)", r"encoder.layer.\1.intermediate.dense"),
    (r"params/encoder/layer_(\d+)/mlp/output/(?:kernel|bias)", r"encoder.layer.\1.output.dense"),
    (r"params/encoder/layer_(\d+)/mlp_norm/(?:scale|bias)", r"encoder.layer.\1.output.LayerNorm"),
)
"""Key map of ``examples/minilm.py`` onto ``transformers.BertModel`` (for ``BertFor*`` heads,
prefix the module names with ``bert.``)."""


# ---------------------------------------------------------------------------------------------
# PEFT's module-name matching rules (peft.tuners.tuners_utils.check_target_module_exists and
# peft.utils.other.get_pattern_key), applied to the module names the key map produces.
# ---------------------------------------------------------------------------------------------

def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _peft_targets(body: Mapping[str, Any], module: str) -> bool:
    exclude = body.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith(f".{e}") for e in exclude):
            return False
    for m in body.get("modules_to_save") or ():
        if re.match(rf"(^|.*\.){m}($|\..*)", module):
            return False
    targets = body.get("target_modules")
    if targets is None:
        return True  # PEFT resolved the model-type default at creation; trust the file
    if isinstance(targets, str):
        return targets.lower() == "all-linear" or re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{t}") for t in targets):
        return False
    layers = body.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    pattern = body.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
            if match:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------

def _walk(tree: Any, prefix: str, pairs: dict[str, tuple[Any, Any]], whole: dict[str, Any]) -> None:
    if not isinstance(tree, Mapping):
        whole[prefix] = tree
    elif set(tree) == {"A", "B"} and not isinstance(tree["A"], Mapping):
        pairs[prefix] = (tree["A"], tree["B"])
    else:
        for key, value in tree.items():
            _walk(value, f"{prefix}/{key}" if prefix else str(key), pairs, whole)


def _adapter_dir(directory: str | os.PathLike[str], adapter_name: str | None) -> Path:
    root = Path(directory)
    if adapter_name is None or adapter_name == "default":
        return root
    if not isinstance(adapter_name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", adapter_name) or adapter_name in (
            ".", ".."):
        raise ValueError(
            f"adapter_name: expected a plain folder name (letters, digits, '_', '-', '.'), got {adapter_name!r}"
        )
    return root / adapter_name


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def save(directory: str | os.PathLike[str], lora: Mapping[str, Any], config: LoraConfig, key_map: KeyMap, *,
         adapter_name: str | None = None, overwrite: bool = False, conv: str | Sequence[str] = (),
         base_model_name_or_path: str | None = None, task_type: str | None = None) -> Path:
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
      conv: regexes of kernel paths that are convolutions (``(k..., cin, cout)``); a multi-axis
        kernel is otherwise a dense map flattened to ``nn.Linear``.
      base_model_name_or_path: recorded in the config (PEFT uses it only when no model is passed).
      task_type: PEFT task type (e.g. ``'CAUSAL_LM'``), or None for a plain ``PeftModel``.

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
        raise TypeError(f"jlora.peft.save: config must be a jlora.LoraConfig, got {type(config).__name__}")
    if not isinstance(lora, Mapping):
        raise TypeError(f"jlora.peft.save: lora must be the nested-dict lora tree, got {type(lora).__name__}")
    _check_exportable(config)
    fn = _mapper(key_map)
    conv = (conv,) if isinstance(conv, str) else tuple(conv)
    out_dir = _adapter_dir(directory, adapter_name)
    existing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if (out_dir / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"jlora.peft.save: {out_dir} already holds an adapter ({', '.join(existing)}); fix: pass "
            "overwrite=True to replace it, or choose another directory/adapter_name"
        )

    pairs: dict[str, tuple[Any, Any]] = {}
    whole: dict[str, Any] = {}
    _walk(lora, "", pairs, whole)
    tensors: dict[str, np.ndarray] = {}
    modules: dict[str, str] = {}  # module -> jlora kernel path
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, int | float] = {}

    def place(path: str) -> str:
        name = _place(fn, path)
        if name is None:
            raise ValueError(
                f"jlora.peft.save: key_map cannot place lora path {path!r} (it returned None / no regex "
                "matched); fix: add a (regex, module name) pair for it to key_map"
            )
        return name

    for path, (A, B) in sorted(pairs.items()):
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
        r = A.shape[-1]
        if A.ndim < 2 or B.ndim < 2 or B.shape[0] != r:
            raise ValueError(
                f"jlora.peft.save: lora factors of {path!r}: A {A.shape} and B {B.shape} are not a rank-r pair "
                "(expected A = in... + (r,), B = (r,) + out...)"
            )
        if r != config.rank_for(path):
            raise ValueError(
                f"jlora.peft.save: {path!r} has rank {r} (A {A.shape}) but config.rank_for gives "
                f"{config.rank_for(path)}; fix: pass the config the lora tree was made with"
            )
        module = place(path)
        if module in modules:
            raise ValueError(f"jlora.peft.save: key_map sends both {modules[module]!r} and {path!r} to {module!r}")
        modules[module] = path
        key = PREFIX + module
        if paths.matches(conv, path):
            if B.ndim != 2 or A.ndim < 3:
                raise ValueError(
                    f"jlora.peft.save: conv {path!r}: expected A (k..., cin, r) and B (r, cout), got A {A.shape}, "
                    f"B {B.shape}"
                )
            nk = A.ndim - 2
            tensors[key + ".lora_A.weight"] = np.transpose(A, (A.ndim - 1, A.ndim - 2) + tuple(range(nk)))
            tensors[key + ".lora_B.weight"] = B.T.reshape(B.shape[1], r, *(1,) * nk)
        elif path.rsplit("/", 1)[-1] == "embedding":
            if A.ndim != 2 or B.ndim != 2:
                raise ValueError(f"jlora.peft.save: embedding {path!r}: expected 2-D A and B, got {A.shape}, {B.shape}")
            tensors[key + ".lora_embedding_A"] = A.T
            tensors[key + ".lora_embedding_B"] = B.T
        else:
            tensors[key + ".lora_A.weight"] = A.reshape(-1, r).T
            tensors[key + ".lora_B.weight"] = B.reshape(r, -1).T
        if r != config.rank:
            rank_pattern[re.escape(module)] = int(r)
        if config.alpha_for(path) != config.alpha:
            alpha_pattern[re.escape(module)] = _number(config.alpha_for(path))

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
    for module, leaf_paths in whole_by_module.items():
        for path in leaf_paths:
            value = np.asarray(whole[path])
            param = _torch_param(path)
            leaf = path.rsplit("/", 1)[-1]
            if leaf == "kernel":
                if paths.matches(conv, path):
                    value = np.transpose(value, (value.ndim - 1, value.ndim - 2) + tuple(range(value.ndim - 2)))
                elif value.ndim == 2:
                    value = value.T
                else:
                    raise ValueError(
                        f"jlora.peft.save: trained-whole kernel {path!r} has shape {value.shape}; only 2-D (in, out) "
                        "kernels and convs (conv=...) have a known PyTorch layout"
                    )
            elif param == "bias":
                value = value.reshape(-1)
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
        "exclude_modules": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": bias,
        "modules_to_save": sorted(modules_to_save) or None,
        "fan_in_fan_out": False,
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
        "lora_bias": False,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    contiguous = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    _atomic_write(out_dir / WEIGHTS_NAME, lambda p: save_file(contiguous, p, metadata={"format": "pt"}))
    _atomic_write(out_dir / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(body, indent=2, sort_keys=True)))
    return out_dir


def _check_exportable(config: LoraConfig) -> None:
    refused = []
    if getattr(config, "use_dora", False):
        refused.append("use_dora=True: DoRA export is not supported yet (DoRA interop comes later); fix: merge the "
                       "adapter (jlora.merge) and export the merged weights instead")
    if getattr(config, "embedding_rows", ()):
        refused.append("embedding_rows (PEFT's trainable_token_indices) is not exported yet; fix: merge the rows "
                       "into the table (jlora.merge) or train the table whole (LoraConfig.trainable)")
    init = config.init
    if init not in ("kaiming", "gaussian"):
        refused.append(f"init={init!r} trains on a modified (residual) base, so the adapter does not apply to the "
                       "original model; fix: convert it first with jlora.inits.to_plain_adapter(params, frozen, "
                       "lora, config) and save the result")
    if refused:
        raise ValueError(
            "jlora.peft.save: the config uses features PEFT export does not support: " + "; ".join(refused)
        )


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

def _read_config(path: Path) -> dict[str, Any]:
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"jlora.peft.load: {path} is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise ValueError(f"jlora.peft.load: {path} must hold a JSON object, got {type(body).__name__}")
    if body.get("peft_type") != "LORA":
        raise ValueError(
            f"jlora.peft.load: {path}: peft_type is {body.get('peft_type')!r}; jlora reads LoRA adapters "
            "(peft_type 'LORA') only"
        )
    refused = []
    for key, what in _REFUSED_UNLESS_DEFAULT.items():
        value = body.get(key)
        if value not in (None, False, {}, []):
            refused.append(f"{key}={value!r}: {what}")
    init = body.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        refused.append(
            f"init_lora_weights={init!r}: this init changes the base weights, so the adapter does not apply to "
            "the original model; fix: save it in PEFT with path_initial_model_for_weight_conversion"
        )
    if refused:
        raise ValueError(f"jlora.peft.load: {path} uses features jlora does not support: " + "; ".join(refused))
    if body.get("bias", "none") not in ("none", "all", "lora_only"):
        raise ValueError(f"jlora.peft.load: {path}: bias must be 'none', 'all' or 'lora_only', got {body['bias']!r}")
    for key in ("r", "lora_alpha"):
        if not isinstance(body.get(key), (int, float)) or isinstance(body.get(key), bool) or not body[key] > 0:
            raise ValueError(f"jlora.peft.load: {path}: {key} must be a positive number, got {body.get(key)!r}")
    unknown = sorted(set(body) - _KNOWN_KEYS - set(_REFUSED_UNLESS_DEFAULT))
    if unknown:
        warnings.warn(
            f"jlora.peft.load: {path} has keys this jlora does not know (a newer PEFT?): {unknown}; they are "
            "ignored. Check that the adapter does not depend on them.",
            stacklevel=3,
        )
    return body


def _find_split(path: str, shape: tuple[int, ...], n_in_flat: int, n_out_flat: int) -> int | None:
    for n_in in range(1, len(shape)):
        if math.prod(shape[:n_in]) == n_in_flat and math.prod(shape[n_in:]) == n_out_flat:
            return n_in
    return None


def load(directory: str | os.PathLike[str], params: Any, key_map: KeyMap, *,
         adapter_name: str | None = None) -> tuple[dict[str, Any], LoraConfig]:
    """Reads a PEFT LoRA adapter into a jlora ``(lora, config)`` pair for ``params``.

    Args:
      directory: the folder PEFT's ``save_pretrained`` wrote (``adapter_config.json`` and
        ``adapter_model.safetensors``; pickled ``.bin`` files are refused, never unpickled).
      params: the base parameter tree (arrays or ``jax.ShapeDtypeStruct``s); its paths, through
        ``key_map``, tell where each torch module lives.
      key_map: jlora leaf path -> torch module name (callable or ``(regex, replacement)`` pairs).
      adapter_name: read ``directory/adapter_name`` (PEFT's folder for a non-default adapter).

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
    src = _adapter_dir(directory, adapter_name)
    if not src.is_dir():
        raise FileNotFoundError(f"jlora.peft.load: adapter folder {src} does not exist")
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
            f"jlora.peft.load: {weights} is missing (folder holds: {sorted(p.name for p in src.iterdir())})"
        )
    cfg_path = src / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"jlora.peft.load: {cfg_path} is missing; a PEFT adapter needs its config")
    body = _read_config(cfg_path)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"jlora.peft.load: {weights} is not a readable safetensors file ({err})") from None

    flat = paths.flatten(params)
    owner: dict[tuple[str, str], str] = {}  # (module, torch param) -> jlora path
    for path in flat:
        module = _place(fn, path)
        if module is None:
            continue
        key = (module, _torch_param(path))
        if key in owner:
            raise ValueError(f"jlora.peft.load: key_map sends both {owner[key]!r} and {path!r} to {'.'.join(key)}")
        owner[key] = path
    known_modules = sorted({m for m, _ in owner})

    def where(key: str, module: str, param: str) -> str:
        path = owner.get((module, param))
        if path is None:
            near = ", ".join(paths.closest(module, known_modules, 3))
            raise ValueError(
                f"jlora.peft.load: adapter key {key!r}: key_map places no params leaf at torch module {module!r} "
                f"(parameter {param!r}); closest modules the map produces: {near}. Fix: extend key_map"
            )
        return path

    factors: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    full: dict[tuple[str, str], tuple[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"jlora.peft.load: {weights}: key {key!r} does not start with {PREFIX!r}; not a PEFT file")
        name = key[len(PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
        if m:
            module = m.group(1) or m.group(3)
            part = (m.group(2) or m.group(4))[-1]
            factors.setdefault(module, {})[part] = (key, value)
            if m.group(4):
                factors[module]["embed"] = (key, value)
            continue
        if ".lora_" in name:
            what = "DoRA (lora_magnitude_vector)" if "lora_magnitude_vector" in name else "a LoRA variant"
            raise ValueError(
                f"jlora.peft.load: {weights}: key {key!r} belongs to {what}, which jlora does not read yet"
            )
        module, _, param = name.rpartition(".")
        module = module.removesuffix(".base_layer")
        module = re.sub(r"\.modules_to_save(\.[^.]+)?$", "", module)
        full[(module, param)] = (key, value)

    rank, alpha = int(body["r"]), float(body["lora_alpha"])
    rank_pattern = body.get("rank_pattern") or {}
    alpha_pattern = body.get("alpha_pattern") or {}
    out: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    axes: dict[str, int] = {}
    for module, parts in sorted(factors.items()):
        if "A" not in parts or "B" not in parts:
            have = next(iter(parts.values()))[0]
            raise ValueError(f"jlora.peft.load: {weights}: {have!r} has no partner factor (need both A and B)")
        key_a, tA = parts["A"]
        key_b, tB = parts["B"]
        path = where(key_a, module, "weight")
        if not _peft_targets(body, module):
            raise ValueError(
                f"jlora.peft.load: {weights} holds factors for {module!r} ({path!r}) but {CONFIG_NAME} does not "
                "target it (target_modules / exclude_modules / layers_to_transform); PEFT would ignore them"
            )
        shape = tuple(flat[path].shape)
        r = tA.shape[0]
        got = f"lora_A {tA.shape}, lora_B {tB.shape}"
        if "embed" in parts:
            ok = len(shape) == 2 and tA.shape == (r, shape[0]) and tB.shape == (shape[1], r)
            want = f"lora_embedding_A (r, {shape[0]}), lora_embedding_B ({shape[-1]}, r)" if len(shape) == 2 else "2-D"
            A, B, n_in = (tA.T, tB.T, 1) if ok else (None, None, 0)
        elif tA.ndim > 2:
            nk = tA.ndim - 2
            ok = (len(shape) == nk + 2 and tA.shape == (r, shape[-2]) + shape[:-2]
                  and tB.shape == (shape[-1], r) + (1,) * nk)
            want = f"lora_A (r, {shape[-2]}, {', '.join(map(str, shape[:-2]))}), lora_B ({shape[-1]}, r, 1...)"
            A = np.transpose(tA, tuple(range(2, tA.ndim)) + (1, 0)) if ok else None
            B = tB.reshape(tB.shape[0], r).T if ok else None
            n_in = len(shape) - 1
        else:
            n_in = _find_split(path, shape, tA.shape[-1], tB.shape[0]) if tA.ndim == 2 and tB.ndim == 2 else None
            ok = n_in is not None and tB.shape[1] == r
            want = f"lora_A (r, prod(in)), lora_B (prod(out), r) for a kernel of shape {shape}"
            A = tA.T.reshape(shape[:n_in] + (r,)) if ok else None
            B = tB.T.reshape((r,) + shape[n_in:]) if ok else None
        if not ok:
            raise ValueError(
                f"jlora.peft.load: adapter keys {key_a!r}/{key_b!r} do not fit the params leaf {path!r} of shape "
                f"{shape}: expected {want}, got {got}; fix: check the key_map and that params is the adapter's "
                "base model"
            )
        pattern = _pattern_key(rank_pattern, module)
        expect_r = rank_pattern[pattern] if pattern is not None else rank
        if r != expect_r:
            raise ValueError(
                f"jlora.peft.load: {key_a!r} has rank {r} but {CONFIG_NAME} gives module {module!r} rank {expect_r} "
                "(r / rank_pattern); the file and its config disagree"
            )
        pattern = _pattern_key(alpha_pattern, module)
        alphas[path] = float(alpha_pattern[pattern]) if pattern is not None else alpha
        ranks[path] = r
        if len(shape) != 2:
            axes[path] = n_in
        out[path + "/A"] = jnp.asarray(A)
        out[path + "/B"] = jnp.asarray(B)

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
        if path.rsplit("/", 1)[-1] == "kernel":
            if value.ndim == 2 and len(shape) >= 2:
                value = value.T
            elif value.ndim > 2:
                value = np.transpose(value, tuple(range(2, value.ndim)) + (1, 0))
        if value.size != math.prod(shape) or (value.ndim == len(shape) and value.shape != shape):
            raise ValueError(
                f"jlora.peft.load: adapter key {key!r} of shape {tensors[key].shape} does not fit the params leaf "
                f"{path!r} of shape {shape}; fix: check the key_map and the base model"
            )
        out[path] = jnp.asarray(value.reshape(shape), dtype=leaf.dtype)
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
    )
    return paths.unflatten_dict(out), config


def _group(values: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """``{path: value}`` -> one ``(regex, value)`` rule per distinct value (escaped paths, alternation)."""
    by: dict[Any, list[str]] = {}
    for path, value in sorted(values.items()):
        by.setdefault(value, []).append(re.escape(path))
    return tuple(("|".join(ps) if len(ps) == 1 else "(?:" + "|".join(ps) + ")", v) for v, ps in by.items())
