"""Boundary plane (staleness, participation window) and global plane (outer Nesterov step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from echelon.config import (
    BudgetConfig,
    ChurnConfig,
    DeviceConfig,
    EchelonConfig,
    LinkConfig,
    OuterConfig,
    SyncConfig,
)
from echelon.contract.guard import EgressGuard, IngressGuard
from echelon.contract.policy import Terms
from echelon.parties import GLOBAL, boundary_address, device_address, party_of
from echelon.planes.aggregation import PlainAggregator
from echelon.planes.boundary import BoundaryPlane, staleness_weight
from echelon.planes.controller import Cadence
from echelon.planes.coordinator import GlobalPlane, OuterOptimizer
from echelon.planes.device import DevicePlane
from echelon.runtime.sim.engine import Simulation
from echelon.sansio import LocalResult


@given(s=st.integers(0, 1000), a=st.floats(0, 4))
def test_staleness_weight_formula(s, a):
    assert staleness_weight(s, a) == pytest.approx((1 + s) ** -a)
    assert staleness_weight(s + 1, a) <= staleness_weight(s, a)


def test_fresh_update_weighs_one():
    assert staleness_weight(0, 0.5) == 1.0


def test_outer_nesterov_step_matches_hand_computation():
    theta0 = torch.tensor([1.0, -2.0, 0.5])
    g1, g2 = torch.tensor([0.1, 0.2, -0.3]), torch.tensor([-0.4, 0.0, 0.25])
    lr, m = 0.7, 0.9
    opt = OuterOptimizer(theta0, OuterConfig(lr=lr, momentum=m, nesterov=True))
    t1, t2 = opt.step(g1.clone()), opt.step(g2.clone())
    # Nesterov SGD: b_t = m b_{t-1} + g_t;  theta_t = theta_{t-1} - lr (g_t + m b_t).
    b1 = g1
    e1 = theta0 - lr * (g1 + m * b1)
    b2 = m * b1 + g2
    e2 = e1 - lr * (g2 + m * b2)
    torch.testing.assert_close(t1, e1)
    torch.testing.assert_close(t2, e2)


def test_outer_lr_one_momentum_zero_is_averaging_weighted_by_tokens():
    theta0 = torch.zeros(2)
    plane = GlobalPlane(
        ["b/x", "b/y"],
        theta0,
        OuterConfig(lr=1.0, momentum=0.0),
        Cadence(SyncConfig(interval=1), drift_aware=False),
        60,
    )
    plane.start(0.0)
    from echelon.tensors import payload
    from echelon.v1 import boundary_pb2, tensor_pb2

    plane.receive(0.0, "b/x", boundary_pb2.BoundaryStatus(middle_step=1))
    for b, delta, tokens in [("b/x", [1.0, 0.0], 300), ("b/y", [0.0, 1.0], 100)]:
        msg = boundary_pb2.BoundaryDelta(
            outer_step=1,
            tokens=tokens,
            middle_step=1,
            delta=payload(np.array(delta), tensor_pb2.BOUNDARY_AGGREGATE, 2),
        )
        plane.receive(1.0, b, msg)
    torch.testing.assert_close(plane.theta_g, torch.tensor([0.75, 0.25]))
    assert plane.outer_step == 1


class _FixedStepTrainer:
    """Device compute for protocol tests: each local round moves theta by a fixed small step."""

    def __init__(self, dim: int, tokens: int) -> None:
        self.dim, self.tokens = dim, tokens

    def local_round(self, device, reference, anchor=None):
        return LocalResult(reference + 0.01, self.tokens, 1.0)


def _protocol_sim(speeds: dict[str, float], echelon: EchelonConfig, on_emit, dim: int = 8, churn=None):
    """One boundary of devices with the given speeds (tokens/s), 1,000 tokens per local round."""
    theta0 = torch.zeros(dim)
    agg = PlainAggregator(min_quorum=echelon.min_quorum, timeout_s=echelon.aggregation_timeout_s)
    gp = GlobalPlane(
        [boundary_address("b")], theta0, echelon.outer, Cadence(echelon.sync, drift_aware=False), 600
    )
    bp = BoundaryPlane("b", [device_address(d) for d in speeds], GLOBAL, echelon, agg, dim)
    devices = {d: DevicePlane(d, boundary_address("b"), agg, echelon.clip, None) for d in speeds}
    terms = Terms(echelon.min_quorum, dim)
    guards = {
        GLOBAL: (EgressGuard(GLOBAL, terms, None), IngressGuard(GLOBAL, terms, None)),
        party_of(boundary_address("b")): (
            EgressGuard("boundary.b", terms, None, bp.ledger),
            IngressGuard("boundary.b", terms, None),
        ),
    }
    sim = Simulation(
        global_plane=gp,
        boundaries={"b": bp},
        devices=devices,
        device_boundary=dict.fromkeys(speeds, "b"),
        device_profiles={d: DeviceConfig(id=d, tokens_per_s=s) for d, s in speeds.items()},
        trainer=_FixedStepTrainer(dim, 1000),
        lan=LinkConfig(latency_ms=1),
        wan={"b": LinkConfig(latency_ms=20)},
        churn=churn or ChurnConfig(),
        guards=guards,
        seed=0,
        on_emit=on_emit,
    )
    return sim, bp


def _max_gap(window: int) -> tuple[int, int]:
    """Run two fast devices and one 10x slower one; the slow device's worst gap and contributions."""
    cfg = EchelonConfig(
        buffer_size=2,
        buffer_timeout_s=30,
        participation_window=window,
        max_staleness=8,
        sync=SyncConfig(interval=1000),
    )
    gaps = []
    bp = None

    def on_emit(kind, fields):
        if kind == "middle_step":
            gaps.append(bp.participation_gaps()[device_address("slow")])

    sim, bp = _protocol_sim({"fast1": 1000, "fast2": 1000, "slow": 100}, cfg, on_emit)
    sim.run(BudgetConfig(virtual_seconds=400))
    return max(gaps), gaps.count(0)


