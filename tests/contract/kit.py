"""What the contract tests share: an in-memory audit sink, a run's terms, honest aggregates."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from echelon.contract.guard import EgressGuard, IngressGuard
from echelon.contract.policy import Terms
from echelon.contract.provenance import BoundaryModel
from echelon.v1 import boundary_pb2, tensor_pb2

DIM = 64
TERMS = Terms(min_quorum=2, dim=DIM, fragments=1, boundaries=2)


class Recorder:
    """An audit sink that keeps the records in memory, with a chain head like AuditLog's."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.heads: set[tuple[str, int]] = set()  # (peer, seq) of every head countersigned

    def append(self, **fields):
        self.records.append(fields)
        if fields["peer_seq"] is not None:
            self.heads.add((fields["peer"], fields["peer_seq"]))
        return fields

    def head(self) -> tuple[int, str]:
        return len(self.records), hashlib.sha256(str(len(self.records)).encode()).hexdigest()

    def countersigned(self, peer: str, seq: int) -> bool:
        return (peer, seq) in self.heads


def model_with_aggregate(dim: int = DIM, contributors: int = 2, seed: int = 0) -> BoundaryModel:
    """A boundary model that folded in one honest, sealed aggregation result."""
    model = BoundaryModel(torch.zeros(dim), min_quorum=2)
    seal = model.open_round(1, contributors)
    values = np.random.default_rng(seed).standard_normal(dim)
    model.apply_aggregate(seal.seal(values * contributors, float(contributors), contributors), lr=1.0)
    return model


def boundary_guards(model: BoundaryModel | None = None, terms: Terms = TERMS):
    """boundary.b0's egress guard (with `model`'s ledger) and the global plane's ingress guard."""
    out, into = Recorder(), Recorder()
    egress = EgressGuard("boundary.b0", terms, out, None if model is None else model.ledger)
    return egress, out, IngressGuard("global", terms, into), into


def envelope(boundary_id: str = "b0", head: bool = True, **body) -> boundary_pb2.CrossBoundaryEnvelope:
    """A cross-boundary envelope as a sender's guard builds it (with an audit chain head)."""
    env = boundary_pb2.CrossBoundaryEnvelope(boundary_id=boundary_id, **body)
    if head:
        env.audit_head.seq, env.audit_head.hash = 3, bytes(32)
    return env


def ring(numel: int, contributors: int = 2, dtype: int = tensor_pb2.UINT32) -> tensor_pb2.TensorPayload:
    """A masked input of `numel` ring elements, as a boundary's SecAgg+ client sends it."""
    data = np.random.default_rng(numel).integers(0, 2**32, numel, dtype=np.uint32)
    if dtype == tensor_pb2.UINT64:
        data = data.astype(np.uint64)
    return tensor_pb2.TensorPayload(
        provenance=tensor_pb2.BOUNDARY_AGGREGATE,
        contributors=contributors,
        dtype=dtype,
        numel=numel,
        data=data.tobytes(),
    )
