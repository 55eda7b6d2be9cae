"""The single-process run a plan's execution must reproduce: the same model, batches and optimizer.

Each replica of `echelon execute` trains on its own batches (`StepBatches`); here the whole model
trains on one replica's batches in one process with a stock `model(input_ids, labels=input_ids)`
loss, AdamW and no parallelism at all. The benchmark and the tests compare its loss trajectory
with the pipelined, data-parallel execution's.
"""

from __future__ import annotations

import torch

from echelon.yellowstone.execute.job import JobOptions, StepBatches, corpus_rows, model_config
from echelon.yellowstone.plan import Plan


def reference_losses(plan: Plan, options: JobOptions, replica: int = 0) -> list[float]:
    """Per-step mean loss of replica `replica`'s batches trained in one process (fp32)."""
    from echelon.train.model import build_model

    bundle = build_model(model_config(plan, dropout=0.0), options.seed)
    rep = [r for b in plan.boundaries for r in b.replicas][replica]
    train = corpus_rows(plan, bundle.tokenizer, options)
    batches = StepBatches(train, rep.micro_batch * rep.micro_batches, options.seed, replica)
    optimizer = torch.optim.AdamW(bundle.trainable, lr=options.optimisation.lr, foreach=True)
    losses = []
    for step in range(options.steps):
        tokens = batches(step)
        loss = bundle.model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
