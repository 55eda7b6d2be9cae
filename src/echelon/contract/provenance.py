"""Tensor provenance: a boundary aggregate is bound to the aggregation rounds that produced it.

A label anyone can write proves nothing, so provenance is decided by construction:

- An aggregation round is opened by the party that will use its result (`BoundaryModel.open_round`,
  or `RoundSeal.open` for the global plane's outer round); the round's server gets its
  `RoundSeal`, and the only `AggregateResult` that party accepts carries the seal's HMAC-SHA256
  tag over the round id, the contributor count, the weight sum and the SHA-256 of the weighted
  sum. A result built by hand, altered, replayed or from another round is refused.
- `BoundaryModel.apply_aggregate` folds a sealed result into theta_b only when its contributors
  meet the quorum; `delta_payload` then mints the BOUNDARY_AGGREGATE payload of Delta_b and
  records its digest in the boundary's `Ledger`.
- The boundary's egress guard sends a BOUNDARY_AGGREGATE tensor only when that ledger minted it
  (`echelon.contract.guard`). `echelon.tensors.encode` refuses the label outright.

So a boundary aggregate on the wire always descends from sealed rounds that met the quorum.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from echelon.tensors import Bounds, float_data, fragment_bounds, payload
from echelon.v1 import tensor_pb2

LEDGER_SIZE = 8  # minted payloads a ledger keeps (one per fragment in flight, and a resend)


class QuorumNotMet(ValueError):
    """An aggregation result with fewer contributors than the quorum cannot become boundary state."""


class UnsealedResult(ValueError):
    """An aggregation result that no round opened by this party produced (forged, altered, replayed)."""


@dataclass(frozen=True)
class AggregateResult:
    """The only thing a server learns: sum_i w_i v_i over `contributors` participants of round
    `round_id`, sealed by that round (`tag`)."""

    round_id: int
    weighted_sum: np.ndarray  # float64, shape (dim,)
    weight_sum: float
    contributors: int
    tag: bytes


def _message(round_id: int, weighted_sum: np.ndarray, weight_sum: float, contributors: int) -> bytes:
    digest = hashlib.sha256(np.ascontiguousarray(weighted_sum, dtype="<f8").data).digest()
    return b"".join(
        (
            b"echelon/aggregate/v1",
            round_id.to_bytes(8, "little"),
            contributors.to_bytes(4, "little"),
            np.float64(weight_sum).tobytes(),
            digest,
        )
    )


class RoundSeal:
    """The key of one aggregation round: its server seals the result, its opener verifies it.

    `invited` is the number of participants the round was opened for: no result may claim more.
    """

    def __init__(self, round_id: int, invited: int, key: bytes) -> None:
        self.round_id, self.invited, self._key = round_id, invited, key

    @classmethod
    def open(cls, round_id: int, invited: int) -> RoundSeal:
        """A fresh seal with a random 256-bit key."""
        return cls(round_id, invited, secrets.token_bytes(32))

    def seal(self, weighted_sum: np.ndarray, weight_sum: float, contributors: int) -> AggregateResult:
        """The sealed result of this round; ValueError when it claims more than were invited."""
        if not 0 < contributors <= self.invited:
            raise ValueError(f"a result of {contributors} contributors from a round of {self.invited}")
        tag = hmac.digest(
            self._key, _message(self.round_id, weighted_sum, weight_sum, contributors), "sha256"
        )
        return AggregateResult(self.round_id, weighted_sum, float(weight_sum), contributors, tag)

    def verify(self, result: AggregateResult) -> None:
        """UnsealedResult unless this round's server sealed `result` exactly as it is."""
        if not isinstance(result, AggregateResult) or result.round_id != self.round_id:
            raise UnsealedResult(f"not a result of aggregation round {self.round_id}")
        expected = hmac.digest(
            self._key,
            _message(result.round_id, result.weighted_sum, result.weight_sum, result.contributors),
            "sha256",
        )
        if not hmac.compare_digest(expected, result.tag) or result.contributors > self.invited:
            raise UnsealedResult(
                f"the result of round {self.round_id} does not carry its seal (built by hand or altered)"
            )


@dataclass(frozen=True)
class Minted:
    """One minted payload as the ledger keeps it: the payload without its data (`header`), the
    data, and the data's SHA-256, taken once here so that no send hashes it again."""

    header: tensor_pb2.TensorPayload
    data: bytes
    digest: bytes


def _header(t: tensor_pb2.TensorPayload) -> tensor_pb2.TensorPayload:
    """`t` without its data (reading no data: a read of a bytes field copies it)."""
    header = tensor_pb2.TensorPayload()
    for field in t.DESCRIPTOR.fields:
        if field.name != "data":
            setattr(header, field.name, getattr(t, field.name))
    return header


