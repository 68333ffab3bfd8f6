"""jlora on penzai's own model code (penzai 0.2.5, installed --no-deps by scripts/setup.sh): a llamalike
transformer whose embedder looks rows up with a gather on its named table and whose projections are
named-axis einsums. ``init`` reads every kernel's roles from the trace (the table as an embedding), and the
lazy rewrite runs every use strictly (no merged fallback, warnings as errors), matching merged mode's output
and gradients; merged mode itself is checked against a float64 delta in tests/test_core.py."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer.variants import llamalike_common as llamalike

import jlora

TOKENS = jnp.array([[1, 5, 7, 3, 9, 2], [4, 4, 0, 8, 6, 1]])
CONFIG = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*(embeddings|query|key|value_linear|out_linear).*")


def _model():
    cfg = llamalike.LlamalikeTransformerConfig(
        num_kv_heads=2, query_head_multiplier=1, embedding_dim=16, projection_dim=8, mlp_hidden_dim=32,
        num_decoder_blocks=2, vocab_size=50, mlp_variant="swiglu", tie_embedder_and_logits=False)
    unbound, params = pz.unbind_params(llamalike.build_llamalike_transformer(cfg, init_base_rng=jax.random.key(0)))
    values = {p.label: p.value for p in params}  # label -> NamedArray (a pytree: its data_array is the leaf)

    def apply_fn(vals, tokens):
        model = pz.bind_variables(unbound, [pz.Parameter(value=v, label=k) for k, v in vals.items()])
        return model(pz.nx.wrap(tokens).tag("batch", "seq")).unwrap("batch", "seq", "vocabulary")

    return values, apply_fn


def test_penzai_roles_lazy_and_gradients_match_merged():
    values, apply_fn = _model()
    frozen, lora = jlora.init(jax.random.key(1), values, CONFIG, apply_fn=apply_fn, args=(TOKENS,))
    layouts = jlora.kernel_layouts(lora)
    table = layouts["transformer/embedder.embeddings/data_array"]
    assert (table.kind, table.roles) == ("embed", "io")  # (vocabulary, embedding): rows looked up
    assert layouts["transformer/block_0/attention/query.weights/data_array"].roles == "ioo"  # (embedding, heads, projection)
    assert len(layouts) == 1 + 2 * 4
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape), lora)

    def loss(fn):
        return lambda lo: jnp.mean(fn(frozen, lo, TOKENS) ** 2)

    lazy = jlora.lora_apply(apply_fn, CONFIG, strict=True)
    merged = jlora.lora_apply(apply_fn, CONFIG, mode="merged")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning anywhere
        y_lazy = jax.jit(lazy)(frozen, lora, TOKENS)
        g_lazy = jax.jit(jax.grad(loss(lazy)))(lora)
    y_merged = jax.jit(merged)(frozen, lora, TOKENS)
    g_merged = jax.jit(jax.grad(loss(merged)))(lora)
    np.testing.assert_allclose(np.asarray(y_lazy), np.asarray(y_merged), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(y_merged - apply_fn(values, TOKENS)).max()) > 1e-3  # the adapter changes the output
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_lazy), jax.tree.leaves(g_merged)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=str(path))
