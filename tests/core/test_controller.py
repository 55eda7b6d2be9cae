"""Echelon-DA's cadence controller and its telemetry (B_eff)."""

from __future__ import annotations

import math

import pytest
import torch

from echelon.config import OuterConfig, SyncConfig
from echelon.planes.controller import Cadence
from echelon.planes.coordinator import GlobalPlane
from echelon.sansio import Emit, Send
from echelon.v1 import boundary_pb2

DA = SyncConfig(h_min=8, h_max=100, kappa=2.4, d0=1.0)


def test_interval_follows_the_logistic_map():
    c = Cadence(DA, drift_aware=True)
    for drift in [0.0, 0.5, 1.0, 2.0, 4.0]:
        c.observe("b", drift)
        expected = 8 + round(92 * (1 - 1 / (1 + math.exp(-2.4 * (drift - 1.0)))))
        assert c.scheduled("b") == expected


def test_tightens_as_drift_grows_and_relaxes_when_it_falls():
    # The shape of the paper's trace: drift rises, dips once, rises again.
    drifts = [0.13, 0.25, 0.36, 0.47, 0.92, 1.74, 1.80, 1.86, 1.82, 1.88]
    c = Cadence(SyncConfig(d0=1.2), drift_aware=True)
    intervals = []
    for d in drifts:
        c.observe("b1", d)
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
    c.observe("calm", 0.3)
    c.observe("drifty", 1.9)
    assert c.interval == c.scheduled("drifty") < c.scheduled("calm")
    assert c.driver == "drifty"
    c.observe("calm", 2.5)
    assert c.driver == "calm" and c.interval == c.scheduled("calm")


def test_fixed_mode_ignores_drift():
    c = Cadence(SyncConfig(interval=17), drift_aware=False)
    c.observe("b", 100.0)
    assert c.interval == 17


def test_d0_is_calibrated_at_the_first_sync_when_unset():
    c = Cadence(SyncConfig(interval=5), drift_aware=True)
    c.observe("a", 0.4)
    c.observe("b", 0.8)
    assert c.interval == 5  # no D_0 yet: the configured interval
    c.on_sync()
    assert c.d0 == pytest.approx(0.6)
    assert c.scheduled("b") < c.scheduled("a")


def test_b_eff_accumulates_drift_times_new_tokens_per_tick():
    plane = GlobalPlane(
        ["b/x", "b/y"],
        torch.zeros(3),
        OuterConfig(),
        Cadence(SyncConfig(interval=1000), drift_aware=False),
        60,
    )
    plane.start(0.0)
    ticks = []
    script = [("b/x", 0.5, 100), ("b/y", 1.0, 40), ("b/x", 0.7, 250)]
    for sender, drift, total in script:
        actions = plane.receive(
            1.0, sender, boundary_pb2.BoundaryStatus(middle_step=1, drift=drift, tokens_total=total)
        )
        ticks += [a.fields for a in actions if isinstance(a, Emit) and a.kind == "controller"]
        assert not [a for a in actions if isinstance(a, Send)]  # far from the interval: no sync
    assert [t["tick"] for t in ticks] == [1, 2, 3]
    assert ticks[-1]["b_eff"] == plane.b_eff == 0.5 * 100 + 1.0 * 40 + 0.7 * 150
    assert ticks[-1]["drift"] == {"b/x": 0.7, "b/y": 1.0}
