"""Tests for jlora.checkpoint: adapter save/restore on orbax and resumable training."""

from __future__ import annotations

import hashlib
import os
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
CFG = jlora.LoraConfig(rank=4, alpha=8.0, targets=r".*/kernel", trainable=r".*/head/bias")


def _params(d=16, h=32, seed=0):
    rng = np.random.default_rng(seed)
    mk = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    return {"params": {"up": {"kernel": mk(d, h), "bias": mk(h)},
                       "down": {"kernel": mk(h, d), "bias": mk(d)},
                       "head": {"kernel": mk(d, 8), "bias": mk(8)}}}


def _lora(params=None, cfg=CFG, seed=1):
    frozen, lora = jlora.init(jax.random.key(seed), params or _params(), cfg)
    # make B non-zero so a restore that loses data cannot pass
    return frozen, jax.tree.map(lambda x: x + 0.5, lora)


def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _equal(a, b):
    fa, fb = jlora.paths.flatten(a), jlora.paths.flatten(b)
    assert fa.keys() == fb.keys()
    for p in fa:
        np.testing.assert_array_equal(np.asarray(fa[p]), np.asarray(fb[p]), err_msg=p)
        assert fa[p].dtype == fb[p].dtype, p


def test_roundtrip_size_and_no_config_needed(tmp_path):
    frozen, lora = _lora(_params(d=128, h=256))
    saved = {p: np.array(x) for p, x in jlora.paths.flatten(lora).items()}  # copies before saving
    size = ckpt.save_adapter(tmp_path / "a", lora, CFG, {"base": "toy", "step": 7})
    factor_bytes = sum(x.nbytes for x in jax.tree.leaves(lora))
    frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
    on_disk = sum(p.stat().st_size for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert size == on_disk
    # factors + metadata only: never the base (orbax/json/manifest overhead is a few KiB).
    assert factor_bytes <= size < factor_bytes + 32 * 1024, (size, factor_bytes)
    assert size < frozen_bytes / 4, (size, frozen_bytes)
    restored, cfg, meta = ckpt.restore_adapter(tmp_path / "a")
    for p, x in jlora.paths.flatten(restored).items():
        np.testing.assert_array_equal(np.asarray(x), saved[p], err_msg=p)
        assert x.dtype == saved[p].dtype, p
    assert cfg == CFG and meta == {"base": "toy", "step": 7}
    # the restored adapter works with the core: merged = W + alpha/r * A @ B in float64 from the
    # numpy copies taken before saving (an independent reference, not jlora against itself)
    for name in ("up", "down", "head"):
        w = np.asarray(frozen["params"][name]["kernel"], np.float64)
        a, b = (np.asarray(saved[f"params/{name}/kernel/{k}"], np.float64) for k in "AB")
        np.testing.assert_allclose(np.asarray(jlora.merge(frozen, restored, cfg)["params"][name]["kernel"]),
                                   w + CFG.alpha / CFG.rank * a @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(restored["params"]["head"]["bias"]), saved["params/head/bias"])
    # validated against the template and the frozen model it belongs to
    ckpt.restore_adapter(tmp_path / "a", like=jax.eval_shape(lambda: lora), frozen=frozen)


def test_bf16_and_header(tmp_path):
    _, lora = _lora()
    lora = jax.tree.map(lambda x: x.astype(jnp.bfloat16), lora)
    ckpt.save_adapter(tmp_path / "a", lora, CFG)
    restored, _, meta = ckpt.restore_adapter(tmp_path / "a")
    _equal(restored, lora)
    head = ckpt.read_adapter_header(tmp_path / "a")
    assert head["leaves"]["params/up/kernel/A"] == {"shape": [16, 4], "dtype": "bfloat16"}
    assert meta == {}


def test_never_silently_overwrites(tmp_path):
    _, lora = _lora()
    ckpt.save_adapter(tmp_path / "a", lora, CFG)
    before = _tree_hash(tmp_path / "a")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        ckpt.save_adapter(tmp_path / "a", jax.tree.map(lambda x: x * 2, lora), CFG)
    assert _tree_hash(tmp_path / "a") == before
    ckpt.save_adapter(tmp_path / "a", jax.tree.map(lambda x: x * 2, lora), CFG, overwrite=True)
    _equal(ckpt.restore_adapter(tmp_path / "a")[0], jax.tree.map(lambda x: x * 2, lora))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a jlora adapter checkpoint"):
        ckpt.save_adapter(tmp_path / "mine", lora, CFG, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_restore_never_modifies(tmp_path):
    frozen, lora = _lora()
    ckpt.save_adapter(tmp_path / "a", lora, CFG)
    before = _tree_hash(tmp_path)
    ckpt.restore_adapter(tmp_path / "a", like=lora, frozen=frozen)
    ckpt.read_adapter_header(tmp_path / "a")
    assert _tree_hash(tmp_path) == before
    tx = optax.adam(1e-3)
    with ckpt.TrainCheckpointer(tmp_path / "run", CFG) as tc:
        tc.save(1, lora, tx.init(lora), jax.random.key(0))
    before = _tree_hash(tmp_path / "run")
    with ckpt.TrainCheckpointer(tmp_path / "run", CFG) as tc:
        tc.restore(lora, tx.init(lora))
    assert _tree_hash(tmp_path / "run") == before


def test_mismatch_errors_name_path_and_shapes(tmp_path):
    frozen, lora = _lora()
    ckpt.save_adapter(tmp_path / "a", lora, CFG)
    # different rank
    _, lora8 = jlora.init(jax.random.key(0), frozen, CFG.replace(rank=8))
    with pytest.raises(ValueError, match=r"'params/down/kernel/A': shape \(32, 4\) \(rank 4\) does not "
                                         r"match the target's \(32, 8\) \(rank 8\)"):
        ckpt.restore_adapter(tmp_path / "a", like=lora8)
    # different paths (targets)
    _, other = jlora.init(jax.random.key(0), frozen, CFG.replace(targets=r".*/up/kernel"))
    with pytest.raises(ValueError, match=r"only in the checkpoint '.*': params/down/kernel/A"):
        ckpt.restore_adapter(tmp_path / "a", like=other)
    # different model shapes (frozen): named path and both shapes
    wider = _params(d=16, h=48)
    with pytest.raises(ValueError,
                       match=r"does not fit the frozen model.*params/down/kernel.*\(32, 4\).*\(48, 16\)"):
        ckpt.restore_adapter(tmp_path / "a", frozen=wider)
    # not an adapter / missing
    with pytest.raises(ValueError, match="no adapter checkpoint at"):
        ckpt.restore_adapter(tmp_path / "nothing")
    with pytest.raises(TypeError, match="metadata must be JSON-serialisable"):
        ckpt.save_adapter(tmp_path / "b", lora, CFG, {"x": object()})


def _data_files(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and "/d/" in str(p) and p.stat().st_size > 0]


def test_corrupted_or_truncated_is_a_clear_error(tmp_path):
    _, lora = _lora()
    for name in ("trunc", "flip", "nomanifest", "missing"):
        ckpt.save_adapter(tmp_path / name, lora, CFG)
    f = _data_files(tmp_path / "trunc")[0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupted or truncated: .* has .* bytes, expected"):
        ckpt.restore_adapter(tmp_path / "trunc")
    # without the sha256 check the damaged data still gives a ValueError, not garbage
    with pytest.raises(ValueError, match="cannot read the arrays"):
        ckpt.restore_adapter(tmp_path / "trunc", verify=False)
    f = _data_files(tmp_path / "flip")[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted: .* does not match its sha256"):
        ckpt.restore_adapter(tmp_path / "flip")
    (tmp_path / "nomanifest" / ckpt.MANIFEST).unlink()
    with pytest.raises(ValueError, match="incomplete save or not a jlora adapter"):
        ckpt.restore_adapter(tmp_path / "nomanifest")
    _data_files(tmp_path / "missing")[0].unlink()
    with pytest.raises(ValueError, match="corrupted: missing file"):
        ckpt.restore_adapter(tmp_path / "missing")


_SAVER = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np, optax, jlora
    from jlora import checkpoint as ckpt
    cfg = jlora.LoraConfig(rank=64, targets=".*")
    big = {"w": {"A": jnp.asarray(np.random.default_rng(0).normal(size=(int(sys.argv[3]), 64)), jnp.float32),
                 "B": jnp.ones((64, 8))}}
    if sys.argv[1] == "adapter":
        print("SAVING", flush=True)
        ckpt.save_adapter(sys.argv[2], big, cfg)
    else:
        tx = optax.adam(1e-3)
        tc = ckpt.TrainCheckpointer(sys.argv[2], cfg, async_save=True)
        tc.save(0, big, tx.init(big), jax.random.key(0)); tc.wait_until_finished()
        print("SAVING", flush=True)
        tc.save(1, jax.tree.map(lambda x: x + 1, big), tx.init(big), jax.random.key(1))
        tc.wait_until_finished()
    print("DONE", flush=True)
""")


def _kill_mid_save(kind: str, target, marker) -> tuple[Path, int] | None:
    """Runs a saving subprocess and SIGKILLs it as soon as ``marker(path)`` sees a partial save.

    ``target(rows)`` gives a fresh path per attempt; a second, larger attempt runs only if the
    first save finished before the kill landed. Returns (path, rows) of the killed attempt.
    """
    for rows in (200_000, 400_000):  # 51 MB / 102 MB of factors
        path = target(rows)
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, kind, str(path), str(rows)],
                                stdout=subprocess.PIPE, text=True, env=ENV)
        assert proc.stdout.readline().strip() == "SAVING"
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline and not marker(path):
            time.sleep(0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            return path, rows
    return None


def test_killed_adapter_save_is_never_loaded(tmp_path):
    _, lora = _lora()
    ckpt.save_adapter(tmp_path / "good", lora, CFG)
    good = _tree_hash(tmp_path / "good")
    partial = lambda path: any(p.name.startswith(f".{path.name}.jlora-partial-") for p in tmp_path.iterdir())
    killed = _kill_mid_save("adapter", lambda rows: tmp_path / f"bad{rows}", partial)
    assert killed, "the save finished before the kill"
    bad = killed[0]
    assert not bad.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(f".{bad.name}.jlora-partial-")]
    with pytest.raises(ValueError, match=rf"no adapter checkpoint at '.*{bad.name}'; found incomplete save"):
        ckpt.restore_adapter(bad)
    assert _tree_hash(tmp_path / "good") == good
    _equal(ckpt.restore_adapter(tmp_path / "good")[0], lora)


def test_killed_training_save_keeps_previous_step(tmp_path):
    import orbax.checkpoint as ocp
    tmp_step = lambda root: root.is_dir() and any(ocp.step.is_tmp_checkpoint(p) for p in root.iterdir())
    killed = _kill_mid_save("train", lambda rows: tmp_path / f"run{rows}", tmp_step)
    assert killed, "the save finished before the kill"
    root, rows = killed
    leftovers = [p for p in root.iterdir() if ocp.step.is_tmp_checkpoint(p)]
    assert leftovers and all("orbax-checkpoint-tmp" in p.name for p in leftovers)
    cfg = jlora.LoraConfig(rank=64, targets=".*")
    like = {"w": {"A": jax.ShapeDtypeStruct((rows, 64), jnp.float32),
                  "B": jax.ShapeDtypeStruct((64, 8), jnp.float32)}}
    with ckpt.TrainCheckpointer(root, cfg) as tc:
        assert tc.all_steps() == [0]
        state = tc.restore(like, jax.eval_shape(optax.adam(1e-3).init, like))
    assert state.step == 0
    np.testing.assert_array_equal(np.asarray(state.lora["w"]["B"]), np.ones((64, 8)))
    assert jax.random.key_data(state.rng).tolist() == jax.random.key_data(jax.random.key(0)).tolist()


def _loss(frozen, lora, x, y):
    pred = jlora.lora_apply(lambda p, x: jnp.tanh(x @ p["params"]["up"]["kernel"]) @ p["params"]["down"]["kernel"],
                            CFG, mode="merged")(frozen, lora, x)
    return jnp.mean((pred - y) ** 2)


def _train(frozen, lora, opt_state, rng, tx, steps):
    @jax.jit
    def step(lora, opt_state, rng):
        rng, kx = jax.random.split(rng)
        x = jax.random.normal(kx, (8, 16))
        y = jnp.sin(x)
        loss, g = jax.value_and_grad(_loss, argnums=1)(frozen, lora, x, y)
        updates, opt_state = tx.update(g, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, rng, loss

    losses = []
    for _ in range(steps):
        lora, opt_state, rng, loss = step(lora, opt_state, rng)
        losses.append(float(loss))
    return lora, opt_state, rng, losses


def test_resumed_run_continues_exactly(tmp_path):
    frozen, lora = jlora.init(jax.random.key(1), _params(), CFG)
    tx = optax.adamw(1e-2)
    _, _, _, full = _train(frozen, lora, tx.init(lora), jax.random.key(5), tx, 8)
    # interrupted run: 4 steps, saving every step (async, keep last 2), then a fresh process state
    with ckpt.TrainCheckpointer(tmp_path / "run", CFG, max_to_keep=2) as tc:
        lo, op, rng, first = lora, tx.init(lora), jax.random.key(5), []
        for i in range(4):
            lo, op, rng, l = _train(frozen, lo, op, rng, tx, 1)
            first += l
            tc.save(i + 1, lo, op, rng, metadata={"loss": l[0]})
    with ckpt.TrainCheckpointer(tmp_path / "run", CFG, max_to_keep=2) as tc:
        assert tc.all_steps() == [3, 4]
        with pytest.raises(FileExistsError, match="step 4 already exists"):
            tc.save(4, lo, op, rng)
        like_l = jax.eval_shape(lambda: lora)
        state = tc.restore(like_l, jax.eval_shape(tx.init, like_l))
        _, lora8 = jlora.init(jax.random.key(0), frozen, CFG.replace(rank=8))
        with pytest.raises(ValueError, match=r"step 4 .* leaf 'params/down/kernel/A': shape \(32, 4\) \(rank 4\) "
                                             r"does not match the target's \(32, 8\) \(rank 8\)"):
            tc.restore(lora8, tx.init(lora8))
        with pytest.raises(ValueError, match="saved with config"):
            ckpt.TrainCheckpointer(tmp_path / "run", CFG.replace(rank=2), read_only=True).restore(like_l, None)
    assert state.step == 4 and state.metadata == {"loss": first[-1]}
    _, _, _, rest = _train(frozen, state.lora, state.opt_state, state.rng, tx, 4)
    assert first + rest == full  # bit-identical continuation


_EIGHT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jlora import checkpoint as ckpt, sharding
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    base = {"params": {"up": {"kernel": P(None, "model"), "bias": P("model")},
                       "down": {"kernel": P("model", None), "bias": P()},
                       "head": {"kernel": P(), "bias": P()}}}
    # restore the 1-device checkpoint straight into 8-device shardings
    header = ckpt.read_adapter_header(sys.argv[1])
    abstract = {p: jax.ShapeDtypeStruct(v["shape"], v["dtype"]) for p, v in header["leaves"].items()}
    from jlora import paths
    abstract = paths.unflatten_dict(abstract)
    shard = sharding.lora_shardings(base, abstract, header["config"], mesh=mesh)
    lora, cfg, meta = ckpt.restore_adapter(sys.argv[1], shardings=shard)
    assert lora["params"]["up"]["kernel"]["B"].sharding.spec == P(None, "model")
    assert lora["params"]["down"]["kernel"]["A"].sharding.spec == P("model", None)
    assert len(lora["params"]["up"]["kernel"]["B"].sharding.device_set) == 8
    np.save(sys.argv[3], np.asarray(lora["params"]["down"]["kernel"]["A"]))
    # save from 8 devices (values doubled) for the 1-device restore
    ckpt.save_adapter(sys.argv[2], jax.tree.map(lambda x: x * 2, lora), cfg, meta)
    print("OK")
""")


def test_eight_devices_to_one_and_back(tmp_path):
    _, lora = _lora()
    ckpt.save_adapter(tmp_path / "one", lora, CFG, {"from": "1 device"})
    run = subprocess.run([sys.executable, "-c", _EIGHT, str(tmp_path / "one"), str(tmp_path / "eight"),
                          str(tmp_path / "a.npy")], capture_output=True, text=True, env=ENV, timeout=120,
                         check=False)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.asarray(lora["params"]["down"]["kernel"]["A"]))
    restored, cfg, meta = ckpt.restore_adapter(tmp_path / "eight")
    _equal(restored, jax.tree.map(lambda x: x * 2, lora))
    assert cfg == CFG and meta == {"from": "1 device"}
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(restored))


_TWO_HOSTS = textwrap.dedent("""
    import os, sys
    pid, port, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
    import numpy as np, optax, jlora
    from jax.sharding import Mesh, PartitionSpec as P
    from jlora import checkpoint as ckpt, sharding
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    params = {"up": {"kernel": np.ones((16, 32), np.float32)}, "down": {"kernel": np.ones((32, 16), np.float32)}}
    specs = {"up": {"kernel": P(None, "model")}, "down": {"kernel": P("model", None)}}
    cfg = jlora.LoraConfig(rank=4, targets=".*kernel")
    make = lambda k, p: jax.tree.map(lambda x: x + 1.0, jlora.init(k, p, cfg)[1])
    abstract = jax.eval_shape(make, jax.random.key(0), params)
    shard = sharding.lora_shardings(specs, abstract, cfg, mesh=mesh)
    lora = jax.jit(make, out_shardings=shard)(jax.random.key(0), params)   # spans both processes
    assert not lora["up"]["kernel"]["B"].is_fully_addressable
    ckpt.save_adapter(f"{root}/adapter", lora, cfg, {"hosts": 2})
    back, cfg2, meta = ckpt.restore_adapter(f"{root}/adapter", shardings=shard)
    equal = lambda a, b: jax.tree.reduce(lambda x, y: x & y, jax.tree.map(lambda u, v: (u == v).all(), a, b))
    same = jax.jit(equal, out_shardings=jax.sharding.NamedSharding(mesh, P()))(lora, back)
    assert bool(same) and cfg2 == cfg and meta == {"hosts": 2}
    tx = optax.adam(1e-3)
    opt_sh = sharding.state_shardings(jax.eval_shape(tx.init, abstract), abstract, shard)
    opt = jax.jit(tx.init, out_shardings=opt_sh)(lora)
    with ckpt.TrainCheckpointer(f"{root}/run", cfg) as tc:
        tc.save(1, lora, opt, jax.random.key(3))
        tc.wait_until_finished()
        state = tc.restore(back, opt)
    assert state.step == 1 and state.lora["down"]["kernel"]["A"].sharding.spec == P("model", None)
    print("OK", pid, flush=True)
""")


def test_two_processes(tmp_path):
    """jax.distributed with 2 CPU processes x 4 devices: save/restore of arrays spanning both."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_HOSTS, str(i), port, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {i}" in out, err[-3000:]
    # one adapter, written by both processes, readable by a single process on one device
    lora, cfg, meta = ckpt.restore_adapter(tmp_path / "adapter")
    assert meta == {"hosts": 2} and lora["up"]["kernel"]["B"].shape == (4, 32)
    np.testing.assert_array_equal(np.asarray(lora["up"]["kernel"]["B"]), np.ones((4, 32)))


def test_save_refuses_a_config_that_does_not_describe_the_tree(tmp_path):
    _, lora = _lora()  # CFG: rank 4 on every kernel, head/bias trained whole
    bad = {
        r"lora factor 'params/down/kernel/A' has rank 4 \(last axis 4\), the config gives rank 8 for "
        r"'params/down/kernel'; fix: pass the LoraConfig the tree was made with": CFG.replace(rank=8),
        r"'params/up/kernel/A' has rank 4 .* gives rank 2": CFG.replace(rank_pattern={".*/up/.*": 2}),
        r"lora leaf 'params/down/kernel/A' adapts 'params/down/kernel', which the config's targets "
        r"\['.\*/up/kernel'\] \(exclude \[\]\) do not select": CFG.replace(targets=r".*/up/kernel"),
        r"'params/head/kernel/A' adapts .* \(exclude \['.\*/head/kernel'\]\)": CFG.replace(exclude=r".*/head/kernel"),
        r"lora leaf 'params/head/bias' is trained whole, but the config's trainable \[\] does not "
        r"match it; fix:": CFG.replace(trainable=()),
    }
    for message, cfg in bad.items():
        with pytest.raises(ValueError, match="save_adapter: .*" + message):
            ckpt.save_adapter(tmp_path / "a", lora, cfg)
        assert list(tmp_path.iterdir()) == []  # refused before writing anything
    # fused kernels: A's last axis is rank x enabled groups
    fused = jlora.LoraConfig(rank=2, targets=".*kernel", fused={".*qkv.*": (True, False, True)})
    _, flora = jlora.init(jax.random.key(0), {"qkv": {"kernel": jnp.ones((8, 12))}}, fused)
    assert flora["qkv"]["kernel"]["A"].shape == (8, 4)
    ckpt.save_adapter(tmp_path / "fused", flora, fused)
    with pytest.raises(ValueError, match=r"'qkv/kernel/A' has rank 1 \(last axis 4 over 4 enabled groups\), "
                                         r"the config gives rank 2"):
        ckpt.save_adapter(tmp_path / "f2", flora, fused.replace(fused={".*qkv.*": (True,) * 4}))
    dora = dict(flora["qkv"]["kernel"], m=jnp.ones(12))
    with pytest.raises(ValueError, match=r"'qkv/kernel/m' is a DoRA magnitude, but the config has use_dora=False"):
        ckpt.save_adapter(tmp_path / "d", {"qkv": {"kernel": dora}}, fused)


def _rewrite_header(directory: Path, edit) -> None:
    """Edits the header file and re-signs the manifest, so only the header itself is bad."""
    from jlora.io import _files as ckpt_io
    f = directory / "jlora" / "metadata"
    f.write_bytes(edit(f.read_bytes()))
    (directory / ckpt.MANIFEST).unlink()
    ckpt_io.write_manifest(directory)


def test_header_errors_name_the_function_called_and_the_fix(tmp_path):
    _, lora = _lora()
    with pytest.raises(ValueError, match=r"read_adapter_header: no adapter checkpoint at '.*nothing'; fix: pass "
                                         r"the directory given to save_adapter \('.*' holds no adapter"):
        ckpt.read_adapter_header(tmp_path / "nothing")
    for name in ("a", "utf8", "json", "config"):
        ckpt.save_adapter(tmp_path / name, lora, CFG)
    with pytest.raises(ValueError, match=r"restore_adapter: no adapter checkpoint at '.*nothing'; fix: pass the "
                                         r"directory given to save_adapter \(adapter checkpoints in '.*': a, config, "
                                         r"json, utf8\)"):
        ckpt.restore_adapter(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"restore_adapter: no adapter .*'.*/nowhere' does not exist"):
        ckpt.restore_adapter(tmp_path / "nowhere" / "a")
    _rewrite_header(tmp_path / "utf8", lambda b: b.replace(b'"rank"', b'"r\xffnk"'))
    _rewrite_header(tmp_path / "json", lambda b: b[: len(b) // 2])
    _rewrite_header(tmp_path / "config", lambda b: b.replace(b'"rank": 4', b'"rank": -4'))
    for fn in (ckpt.read_adapter_header, ckpt.restore_adapter):
        who = fn.__name__
        with pytest.raises(ValueError, match=rf"{who}: the header in '.*utf8/jlora' is not UTF-8 text \(byte 0xff "
                                             r"at offset \d+\): the checkpoint is damaged; fix: restore from"):
            fn(tmp_path / "utf8")
        with pytest.raises(ValueError, match=rf"{who}: the header in '.*json/jlora' is not valid JSON \(.* at line "):
            fn(tmp_path / "json")
        with pytest.raises(ValueError, match=rf"{who}: the header in '.*config/jlora' does not hold a valid "
                                             r"LoraConfig .*LoraConfig.rank: expected an int > 0"):
            fn(tmp_path / "config")
    # without re-signing, the sha256 check catches the edit first, naming the function called
    f = tmp_path / "a" / "jlora" / "metadata"
    f.write_bytes(f.read_bytes().replace(b'"rank"', b'"r\xffnk"'))
    with pytest.raises(ValueError, match=r"read_adapter_header: checkpoint '.*' is corrupted: 'jlora/metadata' "
                                         r"does not match its sha256"):
        ckpt.read_adapter_header(tmp_path / "a")


def test_train_restore_errors_are_jloras_own(tmp_path):
    import shutil
    _, lora = _lora()
    adam = optax.adam(1e-3)
    with ckpt.TrainCheckpointer(tmp_path / "run", CFG) as tc:
        tc.save(1, lora, adam.init(lora), jax.random.key(0))
    for name in ("flip", "trunc", "utf8"):
        shutil.copytree(tmp_path / "run", tmp_path / name)
    step_dir = r"step 1 of '.*run'"
    with ckpt.TrainCheckpointer(tmp_path / "run", CFG) as tc:
        with pytest.raises(ValueError, match=step_dir + r": the optimizer-state template has other leaves than "
                                           r"the saved optimizer-state: only in the checkpoint: opt_state/0/count.*"
                                           r"fix: pass opt_state_like = jax.eval_shape\(tx.init, lora_like\)"):
            tc.restore(lora, optax.sgd(0.1).init(lora))
        _, lora8 = jlora.init(jax.random.key(0), _params(), CFG.replace(rank=8))
        with pytest.raises(ValueError, match=step_dir + r": optimizer-state leaf 'opt_state/0/mu/params/down/kernel/"
                                           r"A': shape \(32, 4\) \(rank 4\) does not match the target's "
                                           r"\(32, 8\) \(rank 8\)"):
            tc.restore(lora, adam.init(lora8))
        with pytest.raises(ValueError, match=step_dir + r": the optimizer-state template has another structure "
                                           r"than the saved state .*fix: pass opt_state_like"):
            tc.restore(lora, optax.adamw(1e-3).init(lora))  # same leaves, one more EmptyState
        with pytest.raises(ValueError, match=r"no step 7 in '.*run' \(saved: \[1\]\); fix: pass one of the saved"):
            tc.restore(lora, adam.init(lora), step=7)
    with ckpt.TrainCheckpointer(tmp_path / "empty", CFG) as tc:
        with pytest.raises(ValueError, match=r"no step saved in '.*empty'; fix: save one first"):
            tc.restore(lora, adam.init(lora))
    for f in _data_files(tmp_path / "flip" / "1" / "lora"):
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    for f in _data_files(tmp_path / "trunc" / "1" / "lora"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    f = tmp_path / "utf8" / "1" / "jlora" / "metadata"
    f.write_bytes(f.read_bytes().replace(b'"rank"', b'"r\xffnk"'))
    damaged = r"the step is damaged; fix: restore another step \(saved: \[1\]\) with step=..., or delete '.*/1'"
    for name, what in (("flip", r"cannot read its (metadata|arrays) \(ValueError: DATA_LOSS"),
                       ("trunc", r"cannot read its (metadata|arrays) \(ValueError: OUT_OF_RANGE"),
                       ("utf8", r"its header 'jlora/metadata' is not UTF-8 text \(byte 0xff at offset \d+\)")):
        with ckpt.TrainCheckpointer(tmp_path / name, CFG) as tc:
            with pytest.raises(ValueError,
                               match=rf"TrainCheckpointer.restore: step 1 of '.*{name}': {what}.*{damaged}"):
                tc.restore(lora, adam.init(lora))
