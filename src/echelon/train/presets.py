"""Built-in model presets as plain Llama config fields (no ML framework imported here).

`tiny` is a randomly initialised Llama of a few million parameters with a byte-level vocabulary,
trainable on two CPU cores. Yellowstone plans it from these same fields (`echelon plan --model
tiny`), `echelon.train.model` builds it from them, and preflight sizes a run from them before any
model is built, so what is planned and checked is what is run.
"""

from __future__ import annotations

TINY_LLAMA: dict[str, int | float | bool] = dict(
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
