"""Model profiles: per-unit parameters, FLOPs, activation and state bytes, raw-data flags.

A model is a list of units in pipeline order: the token embedding (touches raw data: the input
tokens), the decoder layers, and the head (final norm, LM head and loss; touches raw data: the
labels). Shapes come from a local transformers `config.json` (Llama-style fields), the built-in
`tiny` preset that `echelon train` and `echelon execute` build (`echelon.train.presets`), or a
shape preset written here (Llama 3.2 1B/3B, Llama 3.1 8B/70B); nothing is downloaded. A profile
remembers its `source` (the preset name or the checkpoint directory), so the executor builds
exactly the model that was planned.

Conventions (per token, `seq_len` tokens per sequence):
- forward FLOPs of a decoder layer: 2 x matmul parameters + 2 x seq_len x hidden (causal
  attention scores and values); full training costs 3x forward, LoRA 2x forward for the frozen
  matmuls (activation gradients only) plus 3x for attention and the adapters;
- stashed activations of a decoder layer: (6 h + 2 kv + 4 ffn) elements in the training dtype
  (flash attention: no score matrix); with activation checkpointing only the layer input (h)
  stays, and one layer's full stash is rebuilt at a time;
- the head keeps its input and fp32 logits (4 x vocab bytes) for the loss;
- training state: full = 16 bytes per parameter (bf16 weights and gradients, fp32 master and
  Adam moments); LoRA = the frozen weights in the dtype + 16 bytes per adapter parameter.
Tied embeddings are counted as two copies (conservative; a U-shaped plan keeps both on one cluster).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from echelon.errors import UserError
from echelon.train.presets import TINY_LLAMA

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder-only transformer that set its cost."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    head_dim: int
    tied: bool = False  # the LM head shares the embedding matrix

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int) -> ModelShape:
    return ModelShape(hidden, layers, heads, kv_heads, ffn, 128_256, hidden // heads)


def _shape_of(cfg: dict) -> ModelShape:
    """The shape of a Llama-style config (a config.json's fields); KeyError names a missing field."""
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return ModelShape(
        hidden=hidden,
        layers=int(cfg["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        ffn=int(cfg["intermediate_size"]),
        vocab=int(cfg["vocab_size"]),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        tied=bool(cfg.get("tie_word_embeddings", False)),
    )


PRESETS: dict[str, ModelShape] = {
    "tiny": _shape_of(TINY_LLAMA),
    "llama-1b": _llama(2048, 16, 32, 8, 8192),
    "llama-3b": _llama(3072, 28, 24, 8, 8192),
    "llama-8b": _llama(4096, 32, 32, 8, 14336),
    "llama-70b": _llama(8192, 80, 64, 8, 28672),
}


@dataclass(frozen=True)
class Unit:
    """One pipeline unit. Bytes and FLOPs are per token unless named otherwise."""

    name: str
    kind: Literal["embed", "layer", "head"]
    params: int
    trainable: int
    weight_bytes: float  # the unit's weights in the dtype (what FSDP all-gathers)
    state_bytes: float  # weights, gradients and optimizer state held for training
    grad_bytes: float  # trainable gradients exchanged by data parallelism
    flops: float  # forward + backward per token
    recompute_flops: float  # extra forward per token under activation checkpointing
    stash: float  # bytes per token kept for the backward pass
    ckpt_stash: float  # bytes per token kept under activation checkpointing
    raw_data: bool


@dataclass(frozen=True)
class ModelProfile:
    """A model prepared for planning: units plus the training shape they were costed for."""

    name: str
    shape: ModelShape
    trainable: Literal["lora", "full"]
    dtype: str
    seq_len: int
    micro_batch: int
    lora_rank: int
    units: tuple[Unit, ...]
    source: str = ""  # preset name or checkpoint directory the executor builds; "" = the name

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def activation_bytes(self) -> float:
        """Bytes per token sent between pipeline stages (a hidden state; its gradient comes back)."""
        return self.shape.hidden * self.dtype_bytes

    @property
    def params(self) -> int:
        return sum(u.params for u in self.units)

    @property
    def flops_per_token(self) -> float:
        return sum(u.flops for u in self.units)

    @property
    def state_bytes(self) -> float:
        return sum(u.state_bytes for u in self.units)


def build_profile(
    name: str,
    shape: ModelShape,
    *,
    trainable: Literal["lora", "full"] = "lora",
    dtype: str = "bf16",
    seq_len: int = 2048,
    micro_batch: int = 4,
    lora_rank: int = 16,
    source: str = "",
) -> ModelProfile:
    """Cost every unit of `shape` for the given training mode (LoRA adapters on q_proj and v_proj)."""
    if dtype not in DTYPE_BYTES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    b = DTYPE_BYTES[dtype]
    h, kv, ffn, v, s = shape.hidden, shape.kv_dim, shape.ffn, shape.vocab, seq_len
    full = trainable == "full"

    def unit(kind, name, params, matmul, attn, adapter, stash, ckpt_stash, raw) -> Unit:
        fwd = 2 * matmul + attn
        if full:
            flops, train, state = 3 * fwd, params, 16.0 * params
        else:
            flops = 2 * 2 * matmul + 3 * attn + 3 * 2 * adapter
            train, state = adapter, b * params + 16.0 * adapter
        if kind == "embed" and not full:
            flops = 0.0  # a frozen lookup: no backward
        return Unit(
            name, kind, params + (adapter if not full else 0), train, b * params, state, b * train,
            float(flops), float(fwd + 2 * adapter), float(stash), float(ckpt_stash), raw,
        )  # fmt: skip

    attn_params = 2 * h * h + 2 * h * kv
    layer_params = attn_params + 3 * h * ffn + 2 * h
    adapter = lora_rank * ((h + h) + (h + kv))
    layer_stash = (6 * h + 2 * kv + 4 * ffn) * b
    units = [unit("embed", "embed", v * h, 0, 0, 0, 0, 0, True)]
    units += [
        unit(
            "layer",
            f"layer {i}",
            layer_params,
            attn_params + 3 * h * ffn,
            2 * s * h,
            adapter,
            layer_stash,
            h * b,
            False,
        )
        for i in range(shape.layers)
    ]
    head_stash = h * b + 4 * v
    units.append(unit("head", "head", v * h + h, v * h, 0, 0, head_stash, head_stash, True))
    return ModelProfile(
        name, shape, trainable, dtype, seq_len, micro_batch, lora_rank, tuple(units), source or name
    )


def shape_from_config(path: Path) -> ModelShape:
    """Read a Llama-style transformers config.json (a directory holding one, or the file)."""
    file = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{file}: no such file; --model takes a preset or a directory with config.json"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: cannot read the model config: {e}") from None
    try:
        return _shape_of(cfg)
    except KeyError as e:
        raise UserError(
            f"{file}: field {e.args[0]} is missing; Yellowstone reads Llama-style configs "
            "(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size)"
        ) from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{file}: a shape field is not a whole number: {e}") from None


def resolve_model(spec: str) -> tuple[str, ModelShape, str]:
    """A preset name or a local checkpoint path -> (display name, shape, source).

    `source` is what an executor builds: the preset name, or the checkpoint directory made absolute.
    """
    if spec in PRESETS:
        return spec, PRESETS[spec], spec
    path = Path(spec)
    if path.exists():
        directory = path if path.is_dir() else path.parent
        return path.name or spec, shape_from_config(path), str(directory.resolve())
    raise UserError(
        f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path to a config.json"
    )
