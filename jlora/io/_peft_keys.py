"""PEFT's names and rules: key maps, module names, target matching and ``adapter_config.json`` rules.

A PEFT LoRA adapter names its tensors after PyTorch modules
(``base_model.model.<module>.lora_A.weight``); jlora names leaves by '/'-joined pytree paths. A
*key map* connects the two: it maps a jlora leaf path (an adapted kernel, a bias, a norm scale)
to the torch module that owns the same weight, e.g. ``'params/layers_0/attn/q_proj/kernel'`` to
``'model.layers.0.self_attn.q_proj'``. It is a callable ``path -> module name | None`` or a
sequence of ``(regex, replacement)`` pairs (``re.fullmatch`` on the path, ``match.expand`` on the
replacement; the first pair that matches wins). :func:`jlora.peft.load` inverts it by enumerating
the paths of the params, so only the forward direction is ever written down.

This module also holds PEFT's own module-matching rules (``target_modules``, ``exclude_modules``,
``layers_to_transform``, ``rank_pattern``) and which ``adapter_config.json`` fields jlora reads,
refuses or writes. :mod:`jlora.peft` does the file I/O and tensor layouts.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from jlora.core._config import LoraConfig
from jlora.core._inits import changes_base

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
PREFIX = "base_model.model."

KeyMap = Union[Callable[[str], Union[str, None]], Sequence[tuple[str, str]]]

KERNEL_ORDERS = ("in_out", "out_in")


class PortKeyMap(tuple):
    """A key map (``(regex, replacement)`` pairs) that also states how the model stores its kernels.

    ``kernels='in_out'``: every adapted kernel is stored ``(in..., out...)`` (Flax ``nn.Dense``,
    ``nnx.Linear``: the Flax ports' maps :data:`LLAMA_KEY_MAP`, :data:`BERT_KEY_MAP`,
    :data:`GPT2_KEY_MAP`); ``'out_in'``: ``(out..., in...)`` (PyTorch's ``nn.Linear`` weights kept
    as they are, equinox). :func:`jlora.peft.load` reads a kernel's layout from it when there is no
    trace (``apply_fn``) and no ``layouts=`` entry; without any of the three a square kernel is refused.

    >>> m = PortKeyMap([("params/up/kernel", "up")], kernels="out_in")
    >>> m.kernels, module_name("params/up/kernel", m)
    ('out_in', 'up')
    """

    kernels: str

    def __new__(cls, pairs: Sequence[tuple[str, str]], *, kernels: str) -> "PortKeyMap":
        if kernels not in KERNEL_ORDERS:
            raise ValueError(f"PortKeyMap: kernels must be one of {KERNEL_ORDERS}, got {kernels!r}; fix: 'in_out' "
                             "for Flax-style (in, out) kernels, 'out_in' for PyTorch-style (out, in) ones")
        self = super().__new__(cls, tuple(tuple(p) for p in pairs))
        self.kernels = kernels
        return self

    def __repr__(self) -> str:
        return f"PortKeyMap({tuple(self)!r}, kernels={self.kernels!r})"


def stated_kernels(key_map: KeyMap) -> str | None:
    """How the key map says the model stores its kernels (``'in_out'``/``'out_in'``), or None.

    >>> stated_kernels(LLAMA_KEY_MAP), stated_kernels([("a", "b")])
    ('in_out', None)
    """
    kernels = getattr(key_map, "kernels", None)
    return kernels if kernels in KERNEL_ORDERS else None

# PyTorch parameter name of each Flax leaf name (kernel/embedding/scale all live in `.weight`).
_TORCH_PARAM = {"kernel": "weight", "embedding": "weight", "scale": "weight", "weight": "weight", "bias": "bias"}

# PEFT LoraConfig keys (peft 0.21) that jlora reads, or that do not change the adapter's function.
_KNOWN_KEYS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "target_parameters", "exclude_modules", "lora_alpha", "lora_dropout",
    "fan_in_fan_out", "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_core", "qalora_group_size",
    "use_dora", "runtime_config", "eva_config", "corda_config", "lora_ga_config", "velora_config",
    "ensure_weight_tying", "trainable_token_indices",
}
# Keys that are fine at their default but name a feature jlora cannot reproduce otherwise.
_REFUSED_UNLESS_DEFAULT = {
    "lora_bias": "a bias on lora_B (lora_bias=True)",
    "use_qalora": "QA-LoRA (use_qalora=True)",
    "layer_replication": "layer replication (layer_replication)",
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
            raise TypeError(f"key_map: expected (regex, replacement) string pairs, got item {item!r}; fix: e.g. "
                            "(r'params/layers_(\\d+)/attn/q_proj/kernel', r'model.layers.\\1.self_attn.q_proj')")
        try:
            compiled.append((re.compile(item[0]), item[1]))
        except re.error as err:
            raise ValueError(f"key_map: {item[0]!r} is not a valid regex ({err}); fix: escape literal characters "
                             "(re.escape) or close the group") from None

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
        raise TypeError(f"key_map({path!r}): expected a module name string or None, got {name!r}; fix: return the "
                        "torch module's dotted name (e.g. 'model.layers.0.self_attn.q_proj'), or None for no module")
    return name


def _torch_param(path: str) -> str:
    leaf = path.rsplit("/", 1)[-1]
    return _TORCH_PARAM.get(leaf, leaf)


GPT2_KEY_MAP: PortKeyMap = PortKeyMap((
    (r"params/wte/embedding", "transformer.wte"),
    (r"params/wpe/embedding", "transformer.wpe"),
    (r"params/h_(\d+)/(ln_1|ln_2)/(?:scale|bias)", r"transformer.h.\1.\2"),
    (r"params/h_(\d+)/attn/(c_attn|c_proj)/(?:kernel|bias)", r"transformer.h.\1.attn.\2"),
    (r"params/h_(\d+)/mlp/(c_fc|c_proj)/(?:kernel|bias)", r"transformer.h.\1.mlp.\2"),
    (r"params/ln_f/(?:scale|bias)", "transformer.ln_f"),
), kernels="in_out")
"""Key map of a Flax GPT-2 named like ``transformers.GPT2LMHeadModel`` (``params/h_0/attn/c_attn/kernel``)."""

GPT2_FAN_IN_FAN_OUT = r"params/h_\d+/(attn|mlp)/(c_attn|c_proj|c_fc)/kernel"
"""GPT-2's ``Conv1D`` layers store their torch weight ``(in, out)``, like a Flax kernel (PEFT's
``fan_in_fan_out``): pass as ``fan_in_fan_out=`` to :func:`jlora.peft.save` / :func:`jlora.peft.load`."""

LLAMA_KEY_MAP: PortKeyMap = PortKeyMap((
    (r"params/embed_tokens/embedding", "model.embed_tokens"),
    (r"params/layers_(\d+)/attn/(q_proj|k_proj|v_proj|o_proj)/(?:kernel|bias)", r"model.layers.\1.self_attn.\2"),
    (r"params/layers_(\d+)/mlp/(gate_proj|up_proj|down_proj)/(?:kernel|bias)", r"model.layers.\1.mlp.\2"),
    (r"params/layers_(\d+)/(input_layernorm|post_attention_layernorm)/scale", r"model.layers.\1.\2"),
    (r"params/norm/scale", "model.norm"),
    (r"params/lm_head/kernel", "lm_head"),
), kernels="in_out")
"""Key map of ``examples/models/llama.py`` onto ``transformers.LlamaForCausalLM``."""

BERT_KEY_MAP: PortKeyMap = PortKeyMap((
    (r"params/embeddings/(word|position|token_type)_embeddings/embedding", r"embeddings.\1_embeddings"),
    (r"params/embeddings/norm/(?:scale|bias)", "embeddings.LayerNorm"),
    (r"params/encoder/layer_(\d+)/attention/(query|key|value)/(?:kernel|bias)", r"encoder.layer.\1.attention.self.\2"),
    (r"params/encoder/layer_(\d+)/attention/output/(?:kernel|bias)", r"encoder.layer.\1.attention.output.dense"),
    (r"params/encoder/layer_(\d+)/attention_norm/(?:scale|bias)", r"encoder.layer.\1.attention.output.LayerNorm"),
    (r"params/encoder/layer_(\d+)/mlp/intermediate/(?:kernel|bias)", r"encoder.layer.\1.intermediate.dense"),
    (r"params/encoder/layer_(\d+)/mlp/output/(?:kernel|bias)", r"encoder.layer.\1.output.dense"),
    (r"params/encoder/layer_(\d+)/mlp_norm/(?:scale|bias)", r"encoder.layer.\1.output.LayerNorm"),
), kernels="in_out")
"""Key map of ``examples/models/minilm.py`` onto ``transformers.BertModel`` (for ``BertFor*`` heads,
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
# adapter_config.json rules
# ---------------------------------------------------------------------------------------------

def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _check_exportable(config: LoraConfig) -> None:
    refused = []
    init = config.init
    if changes_base(init):
        refused.append(f"init={init!r} trains on a modified (residual) base, so the adapter does not apply to the "
                       "original model; fix: convert it first with jlora.to_plain_adapter(original_frozen, "
                       "frozen_residual, lora, config) and save the (lora, config) it returns")
    elif init not in ("kaiming", "gaussian"):
        refused.append(f"init={init!r} has no PEFT equivalent; fix: save with init='kaiming' or 'gaussian' "
                       "(the init does not change a trained adapter's function)")
    if refused:
        raise ValueError(
            "jlora.peft.save: the config uses features PEFT export does not support: " + "; ".join(refused)
        )


def _read_config(path: Path) -> dict[str, Any]:
    try:
        body = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"jlora.peft.load: {path} is not UTF-8 text ({err}); fix: re-save the adapter with PEFT's "
                         "save_pretrained (it writes UTF-8 JSON)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"jlora.peft.load: {path} is not valid JSON ({err}); fix: re-save the adapter with PEFT's "
                         "save_pretrained") from None
    if not isinstance(body, dict):
        raise ValueError(f"jlora.peft.load: {path} must hold a JSON object, got {type(body).__name__}; fix: re-save "
                         "the adapter with PEFT's save_pretrained")
    if body.get("peft_type") != "LORA":
        raise ValueError(
            f"jlora.peft.load: {path}: peft_type is {body.get('peft_type')!r}; jlora reads LoRA adapters "
            "(peft_type 'LORA') only; fix: load this adapter with PEFT, or convert it to a LoRA adapter there"
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
        raise ValueError(f"jlora.peft.load: {path} uses features jlora does not support: " + "; ".join(refused)
                         + ("" if all("fix:" in r for r in refused) else "; fix: merge the adapter in PEFT "
                            "(merge_and_unload) and load the merged weights as params"))
    if body.get("bias", "none") not in ("none", "all", "lora_only"):
        raise ValueError(f"jlora.peft.load: {path}: bias must be 'none', 'all' or 'lora_only', got {body['bias']!r}; "
                         "fix: correct 'bias' in the config (PEFT accepts only these three)")
    for key in ("r", "lora_alpha"):
        if not isinstance(body.get(key), (int, float)) or isinstance(body.get(key), bool) or not body[key] > 0:
            raise ValueError(f"jlora.peft.load: {path}: {key} must be a positive number, got {body.get(key)!r}; fix: "
                             "correct it in the config (the values the adapter was trained with)")
    unknown = sorted(set(body) - _KNOWN_KEYS - set(_REFUSED_UNLESS_DEFAULT))
    if unknown:
        warnings.warn(
            f"jlora.peft.load: {path} has keys this jlora does not know (a newer PEFT?): {unknown}; they are "
            "ignored. Check that the adapter does not depend on them.",
            stacklevel=3,
        )
    return body


def _group(values: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """``{path: value}`` -> one ``(regex, value)`` rule per distinct value (escaped paths, alternation)."""
    by: dict[Any, list[str]] = {}
    for path, value in sorted(values.items()):
        by.setdefault(value, []).append(re.escape(path))
    return tuple(("|".join(ps) if len(ps) == 1 else "(?:" + "|".join(ps) + ")", v) for v, ps in by.items())


def _token_indices(body: Mapping[str, Any], module: str, n_modules: int) -> list[int] | None:
    """The ``trainable_token_indices`` PEFT applies to ``module`` (a list means the input embedding)."""
    spec = body.get("trainable_token_indices")
    if isinstance(spec, list):
        return spec if n_modules == 1 else None
    if isinstance(spec, Mapping):
        for name, indices in spec.items():
            if module == name or module.endswith(f".{name}"):
                return indices
    return None
