"""Formulations of a conv-LoRA train step, side by side, as ratios to full fine-tuning (issue 17, conv).

    python benchmarks/conv_forms.py               # the conv net of run.py (3x3 convs 32-256, batch 32)
    python benchmarks/conv_forms.py --rounds 40 --out benchmarks/results

Per conv kernel ``W0`` (k, k, cin, cout) with ``A`` (k, k, cin, r), ``B`` (r, cout), ``Bs = s·B``,
``conv(x, A)`` a conv to r channels and ``·Bs`` a 1x1 conv:

- ``lazy jlora``: ``jlora.lora_apply(mode="lazy")`` (today: ``conv(x, W0) + conv(x, A)·Bs``, autodiff);
- ``merged-in-step``: ``jlora.lora_apply(mode="merged")``: ``conv(x, W0 + A⊗Bs)``, autodiff (the full
  filter gradient ``dW`` is formed, then projected onto A and B);
- ``b concat``: one conv over ``[W0 | A]`` (cout + r output channels) gives base and ``low``; custom VJP:
  ``dX`` is one input-gradient conv of ``[dY | dlow]`` over ``[W0 | A]``, ``dA`` one filter-gradient conv
  on r channels (``dlow = dY·Bsᵀ``), ``dBs = lowᵀ·dY``;
- ``d merged-dX``: forward ``conv(x, W0) + conv(x, A)·Bs``; custom VJP: ``dX`` one input-gradient conv
  with the merged kernel ``W0 + A⊗Bs`` (k·k·cin·cout: small), ``dA``, ``dBs`` as in b;
- ``e merged-fwd``: forward one conv over ``[W0 + A⊗Bs | A]`` (y and low at once), backward as d: the
  step is full fine-tuning's forward and dX plus r-channel filter gradients instead of the full ones;
- ``e NCHW``: e with the activations NCHW / kernels OIHW;
- ``probe``: no weight gradients (the gradient of a zero input offset): the floor.

Every form is checked to give full fine-tuning's loss (1e-4 relative) before timing. Ratios are taken
within one round-robin round (one step of each form per round, order rotated); median [min-max].
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks import variants as V  # noqa: E402
from benchmarks import workloads as W  # noqa: E402
from benchmarks.timing import fmt, round_robin  # noqa: E402

NHWC = ("NHWC", "HWIO", "NHWC")
NCHW = ("NCHW", "OIHW", "NCHW")


def conv(x: jax.Array, w: jax.Array, stride: int, dn=NHWC) -> jax.Array:
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=dn)


def _feat(dn) -> int:
    return dn[0].index("C")


def _mix(low: jax.Array, bs: jax.Array, dn) -> jax.Array:
    """A 1x1 conv: ``low`` (r channels) times ``bs`` (r, cout) along the feature axis."""
    f = _feat(dn)
    return jnp.moveaxis(jnp.tensordot(low, bs, axes=[[f], [0]]), -1, f)


def _wflat(w: jax.Array, dn) -> jax.Array:
    """A kernel as (k·k·cin, cout) in its layout (HWIO: a reshape; OIHW: a transpose of the small kernel)."""
    if dn[1] == "HWIO":
        return w.reshape(-1, w.shape[-1])
    return jnp.transpose(w, (2, 3, 1, 0)).reshape(-1, w.shape[0])


def _wunflat(m: jax.Array, like: tuple, dn) -> jax.Array:
    if dn[1] == "HWIO":
        return m.reshape(like)
    o, i, h, w_ = like
    return jnp.transpose(m.reshape(h, w_, i, o), (3, 2, 0, 1))


def _cat_out(w: jax.Array, a: jax.Array, dn) -> jax.Array:
    return jnp.concatenate([w, a], axis=dn[1].index("O"))


def _split(y: jax.Array, cout: int, dn) -> tuple[jax.Array, jax.Array]:
    f = _feat(dn)
    return lax.slice_in_dim(y, 0, cout, axis=f), lax.slice_in_dim(y, cout, y.shape[f], axis=f)


def _dx(x_shape, w, dy, stride, dn):
    """Input gradient of ``conv(·, w)`` at cotangent dy (one transposed conv)."""
    _, vjp = jax.vjp(lambda xx: conv(xx, w, stride, dn), jnp.zeros(x_shape, dy.dtype))
    return vjp(dy)[0]


def _dw(x, w_shape, dy, stride, dn):
    """Filter gradient of ``conv(x, ·)`` at cotangent dy (one filter-gradient conv)."""
    _, vjp = jax.vjp(lambda ww: conv(x, ww, stride, dn), jnp.zeros(w_shape, x.dtype))
    return vjp(dy)[0]


def _dbs(low, dy, dn):
    f = _feat(dn)
    axes = [i for i in range(low.ndim) if i != f]
    return jnp.tensordot(low, dy, axes=[axes, axes])  # (r, cout)


def _delta(w0, a, bs, dn):
    return w0 + _wunflat(_wflat(a, dn) @ bs, w0.shape, dn)


def make_op(form: str, stride: int, dn):
    """The conv-LoRA op ``y = conv(x, W0) + conv(x, A)·Bs`` of one form, with its custom VJP."""

    def fwd(x, w0, a, bs):
        cout = bs.shape[1]
        if form == "b":
            base, low = _split(conv(x, _cat_out(w0, a, dn), stride, dn), cout, dn)
            y = base + _mix(low, bs, dn)
        elif form == "d":
            low = conv(x, a, stride, dn)
            y = conv(x, w0, stride, dn) + _mix(low, bs, dn)
        else:  # "e": y and low from one conv over [W0 + A⊗Bs | A]
            y, low = _split(conv(x, _cat_out(_delta(w0, a, bs, dn), a, dn), stride, dn), cout, dn)
        return y, (x, w0, a, bs, low)

    def bwd(res, dy):
        x, w0, a, bs, low = res
        dlow = _mix(dy, bs.T, dn)  # (.., r): dY·Bsᵀ
        if form == "b":
            dx = _dx(x.shape, _cat_out(w0, a, dn), jnp.concatenate([dy, dlow], axis=_feat(dn)), stride, dn)
        else:
            dx = _dx(x.shape, _delta(w0, a, bs, dn), dy, stride, dn)
        da = _dw(x, a.shape, dlow, stride, dn)
        return dx, None, da, _dbs(low, dy, dn)

    @jax.custom_vjp
    def op(x, w0, a, bs):
        return fwd(x, w0, a, bs)[0]

    op.defvjp(fwd, bwd)
    return op


def conv_logits(frozen: dict, lora: dict, x: jax.Array, cfg: W.ConvConfig, scale: float, form: str,
                dn=NHWC) -> jax.Array:
    """The ConvNet of ``workloads`` with conv LoRA on every conv, in one form (``lora``: jlora's layout)."""
    p, lp = frozen["params"], lora["params"]
    if dn != NHWC:
        x = jnp.transpose(x, (0, 3, 1, 2))
    for i in range(len(cfg.channels)):
        c, cl = p[f"conv_{i}"], lp[f"conv_{i}"]["kernel"]
        w0, a, bs = c["kernel"], cl["A"], scale * cl["B"]
        if dn != NHWC:
            w0, a = jnp.transpose(w0, (3, 2, 0, 1)), jnp.transpose(a, (3, 2, 0, 1))
        bias = c["bias"] if dn == NHWC else c["bias"][:, None, None]
        x = jax.nn.relu(make_op(form, 1 if i == 0 else 2, dn)(x, w0, a, bs) + bias)
    pooled = x.mean(axis=(1, 2) if dn == NHWC else (2, 3))
    return pooled @ p["head"]["kernel"] + p["head"]["bias"]


def form_variant(wl: V.Workload, form: str, dn=NHWC) -> V.Variant:
    cfg, scale = wl.cfg, wl.lora.scale

    def loss(t, f, b):
        logits = conv_logits(f, t, b[0], cfg, scale, form, dn)
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

    return V.Variant(f"{form}", loss_fn=loss, trainable=V.lora_tree(wl.factors), frozen=wl.params,
                     tx=optax.adamw(V.LR))


FORMS = {
    "b concat [W0|A], custom VJP": lambda wl: form_variant(wl, "b"),
    "d merged-kernel dX, custom VJP": lambda wl: form_variant(wl, "d"),
    "e one conv [W0+A⊗Bs|A] fwd, merged dX": lambda wl: form_variant(wl, "e"),
    "e NCHW/OIHW": lambda wl: form_variant(wl, "e", NCHW),
}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import check_losses, prepare

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    ap.add_argument("--out", type=Path, default=None, help="write conv_forms.md / .json here")
    ap.add_argument("--per-layer", action="store_true", help="only the per-layer fwd+bwd costs (no optimizer)")
    args = ap.parse_args(argv)
    if args.per_layer:
        cfg = W.ConvConfig(channels=(8, 16), image=8, batch=4) if args.quick else W.ConvConfig()
        load0 = os.getloadavg()
        rows = per_layer(cfg, 8, args.rounds)
        names = [k for k in rows[0] if k not in ("layer", "shape", "conv_gflop", "full_ms") and "(CPU)" not in k]
        lines = [f"Per conv layer, fwd+bwd of one conv (no optimizer), r=8, {args.rounds} rounds, load "
                 f"{load0[0]:.2f} / {os.getloadavg()[0]:.2f}; ratio to full FT's fwd+bwd, median", "",
                 "Each cell: wall-time ratio / CPU-time ratio.", "",
                 "| layer | shape | conv GFLOP | full ms | " + " | ".join(names) + " |",
                 "|---|---|---|---|" + "---|" * len(names)]
        for r in rows:
            lines.append(f"| {r['layer']} | {r['shape']} | {r['conv_gflop']:.3f} | {r['full_ms']:.1f} | "
                         + " | ".join(f"{r[n]:.2f} / {r[n + ' (CPU)']:.2f}" for n in names) + " |")
        md = "\n".join(lines) + "\n"
        print(md)
        if args.out:
            (args.out / "conv_layers_run.md").write_text(md)
            (args.out / "conv_layers.json").write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    cfg = W.ConvConfig(channels=(8, 16), image=8, batch=4) if args.quick else W.ConvConfig()
    wl = V.conv_workload(cfg, W.LoraSpec(rank=8, alpha=16.0))
    load0, t0 = os.getloadavg(), time.perf_counter()
    vs = [V.full_ft(wl), V.jlora_lazy(wl), V.jlora_merged(wl)]
    for name, build in FORMS.items():
        v = build(wl)
        v.name = name
        vs.append(v)
    vs.append(V.probe(wl))
    preps = []
    for v in vs:
        if v.error:
            print(f"{v.name}: {v.error}", file=sys.stderr)
            continue
        preps.append(prepare(v, wl))
    ref, failures = check_losses(preps, wl)
    if failures:
        print(f"LOSS CHECK FAILED: {failures}", file=sys.stderr)
        return 1
    def stepper(p):
        def go():
            p.state[0], p.state[1], loss = p.compiled(p.state[0], p.state[1], p.v.frozen, wl.batch)
            return loss
        return go

    res = round_robin([(p.v.name, stepper(p)) for p in preps], args.rounds)
    rows = [dict(p.row, **res[p.v.name]) for p in preps]
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), load=load0,
                load_end=os.getloadavg(), wall_s=time.perf_counter() - t0, rounds=args.rounds,
                command="python benchmarks/conv_forms.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    lines = [f"Conv net {cfg}, LoRA r=8 alpha=16 on every conv; {args.rounds} round-robin rounds; "
             f"load {load0[0]:.2f} / {meta['load_end'][0]:.2f}; {meta['date']}; `{meta['command']}`; "
             f"all losses = full FT's ({ref:.6f}) within 1e-4", "",
             "| form | step ms (wall) | x full FT, wall: median [min–max] | x full FT, CPU time | temp MiB | "
             "XLA FLOPs x full |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['wall_s'] * 1e3:.1f} | {fmt(r['wall_ratio'])} | {fmt(r['cpu_ratio'])} | "
                     f"{r['temp_bytes'] / 2**20:.1f} | {r['flops'] / rows[0]['flops']:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "conv_forms_run.md").write_text(md)
        keep = ("name", "wall_s", "cpu_s", "wall_ratio", "cpu_ratio", "wall", "cpu", "temp_bytes", "flops", "loss0")
        (args.out / "conv_forms.json").write_text(json.dumps(dict(meta=meta, rows=[{k: r[k] for k in keep}
                                                                                  for r in rows]), indent=1) + "\n")
    return 0



