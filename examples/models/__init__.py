"""Ports of pretrained models the examples fine-tune (imported as ``examples.models.<name>``): ``llama``
(Llama family), ``minilm`` (BERT encoder), ``smollm`` (SmolLM2-135M-Instruct from its GGUF), ``moe`` (a
small mixture-of-experts decoder)."""
