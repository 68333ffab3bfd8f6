"""Crash and concurrency tests for jlora checkpoints, with real processes and real SIGKILLs.

Children are killed at named points (``$_JLORA_CHECKPOINT_PAUSE`` makes a child sleep there,
see ``jlora.io._files.pause_point``) and at random times. ``JLORA_CRASH_KILLS=N`` runs N random
kills per loop instead of 2 (and prints the outcome counts), for a longer soak.
"""

from __future__ import annotations

import collections
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
KILLS = int(os.environ.get("JLORA_CRASH_KILLS", "2"))
CFG = jlora.LoraConfig(rank=4, targets=".*")
ROWS = 256

_CHILD = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, optax, jlora
    from jlora import checkpoint as ckpt
    mode, path, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = jlora.LoraConfig(rank=4, targets=".*")
    tree = lambda v: {"w": {"A": jnp.full((rows, 4), v, jnp.float32), "B": jnp.full((4, 8), v, jnp.float32)}}
    try:
        if mode == "adapter":  # overwrite one adapter with each value in turn
            print("READY", flush=True)
            for v in sys.argv[4:]:
                ckpt.save_adapter(path, tree(float(v)), cfg, {"v": float(v)}, overwrite=True)
                print("SAVED", v, flush=True)
        else:  # train: save steps start.. with max_to_keep, or hold the directory open until stdin closes
            with ckpt.TrainCheckpointer(path, cfg, max_to_keep=int(sys.argv[5])) as tc:
                print("OPEN", flush=True)
                for s in range(int(sys.argv[4]), int(sys.argv[4]) + int(sys.argv[6])):
                    t = tree(float(s))
                    tc.save(s, t, optax.adam(1e-3).init(t), jax.random.key(s), metadata={"step": s})
                    print("SAVED", s, flush=True)
                if mode == "hold":
                    sys.stdin.read()
    except RuntimeError as e:
        print("REFUSED", e, flush=True)
        sys.exit(3)
    print("DONE", flush=True)
