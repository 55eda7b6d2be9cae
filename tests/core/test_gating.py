"""Alignment gating (paper Proposition 1): accepting middle updates on their alignment with the
boundary's direction raises the alignment of what is accepted, and training goes on."""

from __future__ import annotations

import statistics

import torch

from echelon.config import BudgetConfig, EchelonConfig, PrivacyConfig, SyncConfig
from tests.core.fleet import QuadraticTrainer, protocol_sim


def _gated_run(gate: float) -> tuple[list[dict], int]:
    cfg = EchelonConfig(
        buffer_size=2,
        buffer_timeout_s=3,
        aggregation="plain",
        alignment_gate=gate,
        sync=SyncConfig(interval=4),
        privacy=PrivacyConfig(membership_window=None),
    )
    records: list[tuple[str, dict]] = []
    # Noisy devices on their way to a shared optimum: the boundary's direction is descent, and
    # each local round's update is that plus much noise.
    target = torch.full((32,), 3.0)
    trainer = QuadraticTrainer(lambda d, r: target, lr=0.01, steps=2, noise=2.0)
    fleet = {"a": {"a0": 1000, "a1": 900, "a2": 800}, "b": {"b0": 1000, "b1": 700, "b2": 600}}
    sim = protocol_sim(fleet, cfg, trainer, lambda kind, f: records.append((kind, f)), dim=32)
    sim.run(BudgetConfig(virtual_seconds=30))
    gates = [f for k, f in records if k == "alignment_gate"]
    return gates, sum(1 for k, _ in records if k == "middle_step")


def test_gating_raises_the_alignment_of_accepted_updates():
    open_gate, steps_open = _gated_run(-1.0)  # accepts everything, but measures alignment
    gated, steps_gated = _gated_run(0.5)
    assert all(g["accepted"] for g in open_gate)
    accepted = [g["alignment"] for g in gated if g["accepted"]]
    assert 0 < len(accepted) < len(gated)  # some updates were turned away
    assert min(accepted) >= 0.5
    assert statistics.fmean(accepted) > statistics.fmean(g["alignment"] for g in open_gate) + 0.1
    assert steps_gated > 0.5 * steps_open  # and the boundaries still make progress
