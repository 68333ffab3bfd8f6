"""Merged export to GGUF (jlora.quant.gguf_export, examples/export_gguf.py), read back by ``gguf`` and transformers.

References: ``gguf.GGUFReader`` and ``gguf.quants`` (llama.cpp's Python reader and codec) for the
file, jlora's own jnp Q8_0 quantizer (``jlora.quant._gguf``, a separate implementation) for the
values the file must hold, and transformers' GGUF loader for the served model's logits and greedy
replies (SmolLM2-135M-Instruct, a random rank-4 adapter, a CI-sized 3 prompts x 8 tokens).
"""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import jlora
from examples import export_gguf
from examples.models import smollm
from jlora import paths, quant
from jlora.quant import gguf_export
from jlora.quant import _gguf as quant_gguf

RNG = np.random.default_rng(0)
SRC = {  # name: (float values, stored type)
    "blk.0.attn_q.weight": (RNG.standard_normal((48, 64)).astype(np.float32), T.Q4_1),
    "blk.0.attn_norm.weight": (RNG.standard_normal(64).astype(np.float32), T.F32),
    "blk.0.odd.weight": (RNG.standard_normal((8, 40)).astype(np.float32), T.F16),
    "token_embd.weight": (RNG.standard_normal((100, 64)).astype(np.float32), T.Q8_0),
}


def _write_source(path) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_uint32("llama.block_count", 1)
    w.add_float32("llama.rope.freq_base", 1e5)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "<|im_end|>"])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 3])
    w.add_file_type(3)
    for name, (x, kind) in SRC.items():
        data = x if kind == T.F32 else x.astype(np.float16) if kind == T.F16 else gguf_quantize(x, kind)
        w.add_tensor(name, data, raw_dtype=kind if kind in (T.Q4_1, T.Q8_0) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _fields(reader) -> dict:
    return {f.name: (f.contents(), [int(t) for t in f.types]) for f in reader.fields.values()
            if not f.name.startswith("GGUF.")}


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src.gguf"
    _write_source(path)
    return path


@pytest.mark.parametrize("out_type", gguf_export.OUT_TYPES)
def test_round_trip_through_the_gguf_reader(source, tmp_path, out_type):
    given = {n: SRC[n][0] + 0.25 for n in ("blk.0.attn_q.weight", "blk.0.attn_norm.weight", "blk.0.odd.weight")}
    out = tmp_path / f"out-{out_type}.gguf"
    report = gguf_export.write_gguf(source, out, given, out_type)
    src, back = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(out))
    assert [t.name for t in back.tensors] == [t.name for t in src.tensors]
    assert _fields(back) == _fields(src)  # token_embd stays q8_0, odd stays f16 under q8_0: file_type kept
    tensors = {t.name: t for t in back.tensors}
    expect = {"f32": "f32", "f16": "f16", "q8_0": "q8_0"}[out_type]
    assert report["types"] == {"blk.0.attn_q.weight": expect, "blk.0.attn_norm.weight": "f32",
                               "blk.0.odd.weight": "f32" if out_type == "f32" else "f16", "token_embd.weight": "q8_0"}
    errs = []
    for name, x in given.items():
        t = tensors[name]
        assert t.tensor_type.name.lower() == report["types"][name]
        got = gguf_dequantize(t.data, t.tensor_type).reshape(x.shape)
        kind = report["types"][name]
        if kind == "q8_0":  # jlora's own jnp quantizer: an independent implementation of the same rounding
            want = np.asarray(quant_gguf.dequantize_rows(*quant_gguf.quantize_rows(jnp.asarray(x), "q8_0"), "q8_0"))
        else:
            want = x.astype(np.float16).astype(np.float32) if kind == "f16" else x
        np.testing.assert_array_equal(got, want)
        errs.append(np.abs(got.astype(np.float64) - x).max())
    assert report["max_abs_err"] == pytest.approx(max(errs), rel=1e-12)
    assert (report["max_abs_err"] == 0) == (out_type == "f32")
    np.testing.assert_array_equal(tensors["token_embd.weight"].data,
                                  {t.name: t for t in src.tensors}["token_embd.weight"].data)  # copied byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src.gguf", out.name])  # no temporary left


def test_file_type_follows_when_every_matrix_is_written(source, tmp_path):
    given = {n: x for n, (x, _) in SRC.items() if n != "blk.0.odd.weight"}
    given["blk.0.odd.weight"] = np.zeros((8, 40), np.float32)
    gguf_export.write_gguf(source, tmp_path / "a.gguf", given, "f16")
    assert gguf.GGUFReader(str(tmp_path / "a.gguf")).fields["general.file_type"].contents() == 1  # MOSTLY_F16