# --- per-layer costs: the basis of a per-kernel lazy / merged choice ---------------------------------

def layer_steps(n: int, hw: int, cin: int, cout: int, stride: int, r: int, k: int = 3, dn=NHWC) -> dict:
    """fwd+bwd of one conv layer (cotangent g fixed) in each form; returns name -> (jitted fn, args)."""
    key = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(key[0], (n, hw, hw, cin))
    w0 = jax.random.normal(key[1], (k, k, cin, cout)) * 0.1
    a = jax.random.normal(key[2], (k, k, cin, r)) * 0.1
    b = jax.random.normal(key[3], (r, cout)) * 0.1
    ho = -(-hw // stride)
    g = jax.random.normal(key[4], (n, ho, ho, cout))
    s = 2.0

    def merged(x, w0, a, b):
        return conv(x, _delta(w0, a, s * b, dn), stride, dn)

    def lazy_today(x, w0, a, b):
        return conv(x, w0, stride, dn) + _mix(conv(x, a, stride, dn), s * b, dn)

    op_e = make_op("e", stride, dn)
    forms = {
        "full FT (dX, dW)": (lambda x, w0, a, b: conv(x, w0, stride, dn), (0, 1)),
        "merged-in-step": (merged, (0, 2, 3)),
        "lazy today (autodiff)": (lazy_today, (0, 2, 3)),
        "e: one conv [W0+A⊗Bs|A], merged dX": (lambda x, w0, a, b: op_e(x, w0, a, s * b), (0, 2, 3)),
        "floor (dX only)": (lambda x, w0, a, b: conv(x, w0, stride, dn), (0,)),
    }
    out = {}
    for name, (f, argn) in forms.items():
        # relu after the conv as in the net: the forward output is needed (a linear loss lets XLA drop it)
        fn = jax.jit(jax.grad(lambda x, w0, a, b, f=f: jnp.vdot(jax.nn.relu(f(x, w0, a, b)), g), argnums=argn))
        out[name] = (fn, (x, w0, a, b))
    return out


def per_layer(cfg: W.ConvConfig, r: int, rounds: int) -> list[dict]:
    rows = []
    hw, cin = cfg.image, 3
    for i, c in enumerate(cfg.channels):
        stride = 1 if i == 0 else 2
        steps = layer_steps(cfg.batch, hw, cin, c, stride, r)
        for fn, args in steps.values():
            jax.block_until_ready(fn(*args))
        names = list(steps)
        res = round_robin([(n, lambda f=steps[n][0], a=steps[n][1]: f(*a)) for n in names], rounds)
        ho = -(-hw // stride)
        row = dict(layer=i, shape=f"{cfg.batch}x{hw}x{hw}x{cin} -> {c}, stride {stride}",
                   conv_gflop=2 * cfg.batch * ho * ho * 9 * cin * c / 1e9, full_ms=res[names[0]]["wall_s"] * 1e3)
        for n in names:
            row[n] = res[n]["wall_ratio"][0]
            row[n + " (CPU)"] = res[n]["cpu_ratio"][0]
        rows.append(row)
        hw, cin = ho, c
    return rows


if __name__ == "__main__":
    sys.exit(main())
