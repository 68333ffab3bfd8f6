"""Shardings for LoRA factors, derived from the base model's shardings.

A kernel of shape ``stack + in + out`` is factored as ``A: stack + in + (r,)`` and
``B: stack + (r,) + out``. Each factor inherits the base kernel's partitioning on the
axes it shares with the kernel, and the rank axis is replicated:

    kernel spec  P(s..., i..., o...)
    A spec       P(s..., i..., None)
    B spec       P(s..., None, o...)
    fused B      P(s..., None, None, o...)   (group axis and rank replicated)

Leaves trained whole (``config.trainable``) keep the base leaf's own spec. Everything
works on abstract shapes, so a LoRA adapter for a model that does not fit one device can
be created directly sharded::

    abstract = jax.eval_shape(lambda k: jlora.init(k, params, cfg)[1], key)
    shardings = jlora.sharding.lora_shardings(param_shardings, abstract, cfg)
    lora = jax.jit(lambda k, p: jlora.init(k, p, cfg)[1], out_shardings=shardings)(key, params)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax.core import meta as flax_meta
from flax.linen.spmd import LogicallyPartitioned
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora.core import paths
from jlora.core._config import LoraConfig
from jlora.core._describe import MAGNITUDE, ROWS, WHOLE, A, adapted, kernel_layouts, leaf_roles, plain_layout
from jlora.core.layout import Layout

__all__ = ["lora_specs", "lora_shardings", "state_shardings"]

Rules = Sequence[tuple[str, Any]]


def _is_spec_leaf(x) -> bool:
    kinds = (PartitionSpec, NamedSharding, flax_meta.AxisMetadata, jax.ShapeDtypeStruct, jax.Array)
    return x is None or paths.is_variable(x) or isinstance(x, kinds)


def _to_spec(path: str, leaf, rules) -> tuple[PartitionSpec, Mesh | None, int | None]:
    """One base leaf -> (mesh-axis PartitionSpec, mesh or None, ndim or None)."""
    mesh = None
    ndim = None
    if paths.is_variable(leaf):  # NNX: nnx.get_partition_spec(state) or a sharded state
        leaf = leaf.get_value()
    if isinstance(leaf, flax_meta.AxisMetadata):
        value = getattr(leaf, "value", None)
        ndim = getattr(value, "ndim", None)
        mesh = getattr(leaf, "mesh", None)
        names = getattr(leaf, "names", None)
        if names is None:
            raise TypeError(f"base_specs leaf at '{path}' is {type(leaf).__name__} without axis "
                            "names; pass nn.Partitioned / nn.LogicallyPartitioned boxed params.")
        leaf_rules = rules if rules is not None else getattr(leaf, "rules", None)
        if isinstance(leaf, LogicallyPartitioned):  # logical names -> mesh axes
            spec = _logical(path, names, leaf_rules)
        else:
            spec = PartitionSpec(*names)
        return spec, mesh, ndim
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(leaf, "sharding", None)
        ndim = leaf.ndim
        if sharding is None:
            return PartitionSpec(), None, ndim
        if not isinstance(sharding, NamedSharding):
            if sharding.is_fully_replicated:
                return PartitionSpec(), None, ndim
            raise TypeError(f"base_specs leaf at '{path}' has a {type(sharding).__name__}; only "
                            "NamedSharding can be carried over to the factors. Use "
                            "jax.sharding.NamedSharding(mesh, PartitionSpec(...)).")
        leaf = sharding
    if isinstance(leaf, NamedSharding):
        return leaf.spec, leaf.mesh, ndim
    if leaf is None:
        return PartitionSpec(), None, ndim
    if isinstance(leaf, PartitionSpec):  # mesh axes, or logical names when rules are given
        return (_logical(path, tuple(leaf), rules) if rules is not None else leaf), None, ndim
    raise TypeError(f"base_specs leaf at '{path}' is a {type(leaf).__name__}; expected a "
                    "PartitionSpec, NamedSharding, nn.Partitioned, a sharded array or None; fix: "
                    "give that leaf a PartitionSpec (P() or None for replicated).")


def _logical(path: str, names, rules) -> PartitionSpec:
    from flax import linen as nn  # pylint: disable=g-import-not-at-top
    try:
        spec = nn.logical_to_mesh_axes(tuple(names), rules)
    except Exception as e:  # flax raises ValueError/TypeError with its own wording
        raise ValueError(f"cannot map the logical axis names {tuple(names)} of '{path}' to mesh "
                         f"axes with rules {rules!r}: {e}. Pass `rules=` (the same rules as "
                         "nn.logical_axis_rules / nn.logical_to_mesh_axes).") from e
    return spec if spec is not None else PartitionSpec()


def _pad(spec: PartitionSpec, ndim: int, path: str) -> tuple:
    parts = tuple(spec)
    if len(parts) > ndim:
        raise ValueError(f"base spec at '{path}' is {spec} ({len(parts)} axes) but the kernel "
                         f"has {ndim} axes; fix the spec for this parameter.")
    return parts + (None,) * (ndim - len(parts))


def _axis_size(mesh: Mesh, entry: str | tuple[str, ...]) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    size = 1
    for n in names:
        size *= mesh.shape[n]
    return size


def _base_table(base_specs, rules):
    leaves = jax.tree_util.tree_flatten_with_path(base_specs, is_leaf=_is_spec_leaf)[0]
    table = {}
    for keypath, leaf in leaves:
        path = paths.path_str(keypath)
        table[path] = _to_spec(path, leaf, rules)
    return table


def _canonical_spec(spec, layout: Layout, path: str) -> list[Any]:
    """The kernel's per-axis spec in the canonical order ``stack + in + out`` (a split axis' spec
    goes to its major sub-axis)."""
    stored = _pad(spec, len(layout.shape), path)
    sub = []
    for part, roles in zip(stored, layout.stored_roles()):
        sub += [part] + [None] * (len(roles) - 1)
    return [sub[k] for k in layout.perm]


def _derive(base_specs, lora, config, frozen, rules, mesh):
    """Shared core: returns (tree of PartitionSpec like lora, mesh or None)."""
    table = _base_table(base_specs, rules)
    layouts = kernel_layouts(lora, config)
    if frozen is not None:  # validates lora against frozen; the contract's shape rule
        layouts.update({p: f.layout for p, f in adapted(frozen, lora, config).items()})
    flat = paths.flatten(lora)
    found_mesh = mesh
    for _, m, _ in table.values():
        if found_mesh is None and m is not None:
            found_mesh = m
    specs: dict[str, PartitionSpec] = {}
    for path, (owner, role) in leaf_roles(lora, table).items():
        shape = tuple(getattr(flat[path], "shape", ()))
        if owner not in table:
            what = {WHOLE: "a leaf trained whole", ROWS: "a table with trained rows"}.get(role, "a factored kernel")
            close = paths.closest(owner, table, 3)
            raise ValueError(f"lora leaf '{path}' has no base spec: expected '{owner}' ({what}) in base_specs; "
                             f"closest paths: {', '.join(close) or 'none'}; fix: base_specs must have the same "
                             "nesting as the params.")
        spec, _, spec_ndim = table[owner]
        if role == WHOLE:  # trained whole: keeps its own spec
            specs[path] = PartitionSpec(*_pad(spec, len(shape), path))
            continue
        if role == ROWS:  # trained embedding rows: the table's spec, rows replicated
            specs[path] = PartitionSpec(None, *_pad(spec, len(shape), owner)[1:])
            continue
        a, b = flat.get(f"{owner}/A"), flat.get(f"{owner}/B")
        if (a is None or b is None) and role == MAGNITUDE:
            raise ValueError(f"lora leaf '{path}' (a DoRA magnitude) needs '{owner}/A' and '{owner}/B' beside it; "
                             "fix: pass the whole lora tree from jlora.init(use_dora=True)")
        if a is None or b is None:
            raise ValueError(f"lora leaf '{path}' has no partner '{owner}/{'B' if role == A else 'A'}'; fix: pass the "
                             "whole lora tree from jlora.init (both A and B of each kernel)")
        lay = layouts.get(owner) or plain_layout(owner, a.shape, b.shape, config, spec_ndim)
        parts = _canonical_spec(spec, lay, owner)
        n_stack, n_in = lay.n_stack, lay.n_in
        if role == MAGNITUDE:  # DoRA magnitude: the kernel's stack + output axes
            specs[path] = PartitionSpec(*parts[:n_stack], *parts[n_stack + n_in:])
        elif role == A:
            specs[path] = PartitionSpec(*parts[:n_stack + n_in], None)
        else:
            out = list(parts[n_stack + n_in:])
            if lay.fused is not None and found_mesh is not None and out[-1] is not None:
                if b.shape[-1] % _axis_size(found_mesh, out[-1]):  # a group's width does not split over the mesh axis
                    out[-1] = None
            specs[path] = PartitionSpec(*parts[:n_stack], *(None,) * (lay.b_rank_axis - n_stack), None, *out)
    treedef = jax.tree_util.tree_structure(lora)
    return jax.tree_util.tree_unflatten(treedef, [specs[p] for p in flat]), found_mesh


def lora_specs(base_specs: Any, lora: Any, config: LoraConfig | None, *, frozen: Any = None,
               rules: Rules | None = None) -> Any:
    """PartitionSpecs for the lora tree, derived from the base model's partitioning.

    Args:
      base_specs: the base params' partitioning, same nesting as the params. Leaves may be
        ``PartitionSpec`` (mesh axes, or logical axis names with ``rules``),
        ``NamedSharding``, sharded ``jax.Array``/``ShapeDtypeStruct``, ``None``
        (replicated), or Flax boxed params (``nn.Partitioned``,
        ``nn.LogicallyPartitioned``) as returned by ``model.init`` with
        ``nn.with_partitioning`` / ``nn.with_logical_partitioning``.
      lora: the lora tree, concrete or abstract (``jax.eval_shape`` of ``jlora.init``).
      config: the ``LoraConfig`` used to make ``lora`` (stack axes, fused groups); None for
        plain unstacked, unfused kernels.
      frozen: optional base params (arrays or ShapeDtypeStructs) giving each kernel's ndim;
        without it the number of stack axes comes from ``config.stack``.
      rules: logical-axis rules ``((logical_name, mesh_axis), ...)`` for logical names.

    Returns:
      A tree with the structure of ``lora`` whose leaves are ``PartitionSpec``: for a
      kernel ``stack + in + out`` with spec ``P(s, i, o)``, A gets ``P(s, i, None)`` and B
      ``P(s, None, o)`` (fused B: ``P(s, None, None, o)``); leaves trained whole keep
      their own spec.

    Raises:
      ValueError: a lora leaf has no matching base spec, or the factor shapes do not fit.
      TypeError: a base_specs leaf of an unsupported kind.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> lora = {"w": {"A": jnp.zeros((4, 2)), "B": jnp.zeros((2, 6))}}
      >>> lora_specs({"w": P("data", "model")}, lora, None)
      {'w': {'A': P('data', None), 'B': P(None, 'model')}}
    """
    return _derive(base_specs, lora, config, frozen, rules, None)[0]


def lora_shardings(base_shardings: Any, lora: Any, config: LoraConfig | None, *, mesh: Mesh | None = None,
                   frozen: Any = None, rules: Rules | None = None) -> Any:
    """NamedShardings for the lora tree (see ``lora_specs`` for the rule).

    Args:
      base_shardings: the base params' shardings: any form ``lora_specs`` accepts.
      lora: the lora tree, concrete or abstract.
      config: the ``LoraConfig`` used to make ``lora``.
      mesh: the device mesh; optional when the base leaves carry one (``NamedSharding``,
        sharded arrays, ``nn.Partitioned(mesh=...)``).
      frozen: optional base params (arrays or ShapeDtypeStructs), see ``lora_specs``.
      rules: logical-axis rules for logical names.

    Returns:
      A tree with the structure of ``lora`` of ``NamedSharding`` on ``mesh``; use it as
      ``out_shardings`` of a jitted ``jlora.init`` or with ``jax.device_put``.

    Raises:
      ValueError: no mesh is given or found, or as ``lora_specs``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
      >>> lora = {"w": {"A": jnp.zeros((4, 2)), "B": jnp.zeros((2, 6))}}
      >>> s = lora_shardings({"w": P(None, "model")}, lora, None, mesh=mesh)
      >>> s["w"]["B"].spec
      P(None, 'model')
    """
    try:
        specs, found = _derive(base_shardings, lora, config, frozen, rules, mesh)
    except (TypeError, ValueError) as err:  # name the argument the caller passed
        raise type(err)(str(err).replace("base_specs", "base_shardings")) from None
    if found is None:
        raise ValueError("lora_shardings needs a mesh and base_shardings carries none; fix: pass mesh=jax.sharding.Mesh(...), or "
                         "base_shardings made of NamedSharding / sharded arrays.")
    return jax.tree.map(lambda s: NamedSharding(found, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def state_shardings(state: Any, lora: Any, shardings: Any, *, default: Any = None) -> Any:
    """Shardings for a tree that holds copies of the lora tree (optimizer state, gradients).

    Each leaf of ``state`` whose path ends with a lora leaf's path and has that leaf's shape
    (adam's ``mu``/``nu``, a gradient accumulator) gets that leaf's sharding; any other leaf
    (step counts, scalars) gets ``default``, which is fully replicated on the lora mesh if
    not given.

    Args:
      state: the tree to shard, concrete or abstract (``jax.eval_shape(tx.init, lora)``).
      lora: the lora tree (concrete or abstract).
      shardings: the lora tree's shardings (``lora_shardings``), same structure as ``lora``.
      default: the sharding for leaves that are not copies of a lora leaf.

    Returns:
      A tree of shardings with the structure of ``state``, for ``out_shardings`` of a
      jitted ``tx.init`` and the in/out shardings of a train step.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, optax
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> lora = {"w": {"A": jnp.zeros((4, 2)), "B": jnp.zeros((2, 6))}}
      >>> sh = {"w": {"A": NamedSharding(mesh, P("model", None)), "B": NamedSharding(mesh, P())}}
      >>> opt = state_shardings(jax.eval_shape(optax.adam(1e-3).init, lora), lora, sh)
      >>> opt[0].mu["w"]["A"].spec, opt[0].count.spec
      (P('model', None), P())
    """
    flat_lora = paths.flatten(lora)
    flat_sh = paths.flatten(shardings)
    if default is None:
        first = next(iter(flat_sh.values()), None)
        if first is None:
            raise ValueError("state_shardings: `shardings` is empty (expected lora_shardings(...) of the lora tree); "
                             "fix: pass default=NamedSharding(mesh, P())")
        default = NamedSharding(first.mesh, PartitionSpec())
    by_len = sorted(flat_lora, key=len, reverse=True)

    def one(keypath, leaf):
        path = paths.path_str(keypath)
        shape = tuple(getattr(leaf, "shape", ()))
        for p in by_len:
            if (path == p or path.endswith("/" + p)) and tuple(flat_lora[p].shape) == shape:
                return flat_sh[p]
        return default

    return jax.tree_util.tree_map_with_path(one, state)
