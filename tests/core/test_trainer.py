"""The local trainer's inner-loop features: schedule, gradient clipping, bfloat16 autocast,
gradient checkpointing."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from echelon.assembly import prepare
from echelon.config import RunConfig, TrainConfig
from echelon.strategies import effective_config
from echelon.train.trainer import LocalTrainer, ScaffoldTrainer, learning_rate
from tests.helpers import small_run


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    lrs = [learning_rate(cfg, t, decay_steps=14) for t in range(18)]
    assert lrs[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14:] == [pytest.approx(0.1)] * 4
    constant = TrainConfig(lr=0.3, warmup_steps=2)
    assert [learning_rate(constant, t, None) for t in range(4)] == [0.15, 0.3, 0.3, 0.3]


def test_cosine_without_a_length_is_refused_naming_the_fix():
    run = small_run(train={"schedule": "cosine"}, budget={"outer_steps": 2})
    with pytest.raises(ValueError, match="decay_steps"):
        RunConfig.model_validate(run)


@pytest.fixture(scope="module")
def shared():
    """One model, corpus and shards for every test here (building them is most of the cost)."""
    return prepare(effective_config(RunConfig.model_validate(small_run())))


def _trainer(shared, kind=LocalTrainer, **train):
    cfg = shared.trainer.cfg.model_copy(update=train)
    return kind(shared.bundle, shared.corpus, shared.shards, cfg, 0.0, 0)


def test_inner_gradient_clipping_bounds_every_step(shared):
    # SCAFFOLD's inner optimiser is plain SGD, so a step moves theta by exactly lr * the gradient.
    moved = {}
    for clip in (None, 1e-3):
        trainer = _trainer(shared, ScaffoldTrainer, inner_steps=2, lr=0.5, grad_clip=clip)
        theta = trainer.initial_state()
        result = trainer.local_round("d0", theta)
        part = trainer.model_part  # the model, not SCAFFOLD's control variates beside it
        moved[clip] = float(torch.linalg.vector_norm(part(result.theta) - part(theta)))
    assert moved[1e-3] <= 2 * 0.5 * 1e-3 * (1 + 1e-4)
    assert moved[None] > 100 * moved[1e-3]


def test_bfloat16_autocast_runs_the_forward_pass_in_bfloat16(shared):
    dtypes = {}
    linear = next(m for m in shared.bundle.model.modules() if isinstance(m, torch.nn.Linear))
    hook = linear.register_forward_hook(
        lambda mod, args, out: dtypes.setdefault(precision, set()).add(out.dtype)
    )
    for precision in ("float32", "bfloat16"):
        trainer = _trainer(shared, precision=precision)
        result = trainer.local_round("d0", trainer.initial_state())
        assert np.isfinite(result.loss) and result.theta.dtype == torch.float32  # the exchanged state
    hook.remove()
    assert dtypes == {"float32": {torch.float32}, "bfloat16": {torch.bfloat16}}


def test_gradient_checkpointing_recomputes_to_the_same_gradients(shared):
    grads = []
    for checkpointing in (False, True):
        trainer = _trainer(shared, gradient_checkpointing=checkpointing)
        assert shared.bundle.model.is_gradient_checkpointing == checkpointing
        anchor = trainer.initial_state()
        trainer.accumulate_gradients([np.arange(4)], anchor)
        grads.append(torch.cat([p.grad.reshape(-1) for p in shared.bundle.trainable]))
        for p in shared.bundle.trainable:
            p.grad = None
    shared.bundle.model.gradient_checkpointing_disable()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert float(torch.linalg.vector_norm(grads[0])) > 0
