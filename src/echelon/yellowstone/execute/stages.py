"""Pipeline stages as modules: contiguous unit ranges of a Llama-family causal LM.

Plan units are 0 = token embedding, 1..L = decoder layers, L + 1 = head (final norm, LM head and
the loss). A `UnitRange` holds the very submodules of the whole model for its units and keeps the
whole model's parameter names (`model.layers.3.self_attn.q_proj...`), so a checkpoint written
under one layer split loads under another, and the flat trainable vector the planes exchange is
assembled by name whatever the split.

The loss is a sum of next-token cross-entropies over the sequences a rank computes (logits upcast
to float32, the last position of each sequence has no label), so uneven shares of a micro-batch
add up exactly; the caller divides by the micro-batch's token count, which reproduces the mean
loss a single process computes with `model(input_ids, labels=input_ids)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_causal_mask

PEFT_PREFIX = "base_model.model."


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The Llama-family `...ForCausalLM` inside `model` (a peft wrapper or the model itself)."""
    inner = model.base_model.model if hasattr(model, "peft_config") else model
    if not all(hasattr(inner, a) for a in ("model", "lm_head")) or not hasattr(inner.model, "layers"):
        raise TypeError(f"{type(inner).__name__} is not a Llama-family causal LM (model.layers, lm_head)")
    return inner


def canonical_name(name: str) -> str:
    """A trainable parameter's name relative to the causal LM (peft's wrapper prefix removed)."""
    return name.removeprefix(PEFT_PREFIX)


class UnitRange(nn.Module):
    """Units [start, end) of a causal LM with `layers` decoder layers; forward maps the stage input
    (token ids when the range starts at the embedding, else hidden states) to its output (logits
    when it ends with the head, else hidden states). `checkpointing` recomputes each decoder layer
    in the backward pass instead of keeping its activations."""

    def __init__(self, lm: nn.Module, start: int, end: int, *, checkpointing: bool = False) -> None:
        super().__init__()
        n_layers = len(lm.model.layers)
        if not 0 <= start < end <= n_layers + 2:
            raise ValueError(f"unit range [{start}, {end}) outside a model of {n_layers + 2} units")
        self.start, self.end, self.checkpointing = start, end, checkpointing
        self.first, self.last = start == 0, end == n_layers + 2
        self.config = lm.config
        self.model = nn.Module()
        if self.first:
            self.model.embed_tokens = lm.model.embed_tokens
        self.model.layers = nn.ModuleDict(
            {str(i - 1): lm.model.layers[i - 1] for i in range(max(start, 1), min(end, n_layers + 1))}
        )
        # The rotary table is a buffer, not a parameter: every stage computes its own.
        self.model.rotary_emb = lm.model.rotary_emb
        if self.last:
            self.model.norm = lm.model.norm
            self.lm_head = lm.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(x) if self.first else x
        if len(self.model.layers):
            positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
            mask = create_causal_mask(
                config=self.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=positions
            )
            rotary = self.model.rotary_emb(h, position_ids=positions)
            for layer in self.model.layers.values():
                if self.checkpointing and torch.is_grad_enabled():
                    h = checkpoint(
                        layer,
                        h,
                        attention_mask=mask,
                        position_ids=positions,
                        position_embeddings=rotary,
                        use_reentrant=False,
                    )
                else:
                    h = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
        if self.last:
            return self.lm_head(self.model.norm(h))
        return h


def token_loss_sum(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies of `tokens` [B, T] under `logits` [B, T, V], in float32."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum"
    )


def predicted_tokens(sequences: int, seq_len: int) -> int:
    """How many tokens carry a label in `sequences` sequences of `seq_len` (the loss divisor)."""
    return sequences * (seq_len - 1)
