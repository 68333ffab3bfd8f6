"""Bad input: every error names the argument and path, shows expected vs got, and says the fix."""

import jax
import jax.numpy as jnp
import pytest

import jlora

KEY = jax.random.key(0)
PARAMS = {"params": {"attn": {"query": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)},
                              "value": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}},
                     "scale": jnp.ones(()), "dg": {"kernel": jnp.ones((8, 2, 4))}}}


def test_target_matching_nothing_lists_closest_paths():
    with pytest.raises(ValueError, match=r"'.\*/qery/kernel' matched no parameter; closest paths: params/attn/query/kernel"):
        jlora.init(KEY, PARAMS, jlora.LoraConfig(targets=r".*/qery/kernel"))


def test_exclude_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="LoraConfig.exclude: '.*/nothing' matched no parameter"):
        jlora.init(KEY, PARAMS, jlora.LoraConfig(rank=2, targets=r".*/query/kernel", exclude=r".*/nothing"))


@pytest.mark.parametrize("target", [r".*/query/bias", r"params/scale"])
def test_target_on_non_kernel_leaf(target):
    with pytest.raises(ValueError, match=r"is not a kernel.*fix: narrow the target regex, or list the leaf in `trainable`"):
        jlora.init(KEY, PARAMS, jlora.LoraConfig(targets=target))


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="LoraConfig.rank: expected an int > 0"):
        jlora.LoraConfig(rank=rank)


def test_rank_larger_than_kernel_allows():
    with pytest.raises(ValueError, match=r"rank 9 for 'params/attn/query/kernel' \(shape \(8, 8\).*exceeds the largest useful rank 8"):
        jlora.init(KEY, PARAMS, jlora.LoraConfig(rank=9, targets=r".*/query/kernel"))


