"""GGUF block bases (jlora.quant._gguf, QuantizedArray q8_0/q4_0/q4_1) against the ``gguf`` package itself.

The reference is llama.cpp's own Python codec, ``gguf.quants.quantize``/``dequantize`` (NumPy), on
synthetic tensors and on every quantized tensor of the real SmolLM2-135M-Instruct GGUF: values are
compared bit for bit (0 differing values), bytes likewise. The SmolLM2 loader's kept-block base
gives the float base's parameters bit for bit and its logits through ``jlora.lora_apply``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import jlora
from examples.models import smollm
from jlora import paths, quant
from jlora.quant import _gguf as quant_gguf

ROOT = Path(__file__).resolve().parents[1]
TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
         "q4_1": gguf.GGMLQuantizationType.Q4_1}
_dequant = jax.jit(quant.dequantize_leaf, static_argnums=1)


def _bits_differ(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32, (a.shape, b.shape, a.dtype, b.dtype)
    return int(np.sum(a.view(np.uint32) != b.view(np.uint32)))


def _tensor(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Heavy-tailed values over many magnitudes, one all-zero block, one constant block."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=shape) * 10.0 ** rng.uniform(-4, 2, size=shape[:-1] + (1,))
    x = x.astype(np.float32)
    x.reshape(-1, shape[-1])[0, :32] = 0.0
    x.reshape(-1, shape[-1])[-1, -32:] = 1.5
    return x


# --- synthetic tensors -----------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", quant_gguf.SCHEMES)
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 96), (130, 32)])
def test_blocks_from_gguf_bytes_dequantize_bit_identical(scheme, shape):
    raw = gguf_quantize(_tensor(shape, len(shape)), TYPES[scheme])
    q = quant.from_gguf(raw, scheme)
    assert q.shape == shape and q.perm is None and q.nbytes == raw.nbytes  # the file's bytes, nothing else
    assert _bits_differ(np.asarray(_dequant(q, jnp.float32)), gguf_dequantize(raw, TYPES[scheme])) == 0
    np.testing.assert_array_equal(quant_gguf.join_blocks(q.codes, q.scales, q.mins, scheme), raw)


@pytest.mark.parametrize("scheme", quant_gguf.SCHEMES)
def test_transposed_blocks_describe_the_flax_kernel(scheme):
    """A GGUF (out, in) weight kept as a Flax (in, out) kernel: perm=(1, 0), dequantized then transposed."""
    raw = gguf_quantize(_tensor((48, 96), 1), TYPES[scheme])
    q = quant.from_gguf(raw, scheme, perm=(1, 0))
    assert q.shape == (96, 48)
    ref = np.ascontiguousarray(gguf_dequantize(raw, TYPES[scheme]).T)
    assert _bits_differ(np.asarray(_dequant(q, jnp.float32)), ref) == 0
    x = np.random.default_rng(0).standard_normal((3, 96)).astype(np.float32)
    got = jax.jit(lambda q, x: x @ quant.dequantize_leaf(q))(q, x)  # traceable: jit on the QuantizedArray
    np.testing.assert_allclose(np.asarray(got), x.astype(np.float64) @ ref.astype(np.float64), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("scheme", quant_gguf.SCHEMES)
@pytest.mark.parametrize("shape,axis_order", [((96, 40), (1, 0)), ((2, 64, 24), (0, 2, 1))])
def test_quantize_matches_gguf_bit_for_bit(scheme, shape, axis_order):
    """jlora.quantize(scheme=...) blocks along the kernel's last input axis = gguf on the moved tensor."""
    w = _tensor(shape, 2)
    q = jlora.quantize({"w": jnp.asarray(w)}, "w", scheme=scheme)["w"]
    stored = np.ascontiguousarray(w.transpose(axis_order))
    raw = gguf_quantize(stored, TYPES[scheme])
    np.testing.assert_array_equal(quant_gguf.join_blocks(q.codes, q.scales, q.mins, scheme), raw)
    ref = np.ascontiguousarray(gguf_dequantize(raw, TYPES[scheme]).transpose(np.argsort(axis_order)))
    assert _bits_differ(np.asarray(jlora.dequantize(q)), ref) == 0


@pytest.mark.parametrize("scheme", quant_gguf.SCHEMES)
def test_quantize_rows_bit_for_bit_on_many_scales(scheme):
    """Many random scales (the divisions and roundings must be NumPy's, not XLA's reciprocal)."""
    x = np.concatenate([_tensor((64, 320), s) for s in range(4)])
    got = quant_gguf.join_blocks(*jax.jit(quant_gguf.quantize_rows, static_argnums=1)(jnp.asarray(x), scheme), scheme)
    np.testing.assert_array_equal(got, gguf_quantize(x, TYPES[scheme]))


def test_pytree_structure_jit_and_eval_shape():
    q = jlora.quantize({"w": jnp.ones((64, 8))}, "w", scheme="q4_1")["w"]
    nf4 = jlora.quantize({"w": jnp.ones((64, 8))}, "w")["w"]
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 3 and len(treedef.children()) == 5  # codes, scales, mins; two empty slots
    assert len(jax.tree_util.tree_flatten(nf4)[1].children()) == 5  # the same five children for every scheme
    assert jax.tree.structure(jax.tree.map(lambda x: x, q)) == treedef
    shape = jax.eval_shape(lambda q: quant.dequantize_leaf(q, jnp.bfloat16), q)
    assert (shape.shape, shape.dtype) == ((64, 8), jnp.bfloat16)
    assert repr(q) == "QuantizedArray(q4_1, shape=(64, 8), dtype=float32, perm=(1, 0))"
    assert q.nbytes == 8 * 2 * 20  # 8 rows of two q4_1 blocks, 20 bytes each