""")


def _spawn(tmp_path: Path, *args, pause: str | None = None) -> subprocess.Popen:
    env = {**ENV, "_JLORA_CHECKPOINT_PAUSE": pause} if pause else ENV
    err = open(tmp_path / f"child-{time.monotonic_ns()}.err", "w")  # a file: a full pipe would block
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *map(str, args)], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, stderr=err, text=True, env=env)
    err.close()
    proc.err_path = err.name
    return proc


def _wait_for(proc: subprocess.Popen, word: str) -> str:
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            raise AssertionError(f"child exited ({proc.returncode}) before {word!r}: "
                                 f"{Path(proc.err_path).read_text()[-3000:]}")
        if line.startswith(word):
            return line


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stdin.close()


def _tree(v: float) -> dict:
    return {"w": {"A": jnp.full((ROWS, 4), v, jnp.float32), "B": jnp.full((4, 8), v, jnp.float32)}}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _restored_value(path: Path) -> float:
    """The one value every leaf of the adapter at ``path`` holds; header and arrays must agree."""
    lora, cfg, meta = ckpt.restore_adapter(path)
    values = {float(v) for x in jax.tree.leaves(lora) for v in np.unique(np.asarray(x))}
    assert cfg == CFG and len(values) == 1 and values == {meta["v"]}, (values, meta)
    assert ckpt.read_adapter_header(path)["metadata"] == meta
    return meta["v"]


STAGES = {"adapter-written": 1.0, "adapter-committed": 1.0, "adapter-swapping": 2.0, "adapter-swapped": 2.0}


def test_overwrite_killed_at_each_point_loads_old_or_new(tmp_path):
    """SIGKILL at every point of save_adapter(overwrite=True), between its two renames included."""
    children = {}
    for stage in STAGES:  # one child per stage, all at once
        (tmp_path / stage).mkdir()
        ckpt.save_adapter(tmp_path / stage / "adapter", _tree(1.0), CFG, {"v": 1.0})
        children[stage] = _spawn(tmp_path, "adapter", tmp_path / stage / "adapter", ROWS, 2.0, pause=stage)
    for stage, expect in STAGES.items():
        name = tmp_path / stage / "adapter"
        _wait_for(children[stage], f"JLORA-PAUSED {stage}")
        if stage == "adapter-written":  # a second process saving meanwhile is refused and writes nothing
            before = _hidden(name.parent)
            with pytest.raises(RuntimeError, match=rf"save_adapter: another writer is using "
                                                   rf"'{re.escape(str(name))}' \(pid {children[stage].pid} on "
                                                   r".*fix: wait for the other save"):
                ckpt.save_adapter(name, _tree(5.0), CFG, {"v": 5.0}, overwrite=True)
            assert _hidden(name.parent) == before
        _kill(children[stage])  # the kernel drops a dead holder's lock
        assert _restored_value(name) == expect, stage  # never nothing, never a mix
        assert name.exists() == (stage != "adapter-swapping")  # killed between the renames: name gone
        assert [p.name for p in name.parent.iterdir() if not p.name.startswith(".")] in ([], ["adapter"])
        # the next save finishes the swap and removes every leftover (the lock file included)
        ckpt.save_adapter(name, _tree(3.0), CFG, {"v": 3.0}, overwrite=True)
        assert _restored_value(name) == 3.0 and _hidden(name.parent) == [], stage


def test_overwrite_killed_at_random_times(tmp_path):
    rng, outcomes = random.Random(0), collections.Counter()
    name, written = tmp_path / "adapter", {0.0}
    ckpt.save_adapter(name, _tree(0.0), CFG, {"v": 0.0})
    for kill in range(KILLS):
        values = [float(1000 * kill + i) for i in range(1, 500)]
        written |= set(values)
        child = _spawn(tmp_path, "adapter", name, ROWS, *values)
        _wait_for(child, "SAVED")
        time.sleep(rng.uniform(0, 0.4))
        _kill(child)
        state = ("killed between the renames" if not name.exists() else
                 "staging left" if any("-partial-" in h for h in _hidden(tmp_path)) else
                 "old copy left" if any("-old-" in h for h in _hidden(tmp_path)) else "no folder left")
        assert _restored_value(name) in written
        outcomes[state] += 1
    ckpt.save_adapter(name, _tree(-1.0), CFG, {"v": -1.0}, overwrite=True)
    assert _restored_value(name) == -1.0 and _hidden(tmp_path) == []
    if "JLORA_CRASH_KILLS" in os.environ:
        print(f"\nadapter overwrite: {KILLS} kills, all restored a complete adapter: {dict(outcomes)}")


def test_two_processes_overwriting_at_once(tmp_path):
    """Both race to overwrite one adapter many times: each save succeeds or is refused, nothing else."""
    name = tmp_path / "adapter"
    ckpt.save_adapter(name, _tree(0.0), CFG, {"v": 0.0})
    procs = [_spawn(tmp_path, "adapter", name, ROWS, *[float(k * 1000 + i) for i in range(1, 7)])
             for k in (1, 2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode in (0, 3), Path(p.err_path).read_text()[-3000:]
        assert p.returncode == 0 or "another writer is using" in out
    assert "REFUSED" in "".join(outs) or all(o.count("SAVED") == 6 for o in outs)
    assert _restored_value(name) in {float(k * 1000 + i) for k in (1, 2) for i in range(1, 7)}
    assert _hidden(tmp_path) == []


def _check_steps(root: Path) -> list[int]:
    """Opens ``root`` and restores every listed step: values, rng and metadata of that very step."""
    like = jax.eval_shape(lambda: _tree(0.0))
    with ckpt.TrainCheckpointer(root, CFG) as tc:
        steps = tc.all_steps()
        for s in steps:
            state = tc.restore(like, jax.eval_shape(optax.adam(1e-3).init, like), step=s)
            assert state.metadata == {"step": s}
            for x in jax.tree.leaves(state.lora):
                np.testing.assert_array_equal(np.asarray(x), np.full(x.shape, float(s), np.float32))
            assert jax.random.key_data(state.rng).tolist() == jax.random.key_data(jax.random.key(s)).tolist()
    assert [p.name for p in root.iterdir() if not p.name.isdigit()] == [], list(root.iterdir())
    return steps


def test_training_killed_while_dropping_an_old_step(tmp_path):
    root = tmp_path / "run"
    child = _spawn(tmp_path, "train", root, ROWS, 0, 1, 5, pause="train-purging")
    _wait_for(child, "JLORA-PAUSED")  # step 0 was renamed into the trash; its removal starts
    _kill(child)
    assert (root / ".jlora-deleted").is_dir()
    assert _check_steps(root) == [1]  # the dropped step is never listed, its leftovers are gone


def test_training_killed_at_random_times(tmp_path):
    rng, outcomes = random.Random(1), collections.Counter()
    root, start = tmp_path / "run", 0
    for _ in range(KILLS):
        child = _spawn(tmp_path, "train", root, ROWS, start, 2, 100)
        _wait_for(child, "SAVED")
        _wait_for(child, "SAVED")  # the first step is on disk once the second save has begun
        time.sleep(rng.uniform(0, 0.6))
        _kill(child)
        debris = {"unfinished save" if "orbax-checkpoint-tmp" in p.name else p.name
                  for p in root.iterdir() if not p.name.isdigit() and p.name != ".jlora-lock"}
        steps = _check_steps(root)
        assert steps and len(steps) <= 3
        outcomes[f"{len(steps)} steps listed; left: {', '.join(sorted(debris)) or 'nothing'}"] += 1
        start = steps[-1] + 1
    if "JLORA_CRASH_KILLS" in os.environ:
        print(f"\ntraining: {KILLS} kills, every listed step restored exactly: {dict(outcomes)}")


def test_half_deleted_step_is_never_listed(tmp_path):
    """A step directory an older delete left half-removed (files gone, name still there)."""
    root = tmp_path / "run"
    t = _tree(0.0)
    with ckpt.TrainCheckpointer(root, CFG, max_to_keep=None) as tc:
        for s in range(3):
            t = _tree(float(s))
            tc.save(s, t, optax.adam(1e-3).init(t), jax.random.key(s), metadata={"step": s})
    for f in sorted(p for p in (root / "1").rglob("*") if p.is_file())[::2]:
        f.unlink()
    (root / "7").mkdir()
    (root / "7" / "notes.txt").write_text("not a jlora step: never listed, never removed")
    assert _check_steps(root) == [0, 2]
    assert not (root / "1").exists() and (root / "7" / "notes.txt").is_file()
    with ckpt.TrainCheckpointer(root, CFG) as tc:
        with pytest.raises(ValueError, match=r"no step 1 in '.*run' \(saved: \[0, 2\]\); fix: pass one of"):
            tc.restore(t, optax.adam(1e-3).init(t), step=1)


def test_two_train_checkpointers_on_one_directory(tmp_path):
    root = tmp_path / "run"
    holder = _spawn(tmp_path, "hold", root, ROWS, 0, 3, 1)
    _wait_for(holder, "SAVED")
    second = _spawn(tmp_path, "train", root, ROWS, 5, 3, 1)
    out, _ = second.communicate(timeout=120)  # refused at open: no orbax manager, no hang at exit
    assert second.returncode == 3, Path(second.err_path).read_text()[-3000:]
    assert f"another writer is using '{root}'" in out and "pass read_only=True to only restore" in out
    with pytest.raises(RuntimeError, match="TrainCheckpointer: another writer is using"):
        ckpt.TrainCheckpointer(root, CFG)
    like = jax.eval_shape(lambda: _tree(0.0))
    with ckpt.TrainCheckpointer(root, CFG, read_only=True) as reader:  # an evaluator may read
        assert reader.restore(like, jax.eval_shape(optax.adam(1e-3).init, like)).step == 0
        with pytest.raises(ValueError, match="opened with read_only=True; fix: open it without"):
            reader.save(9, _tree(0.0), None)
    holder.stdin.close()
    assert holder.wait(timeout=120) == 0 and "DONE" in holder.stdout.read()
    holder.stdout.close()
    assert _check_steps(root) == [0]


def test_train_lock_released_by_close(tmp_path):
    """(Released by death: every test above reopens a directory right after SIGKILLing its writer.)"""
    root = tmp_path / "run"
    first = ckpt.TrainCheckpointer(root, CFG)
    with pytest.raises(RuntimeError, match=r"fix: close the other TrainCheckpointer"):
        ckpt.TrainCheckpointer(root, CFG)
    first.close()
    first.close()  # idempotent
    with pytest.raises(ValueError, match="is closed; fix: open a new TrainCheckpointer"):
        first.save(0, _tree(0.0), None)
    ckpt.TrainCheckpointer(root, CFG).close()
    assert list(root.iterdir()) == []
