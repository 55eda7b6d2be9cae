"""Protocol-level simulations for tests: the real planes, guards and simulator around a small
device compute model, so that a run takes milliseconds.

`QuadraticTrainer` gives each device the objective f_i(theta) = 1/2 ||theta - c_i||^2 and runs K
noisy gradient steps on it: a boundary whose devices' targets sit away from the others' drifts
coherently from the global model, one whose targets match the global optimum only diffuses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from echelon.config import ChurnConfig, DeviceConfig, EchelonConfig, LinkConfig
from echelon.contract.guard import EgressGuard, IngressGuard
from echelon.contract.policy import Terms
from echelon.parties import GLOBAL, boundary_address, device_address, party_of
from echelon.planes.aggregation import PlainAggregator
from echelon.planes.boundary import BoundaryPlane
from echelon.planes.controller import Cadence
from echelon.planes.coordinator import GlobalPlane
from echelon.planes.device import DevicePlane
from echelon.runtime.sim.engine import Observer, Simulation
from echelon.sansio import LocalResult
from echelon.train.trainer import derived_seed


class QuadraticTrainer:
    """K noisy gradient steps on 1/2 ||theta - c_i||^2; `targets(device, round)` gives c_i, so a
    test can move a device's optimum mid-run; `tokens(device)` is what a round reports (the outer
    step's weight). Noise is seeded per (device, round)."""

    def __init__(
        self,
        targets: Callable[[str, int], torch.Tensor],
        *,
        lr: float = 0.2,
        steps: int = 4,
        noise: float = 0.05,
        tokens: Callable[[str], int] = lambda device: 1000,
    ) -> None:
        self.targets, self.lr, self.steps, self.noise, self.tokens = targets, lr, steps, noise, tokens
        self.rounds: dict[str, int] = {}

    def local_round(self, device: str, reference: torch.Tensor, anchor: torch.Tensor | None = None):
        r = self.rounds.get(device, 0)
        self.rounds[device] = r + 1
        target = self.targets(device, r)
        gen = torch.Generator().manual_seed(derived_seed(sum(map(ord, device)), r))
        theta = reference.clone()
        for _ in range(self.steps):
            grad = theta - target + self.noise * torch.randn(theta.shape, generator=gen)
            theta = theta - self.lr * grad
        loss = 0.5 * float(torch.sum((theta - target) ** 2))
        return LocalResult(theta, self.tokens(device), loss)


def protocol_sim(
    fleet: dict[str, dict[str, float]],
    echelon: EchelonConfig,
    trainer,
    on_emit: Callable[[str, dict], None],
    *,
    dim: int,
    drift_aware: bool = False,
    churn: ChurnConfig | None = None,
    joining: dict[str, str] | None = None,
    wan_ms: float = 20.0,
    observer: Observer | None = None,
) -> Simulation:
    """boundary -> {device -> tokens/s}; plain aggregation; `joining` maps devices that join
    later (listed in `churn.joins`) to their boundary."""
    theta0 = torch.zeros(dim)
    agg = PlainAggregator(min_quorum=echelon.min_quorum, timeout_s=echelon.aggregation_timeout_s)
    members = {b: list(devices) for b, devices in fleet.items()}
    for d, b in (joining or {}).items():
        members[b].remove(d)
    gp = GlobalPlane(
        [boundary_address(b) for b in fleet],
        theta0,
        echelon.outer,
        Cadence(echelon.sync, drift_aware=drift_aware),
        600,
    )

    def make_boundary(b: str) -> BoundaryPlane:
        return BoundaryPlane(b, [device_address(d) for d in members[b]], GLOBAL, echelon, agg, dim, seed=7)

    devices = {
        d: DevicePlane(d, boundary_address(b), agg, echelon.clip, None, alignment_gate=echelon.alignment_gate)
        for b, ds in fleet.items()
        for d in ds
    }
    terms = Terms(min_quorum=1, dim=dim, boundaries=len(fleet))
    boundaries = {b: make_boundary(b) for b in fleet}
    guards = {GLOBAL: (EgressGuard(GLOBAL, terms, None), IngressGuard(GLOBAL, terms, None))}
    for b, plane in boundaries.items():
        party = party_of(boundary_address(b))
        guards[party] = (EgressGuard(party, terms, None, plane.ledger), IngressGuard(party, terms, None))
    return Simulation(
        global_plane=gp,
        boundaries=boundaries,
        devices=devices,
        device_boundary={d: b for b, ds in fleet.items() for d in ds},
        device_profiles={
            d: DeviceConfig(id=d, tokens_per_s=s) for ds in fleet.values() for d, s in ds.items()
        },
        trainer=trainer,
        lan=LinkConfig(latency_ms=1),
        wan={b: LinkConfig(latency_ms=wan_ms) for b in fleet},
        churn=churn or ChurnConfig(),
        guards=guards,
        seed=0,
        on_emit=on_emit,
        make_boundary=make_boundary,
        observer=observer,
    )
