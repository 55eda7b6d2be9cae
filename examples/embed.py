"""Echelon inside your own script: your model, loss and data, trained across two boundaries (simulated).

python examples/embed.py [OUT]          # writes the run directory OUT (default runs/embed)
"""

import json
import sys
from pathlib import Path

import datasets
import torch
from torch import nn

import echelon


class Bigram(nn.Module):
    """The next byte from the current one (ids 0..259: the default byte-level tokenizer's)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(260, 16), nn.Linear(16, 260)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def next_byte_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:  # an echelon.TaskLoss
    return nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())


out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/embed")
files = sorted(Path(json.__file__).parent.glob("*.py"))  # some local text: the json package's sources
rows = [{"text": f.read_text(), "domain": f.stem} for f in files]
data = datasets.Dataset.from_list(rows)  # or datasets.load_dataset("json", data_files=..., split="train")
config = echelon.load_config(
    {
        "name": "embed",
        "model": {"trainable": "full"},
        "data": {"seq_len": 32, "partition": {"kind": "iid"}},
        "boundaries": [
            {
                "id": "hospital",
                "devices": [{"id": "h0", "tokens_per_s": 2000}, {"id": "h1", "tokens_per_s": 1000}],
            },
            {
                "id": "bank",
                "devices": [{"id": "b0", "tokens_per_s": 1500}, {"id": "b1", "tokens_per_s": 800}],
            },
        ],
        "train": {"inner_steps": 4, "micro_batch": 4, "lr": 0.01},
        "echelon": {"sync": {"interval": 2}},
        "budget": {"outer_steps": 2},
        "eval": {"sequences": 16, "batch": 16},
    }
)
summary = echelon.simulate(config, out, model=Bigram(), loss=next_byte_loss, data=data, force=True)
print(f"{summary.name}: validation loss {summary.start_val_loss:.3f} -> {summary.end_val_loss:.3f}")
