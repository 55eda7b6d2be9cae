"""Architectures of the built-in model presets, as plain data (no ML framework imported), so
checks can size a run before any model is built."""

from __future__ import annotations

# The `tiny` preset: a few million parameters, trainable on two CPU cores.
TINY_LLAMA = dict(
    vocab_size=260,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
)
