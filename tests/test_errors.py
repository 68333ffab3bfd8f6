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


@pytest.mark.parametrize("alpha", [0, -1.0, "16"])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="LoraConfig.alpha: expected a number > 0"):
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
