"""Model profiles: presets have the published sizes; local configs load; LoRA is cheaper."""

from __future__ import annotations

import json

import pytest

from echelon.errors import UserError
from echelon.yellowstone.model_profile import PRESETS, build_profile, resolve_model


@pytest.mark.parametrize(
    ("name", "billions"), [("llama-1b", 1.24), ("llama-3b", 3.6), ("llama-8b", 8.03), ("llama-70b", 70.6)]
)
def test_preset_parameter_counts(name, billions):
    p = build_profile(name, PRESETS[name], trainable="full")
    # Tied 1B/3B presets count the head as its own copy, so allow the untied total there.
    untied = p.params / 1e9
    assert billions * 0.97 < untied < billions * 1.25


def test_units_flags_and_lora():
    full = build_profile("llama-8b", PRESETS["llama-8b"], trainable="full")
    lora = build_profile("llama-8b", PRESETS["llama-8b"], trainable="lora")
    kinds = [u.kind for u in full.units]
    assert kinds[0] == "embed" and kinds[-1] == "head" and kinds.count("layer") == 32
    assert [u.raw_data for u in full.units] == [True] + [False] * 32 + [True]
    assert full.state_bytes == pytest.approx(16 * full.params)
    assert lora.state_bytes < full.state_bytes / 6 and lora.flops_per_token < full.flops_per_token
    assert full.units[1].ckpt_stash < full.units[1].stash
    assert full.flops_per_token == pytest.approx(6 * full.params, rel=0.15)


def test_local_config(tmp_path):
    cfg = {
        "hidden_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "vocab_size": 1000,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _name, shape, source = resolve_model(str(tmp_path))
    assert source == str(tmp_path.resolve())
    assert shape.layers == 3 and shape.kv_heads == 4 and shape.head_dim == 64
    del cfg["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="vocab_size"):
        resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="neither a preset"):
        resolve_model("llama-9000b")
