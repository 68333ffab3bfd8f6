"""Flax ports of pretrained models the examples fine-tune: ``llama`` (Llama family), ``minilm`` (BERT
encoder), ``smollm`` (SmolLM2-135M-Instruct from its GGUF)."""
