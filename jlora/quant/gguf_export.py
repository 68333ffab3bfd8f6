"""Write merged weights as a GGUF file for serving (llama.cpp, transformers' GGUF loader, ``gguf``).

:func:`write_gguf` takes the source GGUF the base came from and ``{GGUF tensor name: float array}``
of merged tensors (a model's name map gives them, e.g. ``examples.models.smollm.gguf_tensors``),
and writes a new file with the source's key/value metadata (architecture, hyper-parameters,
tokenizer, chat template) copied field by field, its tensors in the source's order under the
source's names, and only the tensor data and types changed:

- a given tensor with two or more axes is written in ``out_type`` (``'f16'``, ``'q8_0'`` or
  ``'f32'``); ``'q8_0'`` needs a last axis divisible by 32, else that tensor is written F16;
- a given 1-D tensor (norms) is written F32, as llama.cpp's converter does;
- a tensor not given is copied byte for byte with its own type (e.g. an adapter that did not
  touch the embedding leaves its Q8_0 blocks as they were).

``general.file_type`` is set to ``out_type``'s llama.cpp file type when every tensor with two or
more axes ends up in ``out_type``; otherwise it keeps the source's value. The quantization is
``gguf.quants.quantize`` (llama.cpp's own rounding); the returned report states what it cost:
each written tensor read back as the file holds it against the float tensor given.

The file is written next to ``out`` under a temporary name and renamed into place, so a crash
never leaves a partial file; an existing ``out`` is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OUT_TYPES", "write_gguf"]

OUT_TYPES = ("f16", "q8_0", "f32")
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


def _check(source: Path, out: Path, tensors: Mapping[str, Any], out_type: str, overwrite: bool, reader: Any) -> None:
    if out_type not in OUT_TYPES:
        raise ValueError(f"jlora.quant.gguf_export.write_gguf: out_type must be one of {OUT_TYPES}, got {out_type!r}; fix: "
                         "out_type='q8_0' (8.5 bits per weight) or 'f16'")
    if out.resolve() == source.resolve():
        raise ValueError(f"jlora.quant.gguf_export.write_gguf: out {out} is the source file; fix: write to another path")
    if out.exists() and not overwrite:
        raise FileExistsError(f"jlora.quant.gguf_export.write_gguf: {out} exists; fix: another path, or overwrite=True "
                              "to replace it")
    shapes = {t.name: tuple(int(n) for n in t.shape[::-1]) for t in reader.tensors}
    for name, x in tensors.items():
        if name not in shapes:
            close = sorted(shapes, key=lambda n: -len(os.path.commonprefix([n, name])))[:3]
            raise ValueError(f"jlora.quant.gguf_export.write_gguf: tensor {name!r} is not in {source.name}; closest names: "
                             f"{', '.join(close)}; fix: use the source file's tensor names (the model's name map)")
        shape = tuple(np.shape(x))
        if shape != shapes[name]:
            raise ValueError(f"jlora.quant.gguf_export.write_gguf: tensor {name!r} has shape {shape}, the source's is "
                             f"{shapes[name]} (GGUF layout: PyTorch's (out, in)); fix: transpose it as the "
                             "model's name map does")


def _encode(x: np.ndarray, out_type: str) -> tuple[np.ndarray, str]:
    """The bytes (or f16/f32 array) to write and the GGUF type actually used."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if x.ndim < 2 or out_type == "f32":
        return x.astype(np.float32), "f32"
    if out_type == "q8_0" and x.shape[-1] % 32 == 0:
        return quantize(x, T.Q8_0), "q8_0"
    return x.astype(np.float16), "f16"


def _decode(data: np.ndarray, kind: str) -> np.ndarray:
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    if kind == "q8_0":
        return dequantize(data, T.Q8_0)
    return data.astype(np.float32)


def _copy_fields(reader: Any, writer: Any, file_type: int | None) -> None:
    import gguf

    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer writes these itself
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(field.contents()))
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = file_type if field.name == gguf.Keys.General.FILE_TYPE and file_type is not None else field.contents()
        writer.add_key_value(field.name, value, vtype, sub_type=sub)