def test_codes_and_scales_follow_the_kernel_sharding():
    code = textwrap.dedent("""
        import json, jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jlora import quant
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
        w = jax.random.normal(jax.random.key(0), (64, 512))
        ws = jax.device_put(w, NamedSharding(mesh, P("data", "model")))
        out = {}
        for scheme in ("q8_0", "q4_1"):
            q = quant.quantize({"w": ws}, "w", scheme=scheme)["w"]
            out[scheme] = [tuple(x.sharding.spec) for x in jax.tree.leaves(q)]
            ref = quant.dequantize(quant.quantize({"w": w}, "w", scheme=scheme)["w"])
            out[scheme + "_differ"] = int(np.sum(np.asarray(jax.jit(quant.dequantize)(q)) != np.asarray(ref)))
        print("RESULT" + json.dumps(out))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.split("RESULT")[-1])
    # stored (512 out, 2 blocks, 32): out axis keeps "model", the 2 blocks of the input axis take "data"
    assert out["q8_0"] == [["model", "data", None], ["model", "data"]]
    assert out["q4_1"] == [["model", "data", None], ["model", "data"], ["model", "data"]]
    assert out["q8_0_differ"] == 0 and out["q4_1_differ"] == 0


def test_bad_input():
    with pytest.raises(ValueError, match=r"raw must be uint8 bytes .* multiple of 20 \(q4_1 blocks\), got uint8 \(2, 30\)"):
        quant.from_gguf(np.zeros((2, 30), np.uint8), "q4_1")
    with pytest.raises(ValueError, match=r"scheme must be one of \('q8_0', 'q4_0', 'q4_1'\), got 'q5_k'; fix"):
        quant.from_gguf(np.zeros((2, 34), np.uint8), "q5_k")
    with pytest.raises(ValueError, match=r"last axis must be a multiple of 32, got shape \(2, 48\)"):
        quant_gguf.quantize_rows(jnp.ones((2, 48)), "q8_0")


# --- the real SmolLM2-135M-Instruct file ----------------------------------------------------------

def test_every_quantized_tensor_of_the_real_file_is_bit_identical():
    reader = gguf.GGUFReader(str(smollm.gguf_path()))
    seen: dict[str, int] = {}
    for t in reader.tensors:
        scheme = t.tensor_type.name.lower()
        if scheme not in quant_gguf.SCHEMES:
            assert scheme == "f32"
            continue
        got = np.asarray(_dequant(quant.from_gguf(t.data, scheme), jnp.float32))
        assert _bits_differ(got, gguf_dequantize(t.data, t.tensor_type)) == 0, t.name
        seen[scheme] = seen.get(scheme, 0) + 1
    assert seen == {"q4_1": 210, "q8_0": 1}


@pytest.fixture(scope="module")
def smol():
    model, params, tok, chat = smollm.load_smollm()
    _, kept = smollm.load_params(keep_quantized=True)
    return model, params, kept, tok, chat


def test_kept_blocks_base_equals_the_float_base(smol):
    _, params, kept, _, _ = smol
    flat, qflat = paths.flatten(params), paths.flatten(kept)
    assert flat.keys() == qflat.keys()
    kinds = {p: (q.scheme, q.perm) for p, q in qflat.items() if quant.is_quantized(q)}
    assert len(kinds) == 211 and kinds["params/embed_tokens/embedding"] == ("q8_0", None)
    assert kinds["params/layers_0/attn/q_proj/kernel"] == ("q4_1", (1, 0))
    assert all(not quant.is_quantized(qflat[p]) for p in qflat if p.endswith("/scale"))  # F32 norms stay float
    for p, w in flat.items():
        got = qflat[p]
        got = np.asarray(_dequant(got, jnp.float32)) if quant.is_quantized(got) else np.asarray(got)
        assert _bits_differ(got, np.asarray(w)) == 0, p
    kept_bytes = sum(x.nbytes if quant.is_quantized(x) else x.size * 4 for x in qflat.values())
    float_bytes = sum(x.size * 4 for x in flat.values())
    assert (kept_bytes, float_bytes) == (96_576_768, 538_060_032)  # 92.1 MiB vs 513.1 MiB


def test_kept_blocks_logits_equal_the_float_base_through_lora_apply(smol):
    """Per-use dequantization inside lora_apply (lazy and merged) with nonzero factors."""
    model, params, kept, tok, chat = smol
    ids = jnp.asarray([tok.encode(chat.render([{"role": "user", "content": "What is the capital of France?"}],
                                              add_generation_prompt=True)).ids])
    cfg = jlora.LoraConfig(rank=4, targets=r"params/layers_\d+/(attn/q_proj|mlp/down_proj)/kernel")
    frozen, lora = jlora.init(jax.random.key(0), params, cfg)
    frozen_q, _ = jlora.init(jax.random.key(0), kept, cfg)
    lora = jax.tree.map(lambda x: x + 0.01, lora)
    for mode in ("lazy", "merged"):
        fn = jax.jit(jlora.lora_apply(model.apply, cfg, mode=mode))
        ref, got = np.asarray(fn(frozen, lora, ids)), np.asarray(fn(frozen_q, lora, ids))
        # measured bit-identical on CPU (same W0 values); the bound allows another fusion's float32 rounding
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
        assert (got[0, -1].argmax() == ref[0, -1].argmax())
