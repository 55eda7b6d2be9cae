"""Tensor provenance: who may have produced a tensor, decided by construction.

A BOUNDARY_AGGREGATE payload can only be built by `BoundaryModel`, and the only way to put device
information into a `BoundaryModel` is `apply_aggregate`, which accepts an aggregation result
only when its contributor count meets the quorum. Plain tensors encode as DEVICE or GLOBAL only
(`echelon.planes.tensors.to_payload` refuses BOUNDARY_AGGREGATE). So a boundary aggregate on the
wire always descends from finalised aggregation rounds that met quorum.
"""

from __future__ import annotations

import torch

from echelon.planes.aggregation import AggregateResult, encode_f32
from echelon.v1 import tensor_pb2


class QuorumNotMet(ValueError):
    """An aggregation result with fewer contributors than the quorum cannot become boundary state."""


class BoundaryModel:
    """A boundary's parameters theta_b = base + since_sync.

    `theta_g` is the latest global reference; `base` equals it except while an outer step is in
    flight (then it is theta_b as sent). `since_sync` is the sum of the middle-step updates since
    the last send: Delta_b, the only tensor a boundary sends across. `contributors` is the quorum
    it guarantees: the fewest devices any middle step folded into it aggregated (a count, never
    identities; 0 while nothing is folded in). Summing counts across middle steps would let one
    device's repeated updates pass for a quorum.
    """

    def __init__(self, theta_g: torch.Tensor, min_quorum: int) -> None:
        self.min_quorum = min_quorum
        self.theta_g = theta_g
        self.base = theta_g
        self.since_sync = torch.zeros_like(theta_g)
        self.contributors = 0

    @property
    def theta_b(self) -> torch.Tensor:
        return self.base + self.since_sync

    def drift_distance(self) -> float:
        """||theta_b - theta_g||_2, the instantaneous input of the drift proxy."""
        return float(torch.linalg.vector_norm(self.theta_b - self.theta_g))

    def apply_aggregate(self, result: AggregateResult, lr: float) -> torch.Tensor:
        """Middle step: theta_b += lr * sum(w delta) / sum(w); returns delta_b."""
        if result.contributors < self.min_quorum:
            raise QuorumNotMet(f"{result.contributors} contributors, quorum {self.min_quorum}")
        delta_b = torch.from_numpy(result.weighted_sum / result.weight_sum).float()
        self.since_sync = self.since_sync + lr * delta_b
        self.contributors = min(self.contributors or result.contributors, result.contributors)
        return delta_b

    def delta_payload(self) -> tensor_pb2.TensorPayload | None:
        """Delta_b as a BOUNDARY_AGGREGATE payload, or None when no device contributed."""
        if self.contributors == 0:
            return None
        return encode_f32(self.since_sync.numpy(), tensor_pb2.BOUNDARY_AGGREGATE, self.contributors)

    def reference_payload(self) -> tensor_pb2.TensorPayload:
        """theta_b for the boundary's own devices (it never leaves the boundary)."""
        return encode_f32(self.theta_b.numpy(), tensor_pb2.BOUNDARY_AGGREGATE, self.contributors)

    def start_sync(self) -> None:
        """Delta_b was sent: later middle steps accumulate afresh, so they survive the re-base."""
        self.base = self.theta_b
        self.since_sync = torch.zeros_like(self.since_sync)
        self.contributors = 0

    def adopt(self, theta_g_new: torch.Tensor, keep_since_send: bool) -> None:
        """A new global reference: theta_b = theta_g_new, plus the steps since the send when overlapping."""
        self.theta_g = self.base = theta_g_new
        if not keep_since_send:
            self.since_sync = torch.zeros_like(self.since_sync)
            self.contributors = 0
