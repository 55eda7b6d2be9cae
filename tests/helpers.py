"""Helpers for tests: small, fast run configurations on the built-in tiny model and corpus."""

from __future__ import annotations


def small_run(**overrides) -> dict:
    """A run file (as a dict) that trains in seconds: tiny LoRA model, 40 stdlib documents."""
    cfg = {
        "name": "small",
        "seed": 0,
        "model": {"preset": "tiny", "trainable": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {
            "source": "stdlib",
            "seq_len": 32,
            "max_documents": 40,
            "partition": {"kind": "dirichlet", "alpha": 0.5},
        },
        "train": {"inner_steps": 2, "micro_batch": 4, "lr": 0.003},
        "echelon": {"buffer_size": 2, "buffer_timeout_s": 5, "sync": {"interval": 2}},
        "boundaries": [
            {"id": "b0", "devices": [{"id": "d0", "tokens_per_s": 2000}, {"id": "d1", "tokens_per_s": 1000}]},
            {"id": "b1", "devices": [{"id": "d2", "tokens_per_s": 1500}, {"id": "d3", "tokens_per_s": 800}]},
        ],
        "budget": {"outer_steps": 3},
        "eval": {"sequences": 8, "batch": 8},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg
