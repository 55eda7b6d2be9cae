"""The single-process run a plan's execution must reproduce: the same model, batches and optimizer.

Each replica of `echelon execute` trains on its own batches (`StepBatches`); here the whole model
trains on one replica's batches in one process with a stock `model(input_ids, labels=input_ids)`
loss, AdamW and no parallelism at all. The benchmark and the tests compare its loss trajectory
with the pipelined, data-parallel execution's.
"""

from __future__ import annotations

import torch

from echelon.yellowstone.execute.job import StepBatches, model_config
from echelon.yellowstone.plan import Plan


def reference_losses(plan: Plan, train, replica: int, steps: int, seed: int, lr: float) -> list[float]:
    """Per-step mean loss of replica `replica`'s batches trained in one process (fp32)."""
    from echelon.train.model import build_model

    bundle = build_model(model_config(plan, dropout=0.0), seed)
    rep = [r for b in plan.boundaries for r in b.replicas][replica]
    batches = StepBatches(train, rep.micro_batch * rep.micro_batches, seed, replica)
    optimizer = torch.optim.AdamW(bundle.trainable, lr=lr, foreach=True)
    losses = []
    for step in range(steps):
        tokens = batches(step)
        loss = bundle.model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
