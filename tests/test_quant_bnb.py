"""NF4 with and without double quantization against bitsandbytes itself (its CPU path), bit for bit.

bitsandbytes 0.50 runs on the CPU (``quantize_4bit``/``dequantize_4bit`` with
``compress_statistics=True``): the packed codes, the 8-bit absmax codes, the nested absmax, the offset
and every dequantized value must equal jlora's exactly (0 differing values), on normal and heavy-tailed
matrices and on sizes that are not multiples of the block sizes (64 and 256).
"""

from __future__ import annotations

import contextlib

import bitsandbytes.functional as bnb_f
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jlora import quant
from jlora.quant import _dq as quant_dq

NF4 = bnb_f.get_4bit_type("nf4", device="cpu").numpy()  # bitsandbytes' own 16 levels


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def matrix(shape, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    return (rng.standard_t(1.5, shape) * 0.02).astype(np.float32)  # heavy tails: a few huge blocks


def bnb_nf4(w: np.ndarray, double_quant: bool):
    packed, state = bnb_f.quantize_4bit(torch.from_numpy(w), blocksize=64, compress_statistics=double_quant,
                                        quant_type="nf4")
    if w.shape[-1] % 16 == 0 and w.shape[-1] % 64:
        # bitsandbytes 0.50.2's AVX-512 dequantize_4bit takes a row's scales at row * (last // 64) + k // 64,
        # as if the blocks tiled each row, while quantize_4bit blocks the flattened tensor: on such shapes its
        # output is not its own quantization's. The reference is then its codes and (nested) absmax
        # dequantized as its scalar kernel does: NF4 level * absmax, one float32 multiply
        absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset if double_quant else state.absmax
        nibbles = np.stack([packed.numpy().reshape(-1) >> 4, packed.numpy().reshape(-1) & 15], -1).reshape(-1, 64)
        back = (NF4[nibbles] * absmax.numpy()[:, None]).reshape(-1)[: w.size].reshape(w.shape)
    else:
        back = bnb_f.dequantize_4bit(packed, state).numpy()
    return packed.numpy().reshape(-1), state, back


def jlora_codes(q: quant.QuantizedArray, n: int) -> np.ndarray:
    return np.asarray(q.codes).reshape(-1)[: (n + 1) // 2]  # the flat layout pads to whole blocks


def test_dynamic_map_is_bitsandbytes_map():
    np.testing.assert_array_equal(quant_dq.dynamic_map(), bnb_f.create_dynamic_map().numpy())


@pytest.mark.parametrize("n", [*range(1, 20), 31, 100, 511, 512, 4099, 30001, 32767])
def test_torch_mean_is_torch_cpu_mean(n):
    x = np.abs(np.random.default_rng(n).standard_t(3, n)).astype(np.float32) * np.float32(3.7)
    assert np.float32(quant_dq.torch_mean(jnp.asarray(x))) == torch.from_numpy(x).mean().numpy()


def test_torch_mean_above_the_parallel_grain_matches_one_thread():
    # from 32768 values PyTorch splits the sum over its threads; jlora's offset is the one-thread value
    x = np.abs(np.random.default_rng(7).standard_normal(100_003)).astype(np.float32)
    with torch_threads(1):
        assert np.float32(quant_dq.torch_mean(jnp.asarray(x))) == torch.from_numpy(x).mean().numpy()


SHAPES = [
    ((256, 128), "normal"),      # the matrix: 512 absmax, 2 nested blocks
    ((192, 320), "heavy"),       # the heavy-tailed matrix
    ((37, 129), "heavy"),        # 4773 weights: a partial NF4 block and a partial nested block
    ((3, 5, 70), "normal"),      # stacked, flat layout, 1050 weights
    ((1000, 640), "heavy"),      # 10000 absmax: 40 nested blocks
    ((7, 9), "normal"),          # smaller than one block, odd size
    ((96, 160), "heavy"),        # blocks straddle rows (160 = 2.5 blocks): see bnb_nf4
]


@pytest.mark.parametrize("shape, kind", SHAPES)
def test_double_quant_is_bit_identical_to_bitsandbytes(shape, kind):
    w = matrix(shape, kind)
    packed, state, back = bnb_nf4(w, double_quant=True)
    q = quant.quantize({"w": jnp.asarray(w)}, "w", double_quant=True)["w"]
    np.testing.assert_array_equal(jlora_codes(q, w.size), packed)
    np.testing.assert_array_equal(np.asarray(q.scales).reshape(-1), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(q.scales_scale), state.state2.absmax.numpy())
    assert np.float32(q.scales_offset) == state.offset.numpy()
    out = np.asarray(quant.dequantize(q))
    assert out.shape == w.shape and int(np.sum(out != back)) == 0
    np.testing.assert_array_equal(out, back)


@pytest.mark.parametrize("shape, kind", SHAPES)
def test_nf4_is_bit_identical_to_bitsandbytes(shape, kind):
    w = matrix(shape, kind, seed=1)
    packed, state, back = bnb_nf4(w, double_quant=False)
    q = quant.quantize({"w": jnp.asarray(w)}, "w")["w"]
    np.testing.assert_array_equal(jlora_codes(q, w.size), packed)
    np.testing.assert_array_equal(np.asarray(q.scales).reshape(-1), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), back)


def test_double_quant_zero_block_and_zero_tail():
    # an all-zero weight block (absmax 0) and a partial last block of zeros (bitsandbytes clamps its
    # absmax to 1e-38); an all-equal absmax array codes every value of a zero-absmax nested block to 0
    w = matrix((10, 100), "normal", seed=3)
    w[0, :64] = 0
    w.reshape(-1)[-40:] = 0
    flat_equal = np.ones((4, 64), np.float32)
    for x in (w, flat_equal):
        packed, state, back = bnb_nf4(x, double_quant=True)
        q = quant.quantize({"w": jnp.asarray(x)}, "w", double_quant=True)["w"]
        np.testing.assert_array_equal(jlora_codes(q, x.size), packed)
        np.testing.assert_array_equal(np.asarray(q.scales).reshape(-1), state.absmax.numpy())
        np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), back)


def test_double_quant_above_the_parallel_grain_with_one_torch_thread():
    # 34 000 absmax values (> 32768): bitsandbytes' offset then depends on torch's thread count;
    # with one thread every array matches
    w = matrix((1700, 1280), "normal", seed=5)
    with torch_threads(1):
        packed, state, back = bnb_nf4(w, double_quant=True)
    q = quant.quantize({"w": jnp.asarray(w)}, "w", double_quant=True)["w"]
    assert np.float32(q.scales_offset) == state.offset.numpy()
    np.testing.assert_array_equal(np.asarray(q.scales).reshape(-1), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), back)


def test_bfloat16_kernel_matches_bitsandbytes():
    w = torch.from_numpy(matrix((64, 192), "heavy", seed=2)).to(torch.bfloat16)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    back = bnb_f.dequantize_4bit(packed, state)  # bfloat16, as the kernel
    wj = jnp.asarray(w.float().numpy()).astype(jnp.bfloat16)
    q = quant.quantize({"w": wj}, "w", double_quant=True)["w"]
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
    assert back.dtype == torch.bfloat16 and q.dtype == jnp.bfloat16
    got = np.asarray(quant.dequantize(q, dtype=None).astype(jnp.float32))
    np.testing.assert_array_equal(got, back.float().numpy())
