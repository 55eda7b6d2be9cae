"""Echelon-DA's cadence controller: the map, per-boundary calibration, its behaviour in a run, and
the effective divergence budget B_eff."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from echelon.config import BudgetConfig, EchelonConfig, OuterConfig, SyncConfig
from echelon.planes.controller import Cadence
from echelon.planes.coordinator import GlobalPlane
from echelon.sansio import Emit, Send
from echelon.tensors import payload
from echelon.v1 import boundary_pb2, tensor_pb2
from tests.core.fleet import QuadraticTrainer, protocol_sim

DA = SyncConfig(h_min=8, h_max=100, kappa=2.4, d0=1.0)


def test_interval_follows_the_logistic_map():
    c = Cadence(DA, drift_aware=True)
    for drift in [0.0, 0.5, 1.0, 2.0, 4.0]:
        c.observe("b", drift, middle_step=1)
        expected = 8 + round(92 * (1 - 1 / (1 + math.exp(-2.4 * (drift - 1.0)))))
        assert c.scheduled("b") == expected


def test_tightens_as_drift_grows_and_relaxes_when_it_falls():
    # The shape of the paper's trace: drift rises, dips once, rises again.
    drifts = [0.13, 0.25, 0.36, 0.47, 0.92, 1.74, 1.80, 1.86, 1.82, 1.88]
    c = Cadence(SyncConfig(d0=1.2), drift_aware=True)
    intervals = []
    for step, d in enumerate(drifts, start=1):
        c.observe("b1", d, step)
        intervals.append(c.scheduled("b1"))
    for k in range(1, len(drifts)):
        if drifts[k] > drifts[k - 1]:
            assert intervals[k] <= intervals[k - 1]
        else:
            assert intervals[k] >= intervals[k - 1]
    assert intervals[0] > 90 and intervals[-1] < 30
    assert intervals[8] > intervals[7]  # the dip relaxes the schedule


def test_the_most_drifting_boundary_sets_the_cadence():
    c = Cadence(DA, drift_aware=True)
    c.observe("calm", 0.3, 1)
    c.observe("drifty", 1.9, 1)
    assert c.interval == c.scheduled("drifty") < c.scheduled("calm")
    assert c.driver == "drifty"
    c.observe("calm", 2.5, 2)
    assert c.driver == "calm" and c.interval == c.scheduled("calm")


def test_fixed_mode_ignores_drift():
    c = Cadence(SyncConfig(interval=17), drift_aware=False)
    c.observe("b", 100.0, 50)
    assert c.interval == 17


def test_each_boundary_calibrates_its_own_midpoint_over_its_own_first_window():
    c = Cadence(SyncConfig(interval=3), drift_aware=True)
    for step, (a, b) in enumerate([(0.2, 2.0), (0.4, 4.0)], start=1):
        c.observe("a", a, step)
        c.observe("b", b, step)
    assert c.d0("a") is None and c.interval == 3  # still in the first window: the configured H
    c.observe("a", 0.6, 3)
    assert c.d0("a") == pytest.approx(0.4) and c.d0("b") is None
    c.observe("b", 6.0, 3)
    assert c.d0("b") == pytest.approx(4.0)
    # At its own midpoint each boundary schedules the middle of [h_min, h_max], whatever its scale.
    c.observe("a", 0.4, 4)
    c.observe("b", 4.0, 4)
    assert c.scheduled("a") == c.scheduled("b") == 8 + round(92 * 0.5)
    c.forget("b")  # restarted: it calibrates again
    assert c.d0("b") is None


def _controller_run(targets, tokens, fleet, seconds):
    """A drift-aware run of the quadratic fleet; the controller ticks and outer steps it emitted."""
    cfg = EchelonConfig(
        buffer_size=2, buffer_timeout_s=5, aggregation="plain", sync=SyncConfig(interval=4, h_min=2, h_max=30)
    )
    records: list[tuple[str, dict]] = []
    trainer = QuadraticTrainer(targets, lr=0.02, steps=2, noise=0.5, tokens=tokens)
    sim = protocol_sim(
        fleet, cfg, trainer, lambda kind, f: records.append((kind, f)), dim=64, drift_aware=True
    )
    sim.run(BudgetConfig(virtual_seconds=seconds))
    return [f for k, f in records if k == "controller"], [f for k, f in records if k == "outer_step"]


FAR = torch.zeros(64)
FAR[:8] = 3.0


def test_a_skewed_boundary_gets_the_smaller_interval_and_drives_the_cadence():
    # The IID boundary holds ten times the tokens, so the global optimum is next to its own; the
    # skewed boundary's data pulls it steadily away from the global model.
    ticks, _ = _controller_run(
        targets=lambda device, r: FAR if device.startswith("s") else torch.zeros(64),
        tokens=lambda device: 1000 if device.startswith("s") else 10_000,
        fleet={"iid": {"i0": 10_000, "i1": 10_000}, "skew": {"s0": 1000, "s1": 1000}},
        seconds=200,
    )
    settled = ticks[len(ticks) // 3 :]
    mean_h = {b: statistics.fmean(t["scheduled"][b] for t in settled) for b in settled[0]["scheduled"]}
    assert mean_h["boundary/skew"] < 0.75 * mean_h["boundary/iid"]
    drivers = [t["driver"] for t in settled]
    assert drivers.count("boundary/skew") > 0.9 * len(drivers)


def test_the_cadence_tightens_when_drift_rises_mid_run():
    # Both boundaries share one optimum until boundary b's data moves away at its 60th round (~60 s).
    _, outer = _controller_run(
        targets=lambda device, r: FAR if device.startswith("b") and r >= 60 else torch.zeros(64),
        tokens=lambda device: 1000,
        fleet={"a": {"a0": 1000, "a1": 1000}, "b": {"b0": 1000, "b1": 1000}},
        seconds=160,
    )
    before = [o["interval"] for o in outer if 20 < o["time"] < 60]
    after = [o["interval"] for o in outer if o["time"] > 80]
    assert before and after
    assert statistics.fmean(after) < 0.75 * statistics.fmean(before)


def _delta(outer_step: int, middle_step: int, tokens: int) -> boundary_pb2.BoundaryDelta:
    return boundary_pb2.BoundaryDelta(
        outer_step=outer_step,
        tokens=tokens,
        middle_step=middle_step,
        contributors=2,
        delta=payload(np.zeros(3), tensor_pb2.BOUNDARY_AGGREGATE, 2, tensor_pb2.FLOAT32),
    )


def test_b_eff_integrates_drift_over_each_interval_weighted_by_the_tokens_exchanged():
    plane = GlobalPlane(
        ["b/x", "b/y"], torch.zeros(3), OuterConfig(), Cadence(SyncConfig(interval=2), drift_aware=False), 60
    )
    plane.start(0.0)
    ticks = []
    for sender, drift, step in [("b/x", 0.5, 1), ("b/y", 1.0, 1), ("b/x", 0.7, 2)]:
        actions = plane.receive(1.0, sender, boundary_pb2.BoundaryStatus(middle_step=step, drift=drift))
        ticks += [a.fields for a in actions if isinstance(a, Emit) and a.kind == "controller"]
    assert [t["tick"] for t in ticks] == [1, 2, 3] and ticks[-1]["drift"] == {"b/x": 0.7, "b/y": 1.0}
    assert plane.b_eff == 0.0  # nothing exchanged yet
    # x reached H = 2: the sync request went out; x folded 2 middle steps, y 1.
    plane.receive(2.0, "b/x", _delta(1, middle_step=2, tokens=300))
    plane.receive(2.0, "b/y", _delta(1, middle_step=1, tokens=100))
    assert plane.outer_step == 1
    assert plane.b_eff == pytest.approx((2 * 0.7 * 300 + 1 * 1.0 * 100) / 400)
    # Second interval: x 2 more middle steps at drift 0.2, y 3 more at drift 2.0.
    plane.receive(3.0, "b/x", boundary_pb2.BoundaryStatus(middle_step=4, drift=0.2))
    plane.receive(3.0, "b/y", boundary_pb2.BoundaryStatus(middle_step=4, drift=2.0))
    actions = plane.receive(3.0, "b/x", boundary_pb2.BoundaryStatus(middle_step=4, drift=0.2))
    assert not [a for a in actions if isinstance(a, Send)]  # already syncing
    plane.receive(4.0, "b/x", _delta(2, middle_step=4, tokens=200))
    plane.receive(4.0, "b/y", _delta(2, middle_step=4, tokens=200))
    total = 2 * 0.7 * 300 + 1 * 1.0 * 100 + 2 * 0.2 * 200 + 3 * 2.0 * 200
    assert plane.b_eff == pytest.approx(total / 800)
