"""examples/generate.py after the main job, as a new user runs it: ``--adapter DIR`` (orbax, PEFT, or the
run folder) and ``--chat`` (multi-turn, stdin), on SmolLM2's real weights.

Function-level tests use SmolLM2's first 2 layers (cheap); one subprocess runs the real CLI end to end
on the full model with piped stdin and 3 new tokens per reply.
"""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from examples import chat_sft, extraction
from examples import generate as gen
from examples.models import smollm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def short_model():
    """SmolLM2's real weights, first 2 of 30 layers (+ final norm, tied head)."""
    model, params, tok, chat = smollm.load_smollm()
    config = dataclasses.replace(model.config, num_hidden_layers=2)
    keep = {k: v for k, v in params["params"].items() if not k.startswith("layers_") or int(k[7:]) < 2}
    return type(model)(config), {"params": keep}, tok, chat


def _trained_adapter(params):
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=chat_sft.target_regexes("q_proj,v_proj"))
    _, lora = jlora.init(jax.random.key(0), params, cfg)
    lora = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape) * 0.05, lora)  # "trained"
    return lora, cfg


def test_adapter_folders_orbax_peft_and_run(short_model, tmp_path):
    model, params, _, _ = short_model
    lora, cfg = _trained_adapter(params)
    run = tmp_path / "run-000"  # what examples/finetune_smollm.py writes
    jlora.save_adapter(run / "adapter", lora, cfg, metadata={"system_prompt": extraction.INSTRUCTION})
    jlora.peft.save(run / "peft_adapter", lora, cfg, jlora.peft.LLAMA_KEY_MAP)
    want = {p: np.asarray(w, np.float64) for p, w in jlora.paths.flatten(params).items()}
    f = jlora.paths.flatten(lora)
    for p in jlora.kernel_layouts(lora):
        want[p] = want[p] + 2.0 * np.asarray(f[p + "/A"], np.float64) @ np.asarray(f[p + "/B"], np.float64)
    for where, kind in ((run, "orbax"), (run / "adapter", "orbax"), (run / "peft_adapter", "peft")):
        got_lora, got_cfg, meta, got_kind = gen.load_adapter(where, params)
        assert got_kind == kind
        assert meta.get("system_prompt") == (extraction.INSTRUCTION if kind == "orbax" else None)
        merged = jlora.paths.flatten(jlora.merge(params, got_lora, got_cfg))
        for p, w in want.items():
            np.testing.assert_allclose(np.asarray(merged[p]), w, rtol=1e-6, atol=1e-6, err_msg=f"{where}: {p}")


@pytest.mark.parametrize("bad", ["missing", "file", "empty"])
def test_bad_adapter_path_fails_before_the_model_loads(tmp_path, capsys, bad):
    path = tmp_path / bad
    if bad == "file":
        path.write_text("x")
    elif bad == "empty":
        path.mkdir()
    with pytest.raises(SystemExit) as e:
        gen.parse_args(["--adapter", str(path), "--chat"])  # parse_args never loads the model
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--adapter {path}" in err and "fix:" in err
    with pytest.raises(SystemExit):
        gen.parse_args(["--chat", "a prompt"])
    assert "--chat reads the user turns from stdin" in capsys.readouterr().err


def test_chat_is_multi_turn_and_stops_at_an_empty_line(short_model):
    model, params, tok, chat = short_model
    lora, cfg = _trained_adapter(params)
    weights = jlora.merge(params, lora, cfg)
    fwd, eos = gen.base_forward(model.apply), smollm.eos_id()
    out = io.StringIO()
    msgs = gen.chat_loop(fwd, model.config, weights, tok, chat, eos, io.StringIO("Hi there\nAnd again?\n\nnot read\n"),
                         out, system="Be brief.", max_new_tokens=4)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in msgs if m["role"] == "user"] == ["Hi there", "And again?"]
    text = out.getvalue()
    assert text.count("you> ") == 2 and text.count("assistant> ") == 2 and "not read" not in text
    # each turn sees the whole conversation: the same replies as a batch decoder given each history
    histories = [msgs[:2], msgs[:4]]
    want, _, _ = chat_sft.greedy_replies(fwd, model.config, weights, tok, chat, histories, eos_id=eos,
                                         max_new_tokens=4)
    assert [msgs[2]["content"], msgs[4]["content"]] == want
    for stop in ("exit\nnot read\n", ""):  # 'exit' and the end of input end it too
        assert gen.chat_loop(fwd, model.config, weights, tok, chat, eos, io.StringIO(stop), io.StringIO()) == []


def test_cli_chats_with_the_adapter_the_main_job_saved(tmp_path):
    """The README's step after the main job: `generate.py --adapter <run folder> --chat`, stdin piped."""
    q = "params/layers_0/attn/q_proj/kernel"
    frozen = jlora.paths.unflatten_dict({q: jax.ShapeDtypeStruct((576, 576), jnp.float32)})
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=q)
    _, lora = jlora.init(jax.random.key(0), frozen, cfg)
    lora = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape) * 0.01, lora)
    jlora.save_adapter(tmp_path / "run" / "adapter", lora, cfg, metadata={"system_prompt": extraction.INSTRUCTION})
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "examples/generate.py", "--adapter", str(tmp_path / "run"), "--chat",
                           "--max-new-tokens", "3"], input="Ana is 31 and lives in Oslo.\nexit\n", text=True,
                          capture_output=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"orbax adapter {tmp_path / 'run'}" in out and f"system: {extraction.INSTRUCTION}" in out
    assert "you> Ana is 31 and lives in Oslo." in out and out.count("assistant> ") == 1
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