def test_participation_window_bounds_starvation():
    window = 3
    bounded_gap, contributions = _max_gap(window)
    starved_gap, starved_contributions = _max_gap(10**6)
    # With the window the slow device is aggregated at least every W middle steps...
    assert bounded_gap <= window
    assert contributions >= 10
    # ...without it, its updates arrive too stale and it starves.
    assert starved_gap > 5 * window
    assert starved_contributions < contributions


def test_stale_updates_are_dropped_and_fresh_ones_weighted():
    stalenesses = []
    cfg = EchelonConfig(
        buffer_size=1,
        min_quorum=1,
        buffer_timeout_s=30,
        participation_window=10**6,
        max_staleness=2,
        sync=SyncConfig(interval=1000),
    )

    def on_emit(kind, fields):
        if kind == "middle_step":
            stalenesses.extend(int(s) for s, n in fields["staleness"].items() for _ in range(n))

    sim, _ = _protocol_sim({"fast": 1000, "slow": 180}, cfg, on_emit)
    sim.run(BudgetConfig(virtual_seconds=100))
    assert stalenesses and max(stalenesses) <= 2


def test_churn_devices_leave_and_rejoin_and_the_run_completes():
    cfg = EchelonConfig(buffer_size=2, buffer_timeout_s=5, sync=SyncConfig(interval=2))
    steps = []
    sim, _ = _protocol_sim(
        {"a": 1000, "b": 800, "c": 600},
        cfg,
        lambda k, f: steps.append(k),
        churn=ChurnConfig(mean_uptime_s=20, mean_downtime_s=5),
    )
    sim.run(BudgetConfig(virtual_seconds=300))
    assert sim.global_plane.finished
    assert steps.count("middle_step") > 20
    assert sim.traffic.intra_messages["echelon.v1.Hello"] > 3 * 2  # devices left and came back, repeatedly
    assert np.isfinite(sim.global_plane.theta_g.numpy()).all()