@pytest.mark.parametrize("alpha", [0, -1.0, "16", float("inf"), float("nan")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="LoraConfig.alpha: expected a finite number > 0.*fix: e.g. alpha=16"):
        jlora.LoraConfig(alpha=alpha)


def test_ambiguous_custom_kernel_says_both_fixes():
    with pytest.raises(ValueError, match=r"cannot tell the axis roles of 'params/dg/kernel'.*apply_fn=model.apply.*LoraConfig\(layout="):
        jlora.init(KEY, PARAMS, jlora.LoraConfig(targets=r".*/dg/kernel"))
    # stating the split resolves it
    _, lora = jlora.init(KEY, PARAMS, jlora.LoraConfig(rank=2, targets=r".*/dg/kernel", axes={r".*/dg/kernel": 1}))
    assert lora["params"]["dg"]["kernel"]["B"].shape == (2, 2, 4)


def test_unknown_kernel_use_in_trace_is_reported():
    def apply(p, x):  # the kernel is only reduced, never multiplied: no split to read
        return x * jnp.sum(p["params"]["dg"]["kernel"])

    with pytest.raises(ValueError, match=r"the trace says it is used by reduce_sum"):
        jlora.init(KEY, PARAMS, jlora.LoraConfig(targets=r".*/dg/kernel"), apply_fn=apply, args=(jnp.ones(3),))


def _lora():
    return jlora.init(KEY, PARAMS, jlora.LoraConfig(rank=2, targets=r".*/(query|value)/kernel",
                                                    trainable=r".*/query/bias"))


def test_lora_tree_with_missing_partner():
    frozen, lora = _lora()
    del lora["params"]["attn"]["query"]["kernel"]["B"]
    with pytest.raises(ValueError, match=r"'params/attn/query/kernel/A' has no partner 'params/attn/query/kernel/B'"):
        jlora.merge(frozen, lora, jlora.LoraConfig(rank=2, targets=".*"))


def test_lora_tree_with_extra_path():
    frozen, lora = _lora()
    lora["params"]["attn"]["key"] = {"kernel": {"A": jnp.ones((8, 2)), "B": jnp.ones((2, 8))}}
    with pytest.raises(ValueError, match=r"'params/attn/key/kernel/A' has no counterpart in the frozen tree.*closest frozen paths"):
        jlora.merge(frozen, lora, jlora.LoraConfig(rank=2, targets=".*"))


def test_lora_tree_with_wrong_shapes_names_both():
    frozen, lora = _lora()
    lora["params"]["attn"]["value"]["kernel"]["A"] = jnp.ones((7, 2))
    with pytest.raises(ValueError, match=r"'params/attn/value/kernel': A \(7, 2\) and B \(2, 8\) do not factor the frozen kernel of shape \(8, 8\)"):
        jlora.merge(frozen, lora, jlora.LoraConfig(rank=2, targets=".*"))


def test_trained_whole_leaf_with_wrong_dtype():
    frozen, lora = _lora()
    lora["params"]["attn"]["query"]["bias"] = jnp.zeros(8, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"'params/attn/query/bias': expected shape \(8,\) dtype float32.*got shape \(8,\) dtype bfloat16"):
        jlora.merge(frozen, lora, jlora.LoraConfig(rank=2, targets=".*"))


@pytest.mark.parametrize("text, message", [
    ('{"rank": "8", "version": 1}', "LoraConfig.rank: expected an int > 0"),
    ('{"targets": 3, "version": 1}', "LoraConfig.targets: expected a regex string"),
    ('{"rank_pattern": {"x": "2"}, "version": 1}', r"rank_pattern\['x'\]: expected an int"),
    ('{"rank": 8, "version": 2}', "schema version 2, this jlora reads up to 1; fix: upgrade jlora"),
    ('{"rank": 8, "lora_dropout_v2": 0.1}', r"unknown keys \['lora_dropout_v2'\]"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_config_json(text, message):
    with pytest.raises((ValueError, TypeError), match=message):
        jlora.LoraConfig.from_json(text)


def test_bad_regex_and_mode():
    with pytest.raises(ValueError, match=r"LoraConfig.targets: '\(' is not a valid regex"):
        jlora.LoraConfig(targets="(")
    with pytest.raises(ValueError, match="mode must be one of"):
        jlora.lora_apply(lambda p, x: x, jlora.LoraConfig(targets=".*"), mode="eager")


def test_merged_mode_refuses_dropout_rng():
    frozen, lora = _lora()
    cfg = jlora.LoraConfig(rank=2, targets=".*", dropout=0.1)
    fn = jlora.lora_apply(lambda p, x: x @ p["params"]["attn"]["query"]["kernel"], cfg, mode="merged")
    with pytest.raises(ValueError, match="use mode='lazy' for training with dropout"):
        fn(frozen, lora, jnp.ones(8), lora_rng=KEY)


def test_optimizer_on_unrelated_tree():
    _, lora = _lora()
    tx = jlora.optimizer(__import__("optax").adam(1e-3), lora)
    with pytest.raises(ValueError, match="neither are the lora tree nor contain it"):
        tx.init({"w": jnp.ones(3)})


# --- every public function: at least one bad input, its exception and message ------------------------------------
#
# Each case: (public name, case id, call(tmp_path), exception type, regex the message must match). Every message
# must also say its fix ("fix:" or "Fix"), except the ones listed in NO_FIX_YET (owned by the checkpoint slice).

import math  # noqa: E402
import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jlora import checkpoint, dora, multi, peft, quant, sharding  # noqa: E402

CFG = jlora.LoraConfig(rank=2, targets=r".*/(query|value)/kernel")
X8 = jnp.ones(8)


def _params():
    return {"params": {"attn": {"query": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)},
                                "value": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}}}


def _fl(cfg=CFG):
    return jlora.init(KEY, _params(), cfg)


def _query(p, x):
    return x @ p["params"]["attn"]["query"]["kernel"]


def _with(tree, path, value):
    node = tree
    *parents, last = path.split("/")
    for k in parents:
        node = node[k]
    node[last] = value
    return tree


def _stack():
    frozen, lora = _fl()
    return frozen, multi.stack(frozen, {"a": (lora, CFG)})


def _overflowing_merge():
    frozen = jax.tree.map(lambda x: (x * 6e4).astype(jnp.float16), _params())
    _, lora = jlora.init(KEY, frozen, CFG)
    lora = jax.tree.map(lambda x: jnp.full_like(x, 100.0), lora)
    return jlora.merge(frozen, lora, CFG)


def _mixed(ids, jit=False):
    frozen, s = _stack()
    fn = multi.mixed_apply(_query, s.config)
    fn = jax.jit(fn) if jit else fn
    return jax.block_until_ready(fn(frozen, s.lora, jnp.asarray(ids), jnp.ones((len(ids), 8))))


def _saved(t):
    _, lora = _fl()
    jlora.save_adapter(t / "a", lora, CFG)
    return t / "a"


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))


