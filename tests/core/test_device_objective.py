"""The device plane's local objective: proximal gradient and clipping."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from echelon.assembly import prepare
from echelon.config import RunConfig
from echelon.planes.device import clip_delta
from tests.helpers import small_run


def _trainer(mu: float):
    cfg = RunConfig.model_validate(small_run(echelon={"proximal_mu": mu}))
    return prepare(cfg)


def test_proximal_gradient_is_task_gradient_plus_mu_times_distance():
    mu = 0.37
    prep = _trainer(mu)
    bundle, trainer = prep.bundle, prep.trainer
    anchor = bundle.get_vector()
    theta = anchor + 0.05 * torch.randn(anchor.shape, generator=torch.Generator().manual_seed(1))
    batches = [np.arange(4)]

    def grads(m: float) -> torch.Tensor:
        trainer.mu = m
        bundle.set_vector(theta)
        for p in bundle.trainable:
            p.grad = None
        trainer.accumulate_gradients(batches, anchor)
        return torch.cat([p.grad.reshape(-1) for p in bundle.trainable])

    with_prox, task_only = grads(mu), grads(0.0)
    torch.testing.assert_close(with_prox - task_only, mu * (theta - anchor), rtol=1e-5, atol=1e-7)


def test_proximal_term_vanishes_at_the_anchor():
    prep = _trainer(0.5)
    bundle, trainer = prep.bundle, prep.trainer
    anchor = bundle.get_vector()
    for p in bundle.trainable:
        p.grad = None
    trainer.accumulate_gradients([np.arange(4)], anchor)
    with_prox = torch.cat([p.grad.reshape(-1) for p in bundle.trainable])
    trainer.mu = 0.0
    for p in bundle.trainable:
        p.grad = None
    trainer.accumulate_gradients([np.arange(4)], anchor)
    torch.testing.assert_close(with_prox, torch.cat([p.grad.reshape(-1) for p in bundle.trainable]))


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=64),
    clip=st.floats(1e-3, 1e3),
)
def test_clipping_bounds_the_norm_and_keeps_the_direction(values, clip):
    delta = torch.tensor(values, dtype=torch.float64)
    out = clip_delta(delta, clip)
    norm = float(torch.linalg.vector_norm(delta))
    assert float(torch.linalg.vector_norm(out)) <= clip * (1 + 1e-9)
    if norm <= clip:
        assert torch.equal(out, delta)
    else:
        # Same direction: a positive multiple.
        torch.testing.assert_close(out * (norm / clip), delta)


def test_clipping_disabled_is_identity():
    delta = torch.tensor([3.0, 4.0])
    assert torch.equal(clip_delta(delta, None), delta)
