"""The main job (examples/finetune_smollm.py) as a new user meets it: bad paths and options fail before any
slow work with the fix, the phases after training print one line each, results.json says what it measured,
and the transformers + PEFT check runs without third-party progress bars or warnings.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

import jlora
from examples import chat_sft, extraction
from examples import finetune_smollm as ft
from examples import smollm_report
from examples.models import smollm


def test_out_under_a_file_fails_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    out = tmp_path / "notes.txt" / "run"
    assert ft.main(["--out", str(out), "--steps", "1"]) == 2  # run() checks --out first: nothing else ran
    err = capsys.readouterr().err
    assert f"error: --out {out}: {tmp_path / 'notes.txt'} is a file, not a folder; fix:" in err


def test_targets_suggest_the_short_names(capsys):
    with pytest.raises(SystemExit) as e:
        ft.parse_args(["--targets", "qproj"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'qproj' is not a short name (closest: q_proj" in err
    assert "use short names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, attn, mlp, all)" in err


@pytest.mark.parametrize("argv, says", [(["--alpha", "-1"], "LoraConfig.alpha: expected a finite number > 0"),
                                        (["--lr", "0"], "--lr must be > 0"),
                                        (["--targets", "mlp,gateproj"], "'gateproj' is not a short name (closest: "
                                                                        "gate_proj")])
def test_bad_options_are_usage_errors(capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        ft.parse_args(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_rank_too_large_fails_on_shapes_alone(tmp_path, capsys):
    assert ft.main(["--rank", "1000", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "error: --rank: LoraConfig.rank: rank 1000 for 'params/layers_0/attn/" in err and "fix: use rank <=" in err
    assert not (tmp_path / "run").exists()


def test_targets_matching_no_kernel_fail_on_shapes_alone(tmp_path, capsys):
    code = ft.main(["--targets", r"params/layers_\d+/attn/qq/kernel", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "matched no parameter; closest paths: params/layers_" in err
    assert "the short names --targets accepts: q_proj, k_proj" in err
    assert not (tmp_path / "run").exists()  # nothing written, no weights read


def test_phase_prints_one_line_per_phase(capsys):
    with smollm_report.phase("saving") as done:
        done("adapter/ (8.9 MiB)")
    with pytest.raises(OSError), smollm_report.phase("exporting"):
        raise OSError("disk full")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("saving ... adapter/ (8.9 MiB) (") and lines[1] == "exporting ... failed"


def test_peft_check_is_quiet_and_says_what_it_measured(tmp_path, capfd):
    model, params, tok, chat = smollm.load_smollm()
    eos = smollm.eos_id()
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=r"params/layers_0/attn/(q_proj|v_proj)/kernel")
    frozen, lora = jlora.init(jax.random.key(0), params, cfg)
    lora = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape) * 0.02, lora)
    peft_dir = jlora.peft.save(tmp_path / "peft", lora, cfg, jlora.peft.LLAMA_KEY_MAP, task_type="CAUSAL_LM")
    test = extraction.make_examples(1, "test")
    merged = jlora.merge(frozen, lora, cfg)
    _, ids, _ = chat_sft.greedy_replies(ft.gen.base_forward(model.apply), model.config, merged, tok, chat,
                                        [ex.messages for ex in test], eos_id=eos, max_new_tokens=4)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check = smollm_report.peft_check(smollm.gguf_path(), peft_dir, model, params, lora, cfg, tok, chat, test,
                                         [ex.answer for ex in test], ids, eos, 4)
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == "", printed  # no progress bars, no logs, no warnings
    assert not [w for w in caught if "transformers" in w.filename or "peft" in w.filename], caught
    logits = check["logits"]
    assert set(logits) == {"max_abs_diff", "max_abs_logit", "tolerance", "within"}
    assert logits["tolerance"] == smollm_report.LOGIT_TOLERANCE and logits["within"] is True
    assert 0 < logits["max_abs_diff"] <= logits["tolerance"] and logits["max_abs_logit"] > 10
    assert check["greedy_replies"] == {"identical": 1, "n": 1}
    line = smollm_report.check_line(check)
    assert f"tolerance {logits['tolerance']:.1e}: within" in line and "identical greedy replies 1/1" in line
    assert np.isfinite(logits["max_abs_diff"])


def test_loftq_needs_the_nf4_base(capsys):
    with pytest.raises(SystemExit) as e:
        ft.parse_args(["--init", "loftq"])
    assert e.value.code == 2 and "--init loftq chooses a 4-bit base together with the factors: it needs --base nf4" \
        in capsys.readouterr().err
    assert ft.lora_config(ft.parse_args(["--init", "loftq", "--base", "nf4"])).init == "loftq"


def test_main_job_trains_on_the_gguf_blocks(tmp_path, capsys):
    """--base gguf: the frozen base is the file's Q4_1/Q8_0 blocks, in the compiled step too (its arguments hold
    the blocks, not the 513 MiB of float32 kernels), and the step trains (finite, falling loss)."""
    r = ft.run(ft.parse_args(["--base", "gguf", "--steps", "3", "--train-size", "16", "--batch-size", "2",
                              "--eval-size", "0", "--peft-check", "0", "--no-plot", "--lr", "2e-3",
                              "--out", str(tmp_path / "run")]))
    assert r["base"] == "gguf" and r["base_bytes"] < 100 * 2**20
    assert r["step_memory"]["args"] < 150 * 2**20, r["step_memory"]
    assert np.all(np.isfinite(r["losses"]))
    out = capsys.readouterr().out
    assert "frozen base" in out and "gguf, 92.1 MiB" in out


def test_frozen_base_nf4_quantizes_every_projection_not_just_the_targets():
    w = {"kernel": jax.numpy.ones((64, 64))}
    p = {"params": {"layers_0": {"attn": {"q_proj": w, "k_proj": w}, "mlp": {"up_proj": w}}}}
    cfg = jlora.LoraConfig(rank=2, targets=r".*/q_proj/kernel")
    frozen, lora = ft.frozen_base(jax.random.key(0), p, cfg, "nf4")
    layer = frozen["params"]["layers_0"]
    assert all(jlora.quant.is_quantized(x) for x in (layer["attn"]["q_proj"]["kernel"], layer["attn"]["k_proj"]["kernel"],
                                                    layer["mlp"]["up_proj"]["kernel"]))
    assert ft.tree_bytes(frozen) < 0.2 * ft.tree_bytes(p)