IDS_RANGE = r"adapter_ids must be in \[0, 1\].*got \[{}\]; negative ids are not wrapped.*fix: use Stack.id"
CASES = [
    # kernel layouts
    ("Layout", "roles of another length", lambda t: jlora.Layout((4, 3), "ioo"), ValueError, r"roles 'ioo' must give one of 's' \(stack\), 'i' \(input\), 'o' \(output\) to each of the 2 axes.*fix: e.g. 'io'"),
    ("Layout", "no output axis", lambda t: jlora.Layout((4, 3), "ii"), ValueError, r"need at least one input \('i'\) and one output \('o'\) axis; fix"),
    ("LoraKernel", "layout not a Layout", lambda t: jlora.LoraKernel({"A": 1, "B": 2}, "io"), TypeError, r"layout must be a jlora Layout, got str; fix"),
    ("kernel_layouts", "not a pytree of arrays", lambda t: jlora.kernel_layouts(None), TypeError, r"kernel_layouts: lora must be a lora tree.*fix"),
    # LoraConfig and its JSON form
    ("LoraConfig", "alpha=inf", lambda t: jlora.LoraConfig(alpha=math.inf), ValueError, r"alpha: expected a finite number > 0, got inf"),
    ("LoraConfig", "alpha=nan", lambda t: jlora.LoraConfig(alpha=math.nan), ValueError, r"alpha: expected a finite number > 0, got nan"),
    ("LoraConfig", "rank=0", lambda t: jlora.LoraConfig(rank=0), ValueError, r"rank: expected an int > 0, got 0; fix"),
    ("LoraConfig", "dropout=1", lambda t: jlora.LoraConfig(dropout=1.0), ValueError, r"dropout: expected a rate in \[0, 1\), got 1.0; fix"),
    ("LoraConfig", "dropout=nan", lambda t: jlora.LoraConfig(dropout=math.nan), ValueError, r"dropout: expected a rate in \[0, 1\), got nan"),
    ("LoraConfig", "alpha_pattern=inf", lambda t: jlora.LoraConfig(alpha_pattern={".*": math.inf}), ValueError, r"alpha_pattern\['\.\*'\]: expected a finite alpha > 0, got inf"),
    ("LoraConfig", "alpha_pattern=nan", lambda t: jlora.LoraConfig(alpha_pattern={".*": math.nan}), ValueError, r"alpha_pattern\['\.\*'\]: expected a finite alpha > 0, got nan"),
    ("LoraConfig", "rank_pattern=0", lambda t: jlora.LoraConfig(rank_pattern={".*": 0}), ValueError, r"rank_pattern\['\.\*'\]: expected a rank > 0, got 0; fix"),
    ("LoraConfig", "version=0", lambda t: jlora.LoraConfig(version=0), ValueError, r"version: expected schema 1, got 0, which no jlora ever wrote.*fix: leave version"),
    ("LoraConfig", "from_json malformed", lambda t: jlora.LoraConfig.from_json('{"rank": 8,'), ValueError, r"from_json: the text is not valid UTF-8 JSON \(Expecting property name.*fix: pass the contents"),
    ("LoraConfig", "from_json non-UTF-8", lambda t: jlora.LoraConfig.from_json(b'{"rank": "\xff"}'), ValueError, r"from_json: the text is not valid UTF-8 JSON \('utf-8' codec"),
    ("LoraConfig", "from_json None", lambda t: jlora.LoraConfig.from_json(None), TypeError, r"from_json: expected a JSON str, bytes or a dict, got NoneType; fix"),
    ("LoraConfig", "from_json older schema", lambda t: jlora.LoraConfig.from_json('{"rank": 8, "version": 0}'), ValueError, r"got 0, which no jlora ever wrote \(schemas start at 1\); fix: leave version"),
    # init
    ("init", "key=None", lambda t: jlora.init(None, _params(), CFG), TypeError, r"jlora.init: `key` must be a PRNG key, got NoneType None; fix: pass key=jax.random.key\(0\)"),
    ("init", "key=0", lambda t: jlora.init(0, _params(), CFG), TypeError, r"jlora.init: `key` must be a PRNG key, got int 0; fix: pass key=jax.random.key\(0\)"),
    ("init", "key float array", lambda t: jlora.init(jnp.ones(2), _params(), CFG), TypeError, r"`key` must be a PRNG key, got an array of dtype float32, shape \(2,\)"),
    ("init", "dtype='foo'", lambda t: jlora.init(KEY, _params(), CFG, dtype="foo"), TypeError, r"jlora.init: dtype= must be a float dtype or None, got 'foo'; fix"),
    ("init", "dtype=int32", lambda t: jlora.init(KEY, _params(), CFG, dtype=jnp.int32), TypeError, r"dtype= must be a float dtype or None"),
    ("init", "None leaf", lambda t: jlora.init(KEY, _with(_params(), "params/attn/query/kernel", None), CFG), ValueError, r"params leaf 'params/attn/query/kernel' is None \(matched by LoraConfig.targets.*fix: pass initialised parameters"),
    ("init", "rank_pattern typo", lambda t: jlora.init(KEY, _params(), CFG.replace(rank_pattern={r".*/qery/kernel": 1})), ValueError, r"LoraConfig.rank_pattern: '\.\*/qery/kernel' matched no parameter; closest paths: params/attn/query/kernel.*Fix the regex"),
    ("init", "alpha_pattern typo", lambda t: jlora.init(KEY, _params(), CFG.replace(alpha_pattern={r".*/vlaue/kernel": 1.0})), ValueError, r"LoraConfig.alpha_pattern: '\.\*/vlaue/kernel' matched no parameter; closest paths: params/attn/value/kernel"),
    ("init", "everything excluded", lambda t: jlora.init(KEY, _params(), CFG.replace(exclude=(".*",))), ValueError, r"every matched path \(params/attn/query/kernel, params/attn/value/kernel\) is excluded.*fix: narrow the exclude"),
    ("init", "config a dict", lambda t: jlora.init(KEY, _params(), {"rank": 2}), TypeError, r"config must be a jlora.LoraConfig, got dict; fix"),
    # lora_apply
    ("lora_apply", "lora=None lazy", lambda t: jlora.lora_apply(_query, CFG)(_fl()[0], None, X8), TypeError, r"lora_apply: `lora` is None; fix: fn\(frozen, lora, x\).*apply_fn\(frozen, x\)"),
    ("lora_apply", "lora=None merged", lambda t: jlora.lora_apply(_query, CFG, "merged")(_fl()[0], None, X8), TypeError, r"lora_apply: `lora` is None; fix"),
    ("lora_apply", "lora an array", lambda t: jlora.lora_apply(_query, CFG)(_fl()[0], jnp.ones(3), X8), TypeError, r"lora_apply: `lora` must be the lora tree.*got ArrayImpl"),
    ("lora_apply", "lora_rng=3", lambda t: jlora.lora_apply(_query, CFG.replace(dropout=0.1))(*_fl(), X8, lora_rng=3), TypeError, r"lora_apply: `lora_rng` must be a PRNG key, got int 3; fix: pass lora_rng=jax.random.key\(0\)"),
    ("lora_apply", "apply_fn not callable", lambda t: jlora.lora_apply(3, CFG), TypeError, r"apply_fn must be callable, got int; fix"),
    ("lora_apply", "mode='eager'", lambda t: jlora.lora_apply(_query, CFG, mode="eager"), ValueError, r"mode must be one of \('lazy', 'merged'\), got 'eager'; fix"),
    # merge / unmerge / delta / adapted
    ("merge", "fp16 overflow", lambda t: _overflowing_merge(), ValueError, r"jlora.merge: 'params/attn/query/kernel': max \|W0 \+ delta\| = 2.2e\+05 overflows float16 \(max 6.55e\+04\).*fix: keep the adapter lazy.*float32 copy"),
    ("merge", "into='int8'", lambda t: jlora.merge(*_fl(), CFG, into="int8"), ValueError, r"into must be None or 'float', got 'int8'.*fix"),
    ("merge", "dtype without into", lambda t: jlora.merge(*_fl(), CFG, dtype=jnp.bfloat16), TypeError, r"dtype= sets the dtype of dequantized kernels; it needs into='float'; fix"),
    ("merge", "missing B", lambda t: jlora.merge(_fl()[0], _with(_fl()[1], "params/attn/query/kernel", {"A": jnp.ones((8, 2))}), CFG), ValueError, r"has no partner 'params/attn/query/kernel/B'.*fix: make the lora tree with jlora.init"),
    ("unmerge", "quantized base", lambda t: jlora.unmerge(jlora.quantize(_fl()[0], CFG, scheme="int8"), _fl()[1], CFG), ValueError, r"jlora.unmerge: frozen leaf 'params/attn/query/kernel' is quantized.*Fix: unmerge float params \(what jlora.merge\(\.\.\., into='float'\) returns\)"),
    ("delta", "lora=None", lambda t: jlora.delta(_fl()[0], None, CFG), TypeError, r"jlora.adapted: `lora` must be the lora tree.*got NoneType None; fix"),
    ("adapted", "factor of wrong shape", lambda t: jlora.adapted(_fl()[0], _with(_fl()[1], "params/attn/query/kernel/A", jnp.ones((7, 2))), CFG), ValueError, r"A \(7, 2\) and B \(2, 8\) do not factor the frozen kernel of shape \(8, 8\).*fix"),
    ("adapted", "lora a list", lambda t: jlora.adapted(_fl()[0], [1, 2], CFG), TypeError, r"`lora` must be the lora tree.*got list"),
    # optimizer
    ("optimizer", "learning rate instead of tx", lambda t: jlora.optimizer(1e-3, _fl()[1]), TypeError, r"tx must be an optax GradientTransformation, got float 0.001; fix: jlora.optimizer\(optax.adamw\(1e-3\), lora\)"),
    ("optimizer", "b_lr_ratio=0", lambda t: jlora.optimizer(optax.adam(1e-3), _fl()[1], b_lr_ratio=0), ValueError, r"b_lr_ratio must be > 0, got 0; fix"),
    # extras, summary, inits
    ("bias_rules", "mode='some'", lambda t: jlora.bias_rules("some"), ValueError, r"mode must be one of \('none', 'all', 'lora_only'\).*got 'some'; fix"),
    ("summary", "lora=None", lambda t: jlora.summary(_fl()[0], None), TypeError, r"jlora.summary: `lora` must be the lora tree.*fix"),
    ("summary", "lora an int", lambda t: jlora.summary(_fl()[0], 3), TypeError, r"jlora.summary: `lora` must be the lora tree.*got int 3"),
    ("to_plain_adapter", "DoRA config", lambda t: jlora.to_plain_adapter(_fl()[0], _fl()[0], _fl()[1], CFG.replace(use_dora=True)), ValueError, r"a DoRA adapter is not linear.*fix: merge it"),
    # quantization
    ("quantize", "scheme='int3'", lambda t: jlora.quantize(_params(), CFG, scheme="int3"), ValueError, r"scheme must be one of \('nf4', 'int8', 'q8_0', 'q4_0', 'q4_1'\), got 'int3'; fix"),
    ("quant.from_gguf", "f32 bytes", lambda t: quant.from_gguf(np.zeros((2, 128), np.float32), "q8_0"), ValueError, r"raw must be uint8 bytes with a last axis that is a multiple of 34 \(q8_0 blocks\), got float32 \(2, 128\); fix: pass tensor.data"),
    ("quant.from_gguf", "bad perm", lambda t: quant.from_gguf(np.zeros((2, 34), np.uint8), "q8_0", perm=(0, 0)), ValueError, r"perm must be a permutation of the 2 axes of the stored tensor \(2, 32\), got \(0, 0\); fix"),
    ("quantize", "q8_0 on 20 inputs", lambda t: jlora.quantize({"w": jnp.ones((20, 64))}, "w", scheme="q8_0"), ValueError, r"GGUF blocks of 32 run along the input axis 0 of 'w' \(shape \(20, 64\)\), whose size 20 is not a multiple of 32; fix"),
    ("quantize", "block_size=0", lambda t: jlora.quantize(_params(), CFG, block_size=0), ValueError, r"block_size must be a positive even int.*got 0; fix"),
    ("quantize", "regex typo", lambda t: jlora.quantize(_params(), r".*/qery/kernel"), ValueError, r"'\.\*/qery/kernel' matched no parameter; closest paths: params/attn/query/kernel.*Fix the regex"),
    ("dequantize", "dtype='foo'", lambda t: jlora.dequantize(jlora.quantize(_params(), CFG, scheme="int8"), dtype="foo"), TypeError, r"jlora.quant.dequantize: dtype= must be a float dtype or None, got 'foo'; fix"),
    ("quant.quantized_sharding", "a str for the sharding", lambda t: quant.quantized_sharding(jlora.quantize(_params(), CFG)["params"]["attn"]["query"]["kernel"], "x"), TypeError, r"expected \(QuantizedArray, NamedSharding\), got \(QuantizedArray, str\); fix"),
    ("quant.dequantize_leaf", "an array", lambda t: quant.dequantize_leaf(jnp.ones((2, 2))), TypeError, r"dequantize_leaf: expected a QuantizedArray, got ArrayImpl; fix"),
    ("quant.splits_by_layer", "an array", lambda t: quant.splits_by_layer(jnp.ones((2, 2))), TypeError, r"splits_by_layer: expected a QuantizedArray, got ArrayImpl; fix"),
    ("quantized_apply", "apply_fn not callable", lambda t: jlora.quantized_apply(3), TypeError, r"quantized_apply: apply_fn must be callable, got int; fix"),
    ("quant.quant_report", "1-d shape", lambda t: quant.quant_report(shape=(64,)), ValueError, r"'w' \(shape \(64,\), dtype float32\) is not a float kernel.*fix"),
    # sharding
    ("lora_specs", "an int leaf", lambda t: jlora.lora_specs(jax.tree.map(lambda x: 3, _params()), _fl()[1], CFG), TypeError, r"base_specs leaf at 'params/attn/query/bias' is a int; expected a PartitionSpec.*fix"),
    ("lora_specs", "missing path", lambda t: jlora.lora_specs({"params": {}}, _fl()[1], CFG), ValueError, r"lora leaf 'params/attn/query/kernel/A' has no base spec.*fix: base_specs must have the same nesting"),
    ("lora_shardings", "an int leaf", lambda t: jlora.lora_shardings(jax.tree.map(lambda x: 3, _params()), _fl()[1], CFG), TypeError, r"^base_shardings leaf at 'params/attn/query/bias' is a int.*fix"),
    ("lora_shardings", "no mesh", lambda t: jlora.lora_shardings(jax.tree.map(lambda x: P(), _params()), _fl()[1], CFG), ValueError, r"needs a mesh and base_shardings carries none; fix: pass mesh="),
    ("sharding.state_shardings", "empty shardings", lambda t: sharding.state_shardings({}, _fl()[1], {}), ValueError, r"`shardings` is empty.*fix: pass default=NamedSharding"),
    # multi
    ("multi.stack", "no adapters", lambda t: multi.stack(_params(), {}), ValueError, r"no adapters given.*fix"),
    ("multi.select", "index 7", lambda t: multi.select(_stack()[1], 7), ValueError, r"select: index must be in \[0, 1\].*got \[7\].*fix: use Stack.id"),
    ("multi.select", "index -1", lambda t: multi.select(_stack()[1], -1), ValueError, r"select: index must be in \[0, 1\].*got \[-1\]"),
    ("multi.select", "index 0.5", lambda t: multi.select(_stack()[1], 0.5), TypeError, r"select: index must be an int or an int array, got float 0.5; fix"),
    ("multi.mixed_apply", "id 5", lambda t: _mixed([0, 5]), ValueError, IDS_RANGE.format(5)),
    ("multi.mixed_apply", "id -1", lambda t: _mixed([0, -1]), ValueError, IDS_RANGE.format(-1)),
    ("multi.mixed_apply", "id 5 under jit", lambda t: _mixed([0, 5], jit=True), jax.errors.JaxRuntimeError, IDS_RANGE.format(5)),
    ("multi.mixed_apply", "batch mismatch", lambda t: multi.mixed_apply(_query, _stack()[1].config)(_stack()[0], _stack()[1].lora, jnp.array([0, 1]), jnp.ones((3, 8))), ValueError, r"argument args\[0\] has batch \(3,\) but adapter_ids has shape \(2,\); fix"),
    ("multi.combine", "method='ties'", lambda t: multi.combine(_fl()[0], [(_fl()[1], CFG)], [1.0], method="ties"), ValueError, r"method must be 'cat', 'svd' or 'linear', got 'ties'; fix"),
    ("multi.example_weights", "float ids", lambda t: multi.example_weights(jnp.array([0.5, 1.0]), 2), TypeError, r"example_weights: ids must be an int array of shape \(batch,\), got float32 \(2,\); fix"),
    ("multi.example_weights", "n=0", lambda t: multi.example_weights(jnp.array([0, 1]), 0), ValueError, r"example_weights: n must be the number of stacked entries \(an int >= 1\), got 0; fix: n = len\(stack.names\) \+ 1"),
    ("multi.gathered_lowrank", "3-D x", lambda t: multi.gathered_lowrank(jnp.ones((2, 3, 4)), jnp.array([0, 1]), jnp.ones((2, 4, 1)), jnp.ones((2, 1, 4))), ValueError, r"gathered_lowrank: expected x \(rows, in\).*got x \(2, 3, 4\).*fix: flatten the tokens to rows"),
    ("multi.grouped_lowrank", "a of another width", lambda t: multi.grouped_lowrank(jnp.ones((2, 3)), jnp.array([0, 1]), jnp.ones((2, 4, 1)), jnp.ones((2, 1, 4))), ValueError, r"grouped_lowrank: expected x \(rows, in\).*a \(2, 4, 1\).*fix"),
    ("multi.per_adapter", "a learning rate", lambda t: multi.per_adapter(1e-3), TypeError, r"per_adapter: optimizer must be an optax GradientTransformation, got float 0.001; fix: e.g. per_adapter\(optax.adamw"),
    ("multi.put", "unknown slot", lambda t: multi.put(_stack()[1], "b", *_fl(), CFG), ValueError, r"no adapter named 'b'; the stack holds \['a'\]; fix"),
    ("multi.restore_stack", "missing folder", lambda t: multi.restore_stack(t / "nope", _params()), FileNotFoundError, r"restore_stack: no stack at '.*nope' \(expected .*stack.json\); fix: pass the directory given to jlora.multi.save_stack"),
    ("multi.save_stack", "folder holds a stack", lambda t: [multi.save_stack(t / "s", _stack()[1]) for _ in range(2)], FileExistsError, r"save_stack: .*s already holds a stack; fix: overwrite=True"),
    ("multi.scaled", "scales of another tree", lambda t: multi.scaled(_stack()[1].lora, {"params/x/kernel": jnp.ones(2)}), ValueError, r"scaled: scales has paths that are no kernel of the stacked lora tree: \['params/x/kernel'\].*fix: pass the stack's own scales"),
    ("multi.train_step", "serving stack", lambda t: multi.train_step(_query, _stack()[1], lambda y, t: y.sum(-1), optax.sgd(0.1)), ValueError, r"train_step: this stack has its scales folded into B \(serving\).*fix: jlora.multi.stack\(frozen, adapters, fold_scales=False\)"),
    ("multi.unstack", "a Stack made by hand", lambda t: multi.unstack(multi.Stack({}, CFG, ("a",))), ValueError, r"unstack: this Stack does not record its adapters' configs; fix: make it with jlora.multi.stack"),
    ("multi.Stack.id", "unknown name", lambda t: _stack()[1].id("b"), ValueError, r"no adapter named 'b'; the stack holds \['a'\]; fix"),
    ("quant.write_gguf", "missing source", lambda t: quant.write_gguf(t / "nope.gguf", t / "out.gguf", {}), FileNotFoundError, r"write_gguf: source .*nope.gguf is not a file; fix"),
    # peft
    ("peft.save", "key_map=3", lambda t: peft.save(t / "p", _fl()[1], CFG, key_map=3), TypeError, r"key_map: expected a callable path -> module name.*got int; fix"),
    ("peft.load", "missing folder", lambda t: peft.load(t / "nope", _params(), peft.BERT_KEY_MAP), FileNotFoundError, r"adapter folder .*nope does not exist; fix"),
    ("peft.module_name", "key_map=3", lambda t: peft.module_name("params/x/kernel", 3), TypeError, r"key_map: expected a callable.*fix"),
    # checkpoint
    ("save_adapter", "config a dict", lambda t: jlora.save_adapter(t / "b", _fl()[1], {"rank": 2}), TypeError, r"config must be a jlora.LoraConfig, got dict"),
    ("save_adapter", "directory exists", lambda t: jlora.save_adapter(_saved(t), _fl()[1], CFG), FileExistsError, r"already exists; pass overwrite=True"),
    ("restore_adapter", "missing folder", lambda t: jlora.restore_adapter(t / "nope"), ValueError, r"no adapter checkpoint at '.*nope'"),
    ("checkpoint.read_adapter_header", "missing folder", lambda t: checkpoint.read_adapter_header(t / "nope"), ValueError, r"no adapter checkpoint at '.*nope'"),
    ("checkpoint.validate_adapter", "other paths", lambda t: checkpoint.validate_adapter(_fl()[1], like={"x": jnp.ones(2)}), ValueError, r"only in the target: x. Fix"),
    ("TrainCheckpointer", "config a dict", lambda t: jlora.TrainCheckpointer(t / "c", {"rank": 2}), TypeError, r"config must be a jlora.LoraConfig, got dict"),
    # dora
    ("dora.magnitude_shape", "a str for f", lambda t: dora.magnitude_shape("d/kernel"), TypeError, r"magnitude_shape: `f` must be a jlora.Factored.*got str; fix"),
    ("dora.magnitude", "w0 of another shape", lambda t: dora.magnitude(jnp.ones((4, 8)), jnp.ones((8, 2)), jnp.ones((2, 8)), jlora.Factored("d", jlora.Layout((8, 8), "io"), 2, 1.0)), ValueError, r"`w0` of 'd' has shape \(4, 8\), expected the kernel's shape \(8, 8\); fix"),
    ("dora.column_norm", "a str for f", lambda t: dora.column_norm(jnp.ones((2, 2)), "d"), TypeError, r"`f` must be a jlora.Factored"),
    ("dora.dora_kernel", "a str for f", lambda t: dora.dora_kernel(jnp.ones((2, 2)), jnp.ones((2, 2)), jnp.ones(2), "d"), TypeError, r"`f` must be a jlora.Factored"),
    ("dora.kernel_sq_norm", "a str for f", lambda t: dora.kernel_sq_norm(jnp.ones((2, 2)), "d"), TypeError, r"`f` must be a jlora.Factored"),
    ("dora.dora_lazy_terms", "a str for f", lambda t: dora.dora_lazy_terms(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), jnp.ones(2), "d"), TypeError, r"`f` must be a jlora.Factored"),
    ("dora.norms", "lora=None", lambda t: dora.norms(_fl()[0], None, CFG), TypeError, r"`lora` must be the lora tree.*fix"),
    ("dora.unmerge", "no norms", lambda t: dora.unmerge(*_dora_merged(), {}), ValueError, r"no norm for the DoRA kernel 'params/attn/query/kernel' in `norms`.*fix: pass norms=jlora.dora.norms"),
]