def test_never_overwrites_without_the_flag_and_bad_input(source, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    x = {"blk.0.attn_norm.weight": np.ones(64, np.float32)}
    with pytest.raises(FileExistsError, match=r"out.gguf exists; fix: another path, or overwrite=True"):
        gguf_export.write_gguf(source, out, x, "f16")
    assert out.read_bytes() == b"keep me"
    gguf_export.write_gguf(source, out, x, "f16", overwrite=True)
    assert gguf.GGUFReader(str(out)).tensors[1].data.tolist() == [1.0] * 64
    cases = [
        ({"blk.0.attn_qq.weight": np.ones((48, 64))}, "q8_0", r"'blk.0.attn_qq.weight' is not in src.gguf; closest "
                                                              r"names: blk.0.attn_q.weight"),
        ({"blk.0.attn_q.weight": np.ones((64, 48))}, "q8_0", r"shape \(64, 48\), the source's is \(48, 64\)"),
        ({"blk.0.attn_q.weight": np.full((48, 64), np.nan)}, "q8_0", r"non-finite values"),
        ({}, "q4_1", r"out_type must be one of \('f16', 'q8_0', 'f32'\), got 'q4_1'"),
    ]
    for tensors, kind, match in cases:
        with pytest.raises(ValueError, match=match):
            gguf_export.write_gguf(source, tmp_path / "bad.gguf", tensors, kind)
    with pytest.raises(ValueError, match="is the source file"):
        gguf_export.write_gguf(source, source, {}, "f16", overwrite=True)
    assert not (tmp_path / "bad.gguf").exists()


# --- SmolLM2: merge, export, read back with transformers ---------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    config, params = smollm.load_params(keep_quantized=True)
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=r"params/layers_\d+/(attn/(q_proj|v_proj)|mlp/down_proj)/kernel")
    _, lora = jlora.init(jax.random.key(0), params, cfg)
    lora = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape), lora)
    jlora.save_adapter(tmp / "adapter", lora, cfg)
    out = tmp / "merged.q8_0.gguf"
    args = export_gguf.parse_args(["--adapter", str(tmp / "adapter"), "--out", str(out), "--type", "q8_0",
                                   "--check", "3", "--max-new-tokens", "8"])
    result = export_gguf.run(args)
    merged = jlora.merge(params, lora, cfg, into="float")
    return out, result, merged, args


def test_export_holds_jlora_merge_rounded_to_q8_0(exported):
    out, result, merged, _ = exported
    _, back = smollm.load_params(out)
    kernels = jlora.quantize(merged, r".*/kernel", scheme="q8_0")  # blocks along the input axis, as GGUF's
    flat, want = paths.flatten(back), paths.flatten(kernels)
    for p, w in flat.items():
        ref = want[p]
        if quant.is_quantized(ref):
            ref = quant.dequantize(ref)
        elif p.endswith("/embedding"):  # token_embd blocks run along d (its last axis)
            codes, scales, mins, perm = quant_gguf.quantize_kernel(ref, 1, "q8_0")
            ref = quant_gguf.dequantize_kernel(codes, scales, mins, "q8_0", perm)
        np.testing.assert_array_equal(np.asarray(w), np.asarray(ref), err_msg=p)
    assert result["tensor_types"] == {"q8_0": 211, "f32": 61}
    assert 0 < result["max_rel_err"] <= 1 / 254 + 2**-11  # half a step of amax/127, plus d's float16 rounding
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    src = smollm.metadata()
    assert {k: v for k, v in smollm.metadata(out).items() if k != "general.file_type"} == \
           {k: v for k, v in src.items() if k != "general.file_type"}  # tokenizer, template, hparams kept


def test_transformers_reads_it_and_replies_as_jlora(exported):
    _, result, _, _ = exported
    c = result["check"]
    # the same weights on both sides: float32 rounding only (as tests/test_smollm.py's 1e-4)
    assert c["max_logit_diff_vs_jlora_file"] <= 1e-4 + 1e-5 * c["max_abs_logit"]
    assert c["same_greedy_as_jlora_file"] == c["n"] == 3
    assert all(len(ids) >= 1 for ids in c["hf_ids"])


def test_cli_refuses_an_existing_out(exported, capsys):
    out, _, _, args = exported
    assert export_gguf.main(["--adapter", args.adapter, "--out", str(out), "--check", "0"]) == 2
    assert "exists; fix: another --out, or --overwrite" in capsys.readouterr().err
