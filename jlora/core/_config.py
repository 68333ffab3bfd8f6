"""LoraConfig: the static description of an adapter (targets, ranks, alphas, init, variants).

A config is a frozen, hashable dataclass, so it can be a static argument of
``jax.jit``; it holds no arrays. Regexes are matched with ``re.fullmatch``
against the canonical '/'-joined path of a leaf (see :mod:`jlora.paths`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

SCHEMA_VERSION = 1
INITS = ("kaiming", "gaussian", "pissa", "olora", "loftq")
"""Fixed init names; ``'pissa_niter_K'`` (randomized PiSSA, K subspace iterations) is accepted too."""
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")

_Pairs = tuple[tuple[str, Any], ...]


class _Rows(tuple):
    """Marker kind for ``embedding_rows`` values: a tuple of distinct row indices."""


def _as_regexes(name: str, value: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(
            f"LoraConfig.{name}: expected a regex string or a sequence of them, got {value!r}; "
            f"fix: pass e.g. {name}=r'.*/query/kernel'"
        )
    out = tuple(value)
    for pattern in out:
        _compile(name, pattern)
    return out


def _compile(name: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"LoraConfig.{name}: {pattern!r} is not a valid regex ({err})") from None


def _as_pairs(name: str, value: Mapping[str, Any] | Sequence[tuple[str, Any]], kind: type) -> _Pairs:
    items = list(value.items()) if isinstance(value, Mapping) else list(value)
    out = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                f"LoraConfig.{name}: expected a dict {{regex: {kind.__name__}}} or (regex, value) pairs, "
                f"got item {item!r}"
            )
        pattern, v = item
        _compile(name, pattern)
        if kind is _Rows:
            ok = isinstance(v, (tuple, list)) and len(v) > 0
            if not ok or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
                raise TypeError(
                    f"LoraConfig.{name}[{pattern!r}]: expected a non-empty tuple of row indices >= 0, got {v!r}"
                )
            if len(set(v)) != len(v):
                raise ValueError(f"LoraConfig.{name}[{pattern!r}]: row indices must be distinct, got {v!r}")
            v = tuple(v)
        elif kind is tuple:
            if not (isinstance(v, (tuple, list)) and v and all(isinstance(b, bool) for b in v)):
                raise TypeError(
                    f"LoraConfig.{name}[{pattern!r}]: expected a non-empty tuple of bools (one per group), got {v!r}"
                )
            v = tuple(v)
        elif kind is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"LoraConfig.{name}[{pattern!r}]: expected a number, got {v!r}")
            v = float(v)
        elif kind is str:
            if not isinstance(v, str):
                raise TypeError(f"LoraConfig.{name}[{pattern!r}]: expected a string, got {v!r}")
        else:
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"LoraConfig.{name}[{pattern!r}]: expected an int, got {v!r}")
        out.append((pattern, v))
    return tuple(out)


def _first(pairs: _Pairs, path: str) -> Any:
    for pattern, value in pairs:
        if re.fullmatch(pattern, path):
            return value
    return None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Static LoRA settings: which kernels adapt, with what rank, scale and init.

    Args:
      rank: default rank r of every adapted kernel.
      alpha: default alpha; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rslora).
      targets: regexes (``re.fullmatch``) of kernel paths to adapt, e.g. ``r'.*/(query|value)/kernel'``.
      exclude: regexes of paths never adapted, even if a target matches.
      rank_pattern: ``{regex: rank}`` overrides; the first full match wins.
      alpha_pattern: ``{regex: alpha}`` overrides; the first full match wins.
      rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
      dropout: LoRA dropout rate on the input of A (lazy mode, only when a ``lora_rng`` is given).
      init: ``'kaiming'`` (A kaiming-uniform, B zero; PEFT's default) or ``'gaussian'``
        (A normal with std 1/r, B zero); with either, an embedding table (a kernel read by a lookup,
        layout kind ``'embed'``) gets A zero, B normal instead.
        ``'pissa'``, ``'pissa_niter_K'``, ``'olora'`` start from the kernel and return a residual base
        (:mod:`jlora.core._inits`); ``'loftq'`` returns a quantized base Q and factors with
        ``Q + s·A⊗B ≈ W`` (:mod:`jlora.quant._loftq`).
      trainable: regexes of leaves trained whole (biases, a new head): PEFT's ``bias``/``modules_to_save``.
      axes: ``{regex: n_in}``: the number of input axes of a kernel (after its stack axes), for
        kernels whose split ``init`` cannot read from a trace. Another spelling of ``layout``:
        ``stack + in + out`` in stored order (:meth:`roles_for`).
      stack: ``{regex: n}``: the number of leading stacked (layer) axes of a kernel (``nn.scan``); with
        ``axes``, another spelling of ``layout``.
      layout: ``{regex: roles}``: the role of every axis of a kernel, one letter per stored axis:
        ``'s'`` stack, ``'i'`` input, ``'o'`` output (``'oi'`` for a PyTorch-style ``(out, in)``
        kernel, ``'oio'`` for Gemma's ``q_einsum`` ``(N, D, H)``); overrides the trace. A path that
        ``layout`` matches ignores ``axes``/``stack``.
      fused: ``{regex: (True, False, True)}``: the kernel's last output axis is that many equal groups
        and only the ``True`` ones adapt (loralib's ``MergedLinear(enable_lora=...)``); ``init`` puts
        them in the kernel's layout (:attr:`jlora.Layout.fused`).
      use_dora: DoRA (Liu et al., 2024; PEFT ``use_dora``): each adapted kernel also trains a
        magnitude ``m`` (one per output unit) and runs with ``m * V / ||V||_in``, ``V = W0 + s A B``.
      embedding_rows: ``{regex: (row, ...)}``: train only these rows of a table (new tokens; PEFT's
        ``trainable_token_indices``); the lora tree holds them as ``'rows'`` of shape ``(n_rows, d)``.
      loftq_bits: ``init='loftq'``: the base's bits, 4 (NF4) or 8 (int8) (PEFT's ``LoftQConfig.loftq_bits``).
      loftq_iter: ``init='loftq'``: alternating quantize / truncated-SVD steps, >= 1 (``loftq_iter``).
      version: schema version of the JSON form.

    >>> cfg = LoraConfig(rank=4, alpha=8, targets=r".*/query/kernel", rank_pattern={r".*layer_0.*": 2})
    >>> cfg.rank_for("params/layer_0/query/kernel"), cfg.scale_for("params/layer_1/query/kernel", 4)
    (2, 2.0)
    >>> LoraConfig.from_json(cfg.to_json()) == cfg
    True
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    rslora: bool = False
    dropout: float = 0.0
    init: str = "kaiming"
    trainable: tuple[str, ...] = ()
    axes: tuple[tuple[str, int], ...] = ()
    stack: tuple[tuple[str, int], ...] = ()
    layout: tuple[tuple[str, str], ...] = ()
    fused: tuple[tuple[str, tuple[bool, ...]], ...] = ()
    use_dora: bool = False
    embedding_rows: tuple[tuple[str, tuple[int, ...]], ...] = ()
    loftq_bits: int = 4
    loftq_iter: int = 1
    version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoraConfig.rank: expected an int > 0, got {self.rank!r}; fix: e.g. rank=8")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0
                or not math.isfinite(self.alpha)):
            raise ValueError(f"LoraConfig.alpha: expected a finite number > 0, got {self.alpha!r}; fix: e.g. alpha=16")
        put("alpha", float(self.alpha))
        for name in ("targets", "exclude", "trainable"):
            put(name, _as_regexes(name, getattr(self, name)))
        put("rank_pattern", _as_pairs("rank_pattern", self.rank_pattern, int))
        put("alpha_pattern", _as_pairs("alpha_pattern", self.alpha_pattern, float))
        put("axes", _as_pairs("axes", self.axes, int))
        put("stack", _as_pairs("stack", self.stack, int))
        put("layout", _as_pairs("layout", self.layout, str))
        put("fused", _as_pairs("fused", self.fused, tuple))
        put("embedding_rows", _as_pairs("embedding_rows", self.embedding_rows, _Rows))
        if not isinstance(self.use_dora, bool):
            raise TypeError(f"LoraConfig.use_dora: expected a bool, got {self.use_dora!r}")
        self._check_rules()
        if not isinstance(self.rslora, bool):
            raise TypeError(f"LoraConfig.rslora: expected a bool, got {self.rslora!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoraConfig.dropout: expected a rate in [0, 1), got {self.dropout!r}; "
                             "fix: e.g. dropout=0.05, or 0.0 for none")
        put("dropout", float(self.dropout))
        if not isinstance(self.init, str) or (self.init not in INITS and not _PISSA_NITER.fullmatch(self.init)):
            raise ValueError(
                f"LoraConfig.init: expected one of {INITS} or 'pissa_niter_K' (K an int), got {self.init!r}; "
                "fix: e.g. init='kaiming' (PEFT's default)"
            )
        self._check_loftq()
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < SCHEMA_VERSION:
            raise ValueError(
                f"LoraConfig.version: expected schema {SCHEMA_VERSION}, got {self.version!r}, which no jlora "
                f"ever wrote (schemas start at 1); fix: leave version at its default ({SCHEMA_VERSION})"
            )
        if self.version > SCHEMA_VERSION:
            raise ValueError(
                f"LoraConfig.version: schema {self.version} is newer than this jlora reads (up to "
                f"{SCHEMA_VERSION}); fix: upgrade jlora to read this adapter config"
            )

    def _check_rules(self) -> None:
        for pattern, roles in self.layout:
            if not roles or set(roles) - set("sio"):
                raise ValueError(
                    f"LoraConfig.layout[{pattern!r}]: expected one letter per kernel axis from 's' (stack), "
                    f"'i' (input), 'o' (output), got {roles!r}; fix: e.g. 'oi' for an (out, in) kernel"
                )
        for pattern, r in self.rank_pattern:
            if r <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{pattern!r}]: expected a rank > 0, got {r}; "
                                 "fix: a positive int, or drop the rule (exclude= skips a path)")
        for pattern, a in self.alpha_pattern:
            if not (a > 0 and math.isfinite(a)):
                raise ValueError(f"LoraConfig.alpha_pattern[{pattern!r}]: expected a finite alpha > 0, got {a}; "
                                 "fix: e.g. 2 * the rank of the paths it matches")
        for name in ("axes", "stack"):
            for pattern, n in getattr(self, name):
                if n < 0:
                    raise ValueError(f"LoraConfig.{name}[{pattern!r}]: expected an int >= 0, got {n}; fix: the number "
                                     "of such axes, or layout= to state every axis' role")
        for pattern, enabled in self.fused:
            if not any(enabled):
                raise ValueError(
                    f"LoraConfig.fused[{pattern!r}]: expected at least one enabled group, got {enabled}; "
                    "fix: drop the rule or enable a group"
                )

    def _check_loftq(self) -> None:
        if isinstance(self.loftq_bits, bool) or not isinstance(self.loftq_bits, int) or self.loftq_bits not in (4, 8):
            raise ValueError(f"LoraConfig.loftq_bits: expected 4 (NF4) or 8 (int8), got {self.loftq_bits!r}; "
                             "fix: loftq_bits=4 (PEFT's default)")
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ValueError(f"LoraConfig.loftq_iter: expected an int >= 1 (alternating steps), got "
                             f"{self.loftq_iter!r}; fix: e.g. loftq_iter=1 (PEFT's default) or 5")
        if self.init != "loftq" and (self.loftq_bits, self.loftq_iter) != (4, 1):
            raise ValueError(
                f"LoraConfig.loftq_bits/loftq_iter ({self.loftq_bits}, {self.loftq_iter}) apply to init='loftq', "
                f"got init={self.init!r}; fix: set init='loftq', or drop the loftq settings"
            )

    def rank_for(self, path: str) -> int:
        """The rank of the kernel at ``path`` (``rank_pattern`` first, then ``rank``)."""
        r = _first(self.rank_pattern, path)
        return self.rank if r is None else r

    def alpha_for(self, path: str) -> float:
        """The alpha of the kernel at ``path`` (``alpha_pattern`` first, then ``alpha``)."""
        a = _first(self.alpha_pattern, path)
        return self.alpha if a is None else a

    def scale_for(self, path: str, rank: int | None = None) -> float:
        """The update scale s of the kernel at ``path``: ``alpha/r``, or ``alpha/sqrt(r)`` with rslora."""
        r = self.rank_for(path) if rank is None else rank
        a = self.alpha_for(path)
        return a / math.sqrt(r) if self.rslora else a / r

    def fused_for(self, path: str) -> tuple[bool, ...] | None:
        """The enabled output groups of a fused kernel at ``path``, or None if it is not fused."""
        return _first(self.fused, path)

    def axes_for(self, path: str) -> int | None:
        """The stated number of input axes of the kernel at ``path``, or None."""
        return _first(self.axes, path)

    def layout_for(self, path: str) -> str | None:
        """The stated axis roles of the kernel at ``path`` (``layout``), or None."""
        return _first(self.layout, path)

    def stack_for(self, path: str) -> int | None:
        """The stated number of leading stacked axes of the kernel at ``path``, or None."""
        return _first(self.stack, path)

    def roles_for(self, path: str, shape: Sequence[int], traced: tuple[int, int] | None = None) -> str | None:
        """The axis roles this config states for the kernel of ``shape`` at ``path`` (one letter per axis),
        or None: ``layout`` as it is, or ``axes``/``stack`` spelled as roles, ``stack + in + out`` in
        stored order. A count not stated comes from ``traced`` (the ``(n_stack, n_in)`` of a traced
        layout already in that order), else no stack axes and every axis but the last an input.

        >>> cfg = LoraConfig(stack={".*": 1}, axes={".*": 2})
        >>> cfg.roles_for("w", (4, 8, 2, 16)), cfg.replace(layout={"w": "oi"}).roles_for("w", (4, 8))
        ('siio', 'oi')
        """
        shape = tuple(shape)
        roles = self.layout_for(path)
        if roles is not None:
            if len(roles) != len(shape):
                raise ValueError(
                    f"LoraConfig.layout: roles {roles!r} for {path!r} give {len(roles)} axes, the kernel has shape "
                    f"{shape}; fix: one letter per axis ('s' stack, 'i' input, 'o' output)"
                )
            return roles
        n_stack, n_in = self.stack_for(path), self.axes_for(path)
        if n_stack is None and n_in is None:
            return None
        stack = n_stack if n_stack is not None else (traced[0] if traced else 0)
        ins = n_in if n_in is not None else (traced[1] if traced else len(shape) - stack - 1)
        if ins < 1 or stack + ins >= len(shape):
            raise ValueError(
                f"LoraConfig.axes/stack: a kernel of shape {shape} cannot have {stack} stacked and {ins} input axes "
                f"(at least one input and one output axis are needed); fix the LoraConfig.axes/stack rule for {path!r}"
            )
        return "s" * stack + "i" * ins + "o" * (len(shape) - stack - ins)

    def rows_for(self, path: str) -> tuple[int, ...] | None:
        """The trained rows of the table at ``path`` (``embedding_rows``), or None."""
        return _first(self.embedding_rows, path)

    def to_json(self) -> str:
        """The config as a JSON string (``from_json`` inverts it exactly)."""
        body = dataclasses.asdict(self)
        for name in ("rank_pattern", "alpha_pattern", "axes", "stack", "layout", "fused", "embedding_rows"):
            body[name] = [[p, list(v) if isinstance(v, tuple) else v] for p, v in getattr(self, name)]
        body = {"format": "jlora.LoraConfig", **body}
        return json.dumps(body, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes | Mapping[str, Any]) -> "LoraConfig":
        """Reads a config written by :meth:`to_json`; unknown keys and newer schemas are refused.

        >>> LoraConfig.from_json('{"rank": 4, "targets": [".*kernel"], "version": 1}').rank
        4
        """
        try:
            body = dict(text) if isinstance(text, Mapping) else json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"LoraConfig.from_json: the text is not valid UTF-8 JSON ({err}); fix: pass the contents of an "
                "adapter_config.json written by LoraConfig.to_json (or a dict)"
            ) from None
        except TypeError:
            raise TypeError(
                f"LoraConfig.from_json: expected a JSON str, bytes or a dict, got {type(text).__name__}; fix: "
                "pass the file's text, e.g. LoraConfig.from_json(path.read_text())"
            ) from None
        if not isinstance(body, dict):
            raise TypeError(f"LoraConfig.from_json: expected a JSON object, got {type(body).__name__}")
        body.pop("format", None)
        version = body.get("version", SCHEMA_VERSION)
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            raise ValueError(
                f"LoraConfig.from_json: the config has schema version {version!r}, this jlora reads up to "
                f"{SCHEMA_VERSION}; fix: upgrade jlora"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(body) - names)
        if unknown:
            raise ValueError(
                f"LoraConfig.from_json: unknown keys {unknown}; expected a subset of {sorted(names)}"
            )
        for name in ("rank_pattern", "alpha_pattern", "axes", "stack", "layout", "fused", "embedding_rows"):
            if name in body:
                value = body[name]
                if not isinstance(value, (list, dict)):
                    raise TypeError(f"LoraConfig.from_json: {name} must be a list of pairs, got {value!r}")
                if isinstance(value, list):
                    body[name] = [tuple(p) if isinstance(p, list) else p for p in value]
        return cls(**body)

    def replace(self, **changes: Any) -> "LoraConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