def _dora_merged():
    cfg = CFG.replace(use_dora=True)
    frozen, lora = jlora.init(KEY, _params(), cfg)
    return jlora.merge(frozen, lora, cfg), lora, cfg


# Clear messages that do not say their fix yet: the checkpoint module belongs to another slice of issue 15.
NO_FIX_YET = {("save_adapter", "config a dict"), ("restore_adapter", "missing folder"),
              ("checkpoint.read_adapter_header", "missing folder"), ("TrainCheckpointer", "config a dict"),
              ("save_adapter", "directory exists")}  # says "pass overwrite=True", not "fix:"

# Public names with no bad input to try: records filled by jlora itself, or functions that accept anything.
NO_BAD_INPUT = {
    "Factored": "a record made by jlora.adapted", "Summary": "a record returned by jlora.summary",
    "QuantizedArray": "a record made by jlora.quantize (also a pytree node rebuilt by jax)",
    "checkpoint.TrainState": "a record returned by TrainCheckpointer.restore", "multi.Stack": "made by multi.stack",
    "quant.is_quantized": "any object is a valid input",
}


def _public_names():
    import inspect

    names = {n for n in jlora.__all__ if not inspect.ismodule(getattr(jlora, n))}
    for mod in (multi, peft, quant, checkpoint, dora, sharding):
        for n in getattr(mod, "__all__", vars(mod)):
            obj = getattr(mod, n)
            if not n.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__.startswith(mod.__name__):
                if getattr(jlora, n, None) is not obj:
                    names.add(f"{mod.__name__.split('.')[-1]}.{n}")
    return names