class Ledger:
    """The BOUNDARY_AGGREGATE payloads one boundary minted (the last LEDGER_SIZE, their data kept
    whole: comparing is cheaper than hashing, and a boundary has only a few in flight)."""

    def __init__(self) -> None:
        self._minted: deque[Minted] = deque(maxlen=LEDGER_SIZE)

    def mint(self, header: tensor_pb2.TensorPayload, data: bytes) -> Minted:
        """Record the payload `header` (holding no data) with data `data`; hashes `data` once. A
        boundary restarted from a checkpoint records again the aggregate it minted before."""
        minted = Minted(_header(header), data, hashlib.sha256(data).digest())
        self._minted.append(minted)
        return minted

    def minted(self, t: tensor_pb2.TensorPayload, data: bytes | memoryview | None = None) -> Minted | None:
        """The ledger's record of `t` (every field as minted), or None when it minted no such payload.

        `data`: `t`'s data when held apart from it (`t` then holds none); the very bytes the ledger
        minted are recognised without reading them.
        """
        header = _header(t)
        data = t.data if data is None else data
        found = [m for m in reversed(self._minted) if data is m.data] or [
            m for m in reversed(self._minted) if len(data) == len(m.data) and data == m.data
        ]
        return next((m for m in found if m.header == header), None)


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

    def __init__(
        self,
        theta_g: torch.Tensor,
        min_quorum: int,
        fragments: int | Bounds = 1,
        ledger: Ledger | None = None,
    ) -> None:
        self.min_quorum = min_quorum
        self.theta_g = theta_g
        self.base = theta_g
        self.since_sync = torch.zeros_like(theta_g)
        self.bounds = fragment_bounds(theta_g.numel(), fragments) if isinstance(fragments, int) else fragments
        self.contributors = [0] * len(self.bounds)
        self.ledger = ledger if ledger is not None else Ledger()
        self._rounds: dict[int, RoundSeal] = {}  # opened, not yet applied

    @property
    def theta_b(self) -> torch.Tensor:
        return self.base + self.since_sync

    def drift_distance(self) -> float:
        """||theta_b - theta_g||_2, the instantaneous input of the drift proxy."""
        return float(torch.linalg.vector_norm(self.theta_b - self.theta_g))

    def open_round(self, round_id: int, invited: int) -> RoundSeal:
        """The seal of a new aggregation round over `invited` participants, for its server."""
        seal = RoundSeal.open(round_id, invited)
        self._rounds[round_id] = seal
        return seal

    def close_round(self, round_id: int) -> None:
        """Forget round `round_id` (it aborted): its result can never be applied."""
        self._rounds.pop(round_id, None)

    def apply_aggregate(self, result: AggregateResult, lr: float) -> torch.Tensor:
        """Middle step: theta_b += lr * sum(w delta) / sum(w); returns delta_b.

        UnsealedResult unless `result` is the sealed result of a round opened here and not yet
        applied; QuorumNotMet below the quorum; ValueError on the wrong dimension.
        """
        seal = self._rounds.pop(getattr(result, "round_id", None), None)
        if seal is None:
            raise UnsealedResult("no open aggregation round produced this result (forged or replayed)")
        seal.verify(result)
        if result.contributors < self.min_quorum:
            raise QuorumNotMet(f"{result.contributors} contributors, quorum {self.min_quorum}")
        if result.weighted_sum.shape != (self.since_sync.numel(),) or not result.weight_sum > 0:
            raise ValueError(
                f"an aggregate of shape {result.weighted_sum.shape} and weight {result.weight_sum} "
                f"for a model of {self.since_sync.numel()} parameters"
            )
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

    def mint(
        self, fragment: int = 0, dtype: int = tensor_pb2.FLOAT32, contributors: int | None = None
    ) -> Minted | None:
        """Fragment `fragment` of Delta_b as a BOUNDARY_AGGREGATE payload (FLOAT32 or BFLOAT16),
        recorded in the ledger, its data held apart; None when no device contributed to it.

        `contributors`: the quorum the payload claims (the plane may state a coarser lower bound
        than the fragment's count, `privacy.status_counts`); default the fragment's count.
        """
        delta = self.delta(fragment)
        if delta is None:
            return None
        numel, data = float_data(delta.numpy(), dtype)
        claimed = self.contributors[fragment] if contributors is None else contributors
        header = tensor_pb2.TensorPayload(
            provenance=tensor_pb2.BOUNDARY_AGGREGATE, contributors=claimed, dtype=dtype, numel=numel
        )
        return self.ledger.mint(header, data)

    def delta_payload(
        self, fragment: int = 0, dtype: int = tensor_pb2.FLOAT32, contributors: int | None = None
    ) -> tensor_pb2.TensorPayload | None:
        """`mint`, as one payload holding its data."""
        minted = self.mint(fragment, dtype, contributors)
        if minted is None:
            return None
        whole = tensor_pb2.TensorPayload()
        whole.CopyFrom(minted.header)
        whole.data = minted.data
        return whole

    def reference_payload(self) -> tensor_pb2.TensorPayload:
        """theta_b for the boundary's own devices (it never leaves the boundary)."""
        return payload(self.theta_b.numpy(), tensor_pb2.BOUNDARY_AGGREGATE, min(self.contributors))

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

    def state_dict(self) -> dict:
        """theta_g, base, Delta_b and the quorum counts, for a boundary's checkpoint."""
        return {
            "theta_g": self.theta_g.clone(),
            "base": self.base.clone(),
            "since_sync": self.since_sync.clone(),
            "contributors": list(self.contributors),
        }

    @classmethod
    def from_state_dict(
        cls, state: dict, min_quorum: int, fragments: int | Bounds = 1, ledger: Ledger | None = None
    ) -> BoundaryModel:
        """A model continued from `state_dict()`, minting into `ledger` (the boundary's, which its
        egress guard checks); QuorumNotMet when a fragment's count is below the quorum (a
        checkpoint cannot turn a lone device's update into an aggregate)."""
        counts = [int(c) for c in state["contributors"]]
        parts = fragments if isinstance(fragments, int) else len(fragments)
        if len(counts) != parts or any(0 < c < min_quorum for c in counts):
            raise QuorumNotMet(f"checkpoint contributor counts {counts} under quorum {min_quorum}")
        model = cls(state["theta_g"].clone(), min_quorum, fragments, ledger)
        model.base, model.since_sync, model.contributors = (
            state["base"].clone(),
            state["since_sync"].clone(),
            counts,
        )
        return model