def _encode_all(tensors: Mapping[str, Any], out_type: str
                ) -> tuple[dict[str, tuple[np.ndarray, str]], dict[str, float]]:
    """Each given tensor encoded as ``out_type`` (``(data, type)``), and the errors of the encoded values
    read back (max abs, max relative per tensor, summed squares)."""
    encoded: dict[str, tuple[np.ndarray, str]] = {}
    err = {"max_abs_err": 0.0, "max_rel_err": 0.0, "sq_err": 0.0, "sq": 0.0}
    for name, x in tensors.items():
        x = np.ascontiguousarray(np.asarray(x, np.float32))
        if not np.all(np.isfinite(x)):
            raise ValueError(f"jlora.quant.gguf_export.write_gguf: tensor {name!r} has non-finite values; fix: check the "
                             "merge (an overflow in a low-precision dtype?)")
        encoded[name] = _encode(x, out_type)
        e = _decode(*encoded[name]).astype(np.float64) - x
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        err["max_abs_err"] = max(err["max_abs_err"], float(np.max(np.abs(e), initial=0.0)))
        err["max_rel_err"] = max(err["max_rel_err"], float(np.max(np.abs(e), initial=0.0)) / peak if peak else 0.0)
        err["sq_err"] += float(np.sum(e * e))
        err["sq"] += float(np.sum(x.astype(np.float64) ** 2))
    return encoded, err


def _write_file(reader: Any, out: Path, arch: str, encoded: Mapping[str, tuple[np.ndarray, str]],
                file_type: int | None) -> None:
    """Writes ``reader``'s fields and tensors to ``out`` (atomically), the ``encoded`` ones replaced."""
    import gguf

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch, endianess=reader.endianess)
        _copy_fields(reader, writer, file_type)
        for t in reader.tensors:
            if t.name in encoded:
                data, kind = encoded[t.name]
                raw = gguf.GGMLQuantizationType.Q8_0 if kind == "q8_0" else None
                writer.add_tensor(t.name, data, raw_dtype=raw)
            else:
                writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type,
                                  tensor_endianess=reader.endianess)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_gguf(source: str | os.PathLike, out: str | os.PathLike, tensors: Mapping[str, Any], out_type: str = "q8_0",
               *, overwrite: bool = False) -> dict[str, Any]:
    """Writes ``source`` with the given tensors replaced (see the module docstring for the rules).

    Args:
      source: the GGUF file the weights came from (metadata, tokenizer, names and order are its).
      out: the file to write.
      tensors: ``{tensor name: float array}`` in GGUF's layout (the shape ``GGUFReader`` reports,
        reversed: PyTorch's ``(out, in)`` for a matmul weight).
      out_type: ``'q8_0'``, ``'f16'`` or ``'f32'`` for the given tensors with two or more axes.
      overwrite: replace an existing ``out``.

    Returns:
      ``{"path", "bytes", "types": {name: written type}, "max_abs_err", "max_rel_err",
      "rel_rms_err"}``: the errors of the written values (read back from the encoded bytes)
      against ``tensors`` (``max_rel_err``: the largest of max |error| / max |value| per tensor;
      ``rel_rms_err``: over all given tensors); all 0 for ``'f32'``.

    >>> import tempfile, gguf
    >>> d = Path(tempfile.mkdtemp())
    >>> w = gguf.GGUFWriter(str(d / "src.gguf"), "llama")
    >>> w.add_tensor("w.weight", np.ones((2, 64), np.float32))
    >>> w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    >>> r = write_gguf(d / "src.gguf", d / "out.gguf", {"w.weight": np.full((2, 64), 0.5)}, "q8_0")
    >>> r["types"], r["max_abs_err"], gguf.GGUFReader(str(d / "out.gguf")).tensors[0].tensor_type.name
    ({'w.weight': 'q8_0'}, 3.0517578125e-05, 'Q8_0')

    With SmolLM2 (``examples/export_gguf.py`` does this after merging an adapter)::

      config, params = smollm.load_params()
      write_gguf(smollm.gguf_path(), "merged.q8_0.gguf", smollm.gguf_tensors(params, config), "q8_0")
    """
    import gguf

    source, out = Path(source), Path(out)
    if not source.is_file():
        raise FileNotFoundError(f"jlora.quant.gguf_export.write_gguf: source {source} is not a file; fix: the GGUF the base "
                                "was loaded from")
    reader = gguf.GGUFReader(str(source))
    _check(source, out, tensors, out_type, overwrite, reader)
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    encoded, err = _encode_all(tensors, out_type)
    types = {t.name: encoded[t.name][1] if t.name in encoded else t.tensor_type.name.lower() for t in reader.tensors}
    every = all(types[t.name] == out_type for t in reader.tensors if len(t.shape) >= 2)
    _write_file(reader, out, arch, encoded, _FILE_TYPE[out_type] if every else None)
    rel_rms = (err["sq_err"] / err["sq"]) ** 0.5 if err["sq"] else 0.0
    return {"path": str(out), "bytes": out.stat().st_size, "types": types, "max_abs_err": err["max_abs_err"],
            "max_rel_err": err["max_rel_err"], "rel_rms_err": rel_rms}