def test_every_public_function_has_a_bad_input_case():
    covered = {name.rsplit(".", 1)[0] if name == "multi.Stack.id" else name for name, *_ in CASES}
    missing = _public_names() - covered - set(NO_BAD_INPUT)
    assert not missing, f"public functions without a bad-input case: {sorted(missing)}"


@pytest.mark.parametrize("name, case, call, exc, message", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input(tmp_path: pathlib.Path, name, case, call, exc, message):
    with pytest.raises(exc, match=message) as info:
        call(tmp_path)
    if (name, case) not in NO_FIX_YET:
        assert "fix" in str(info.value).lower(), f"{name} ({case}): the message gives no fix: {info.value}"


def test_merge_overflow_is_checked_eagerly_and_documented_under_jit():
    frozen = {"w": jnp.full((4, 4), 6e4, jnp.float16)}
    lora = {"w": {"A": jnp.ones((4, 1)), "B": jnp.ones((1, 4))}}
    cfg = jlora.LoraConfig(rank=1, alpha=1e4, targets="w")  # delta 1e4: 7e4 > float16 max 65504
    with pytest.raises(ValueError, match=r"'w': max \|W0 \+ delta\| = 7e\+04 overflows float16"):
        jlora.merge(frozen, lora, cfg)
    # lazy mode adds the branch in float32 and casts the output: finite where the product fits
    y = jlora.lora_apply(lambda p, x: x @ p["w"], cfg)(frozen, lora, jnp.full(4, 0.1, jnp.float16))
    assert y.dtype == jnp.float16 and bool(jnp.isfinite(y).all())
    # under jit the values are unknown: documented, the cast makes inf (as astype does)
    merged = jax.jit(jlora.merge, static_argnums=2)(frozen, lora, cfg)
    assert bool(jnp.isinf(merged["w"]).all())
    # an fp16 base that fits merges as before
    ok = jlora.merge(frozen, lora, cfg.replace(alpha=1e3))
    np.testing.assert_allclose(np.asarray(ok["w"], np.float64), 6.1e4, rtol=1e-3)
    # a quantized base merged into float16 is checked too
    q = jlora.quantize({"w": jnp.full((4, 64), 6e4)}, "w", scheme="int8")
    big = {"w": {"A": jnp.ones((4, 1)), "B": jnp.ones((1, 64))}}
    with pytest.raises(ValueError, match=r"'w': max \|W0 \+ delta\| = 7e\+04 overflows float16"):
        jlora.merge(q, big, cfg, into="float", dtype=jnp.float16)


def test_lora_tree_of_another_rank_than_the_config_is_refused():
    frozen, lora = _fl()  # rank 2
    with pytest.raises(ValueError, match=r"have rank 2 .* the config gives rank 4 there.*fix: pass the LoraConfig"):
        jlora.lora_apply(_query, CFG.replace(rank=4))(frozen, lora, X8)


def test_lora_tree_for_a_path_the_config_does_not_target_is_refused():
    frozen, lora = _fl()
    with pytest.raises(ValueError, match=r"the config does not target it.*fix: pass the LoraConfig"):
        jlora.merge(frozen, lora, CFG.replace(targets=r".*/nothing_here/kernel"))
