"""Tensor provenance: who may have produced a tensor, decided by construction.

A BOUNDARY_AGGREGATE payload can only be built by `BoundaryModel`, and the only way to put device
information into a `BoundaryModel` is `apply_aggregate`, which accepts an aggregation result
only when its contributor count meets the quorum. Plain tensors encode as DEVICE or GLOBAL only
(`echelon.planes.tensors.to_payload` refuses BOUNDARY_AGGREGATE). So a boundary aggregate on the
wire always descends from finalised aggregation rounds that met quorum.
"""

from __future__ import annotations

import itertools

import torch

from echelon.planes.aggregation import AggregateResult, encode_f32
from echelon.planes.tensors import encode_tensor
from echelon.v1 import tensor_pb2


class QuorumNotMet(ValueError):
    """An aggregation result with fewer contributors than the quorum cannot become boundary state."""


Bounds = list[tuple[int, int]]  # [lo, hi) of each fragment of a flat vector, in order, covering it


def fragment_bounds(dim: int, fragments: int) -> Bounds:
    """[lo, hi) of each of `fragments` contiguous, near-equal fragments of a `dim`-vector."""
    edges = [round(i * dim / fragments) for i in range(fragments + 1)]
    return list(itertools.pairwise(edges))


class BoundaryModel:
    """A boundary's parameters theta_b = base + since_sync, in `fragments` parts (Streaming DiLoCo
    synchronises one fragment per outer step; plain Echelon has one fragment).

    `theta_g` is the latest global reference; `base` equals it except while an outer step is in
    flight (then it is theta_b as sent). `since_sync` is the sum of the middle-step updates since
    the last send: Delta_b, the only tensor a boundary sends across. `contributors[f]` is the
    quorum fragment f's Delta_b guarantees: the fewest devices any middle step folded into it
    aggregated (a count, never identities; 0 while nothing is folded in). Summing counts across
    middle steps would let one device's repeated updates pass for a quorum.
    """

    def __init__(self, theta_g: torch.Tensor, min_quorum: int, fragments: int | Bounds = 1) -> None:
        self.min_quorum = min_quorum
        self.theta_g = theta_g
        self.base = theta_g
        self.since_sync = torch.zeros_like(theta_g)
        self.bounds = fragment_bounds(theta_g.numel(), fragments) if isinstance(fragments, int) else fragments
        self.contributors = [0] * len(self.bounds)

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
        n = result.contributors
        self.contributors = [min(c or n, n) for c in self.contributors]
        return delta_b

    def delta(self, fragment: int = 0) -> torch.Tensor | None:
        """Fragment `fragment` of Delta_b, or None when no device contributed to it."""
        if self.contributors[fragment] == 0:
            return None
        lo, hi = self.bounds[fragment]
        return self.since_sync[lo:hi]

    def delta_payload(
        self, fragment: int = 0, dtype: int = tensor_pb2.FLOAT32
    ) -> tensor_pb2.TensorPayload | None:
        """Fragment `fragment` of Delta_b as a BOUNDARY_AGGREGATE payload (FLOAT32 or BFLOAT16),
        or None when no device contributed to it."""
        delta = self.delta(fragment)
        if delta is None:
            return None
        return encode_tensor(delta, tensor_pb2.BOUNDARY_AGGREGATE, self.contributors[fragment], dtype)

    def reference_payload(self) -> tensor_pb2.TensorPayload:
        """theta_b for the boundary's own devices (it never leaves the boundary)."""
        return encode_f32(self.theta_b.numpy(), tensor_pb2.BOUNDARY_AGGREGATE, min(self.contributors))

    def start_sync(self, fragment: int = 0) -> None:
        """Fragment `fragment` of Delta_b was sent: later middle steps accumulate afresh, so they
        survive the re-base."""
        lo, hi = self.bounds[fragment]
        self.base = self.base.clone()
        self.base[lo:hi] += self.since_sync[lo:hi]
        self.since_sync = self.since_sync.clone()
        self.since_sync[lo:hi] = 0
        self.contributors[fragment] = 0

    def adopt(
        self,
        theta_g_fragment: torch.Tensor,
        keep_since_send: bool,
        fragment: int | None = None,
        mixing: float = 0.0,
    ) -> None:
        """A new global reference for `fragment` (None: the whole vector, every fragment): theta_g
        there becomes `theta_g_fragment`; theta_b there becomes (1 - mixing) * theta_g + mixing *
        (theta_b as sent), plus the steps since the send when overlapping (mixing 0: plain re-base
        on the global model)."""
        if fragment is None:
            for f, (lo, hi) in enumerate(self.bounds):
                self.adopt(theta_g_fragment[lo:hi], keep_since_send, f, mixing)
            return
        lo, hi = self.bounds[fragment]
        self.theta_g = self.theta_g.clone()
        self.theta_g[lo:hi] = theta_g_fragment
        self.base = self.base.clone()
        self.base[lo:hi] = (1 - mixing) * theta_g_fragment + mixing * self.base[lo:hi]
        if not keep_since_send:
            self.since_sync = self.since_sync.clone()
            self.since_sync[lo:hi] = 0
            self.contributors[fragment] = 0
