"""The aggregation interface a boundary uses, and its plain (non-secure) weighted sum.

One aggregation round is a small protocol between one server (the boundary coordinator) and
the participants it invited (devices, or boundaries for a cross-boundary round). Both sides are
sans-IO objects. The server is handed only what the protocol puts on the wire and, at the end,
exposes an `AggregateResult`: the weighted sum sum_i w_i * delta_i, the public sum of weights,
and the contributor count, sealed with the `RoundSeal` the round was opened with
(`echelon.contract.provenance`), so its user can tell it from a result built by hand. The weights
w_i are assigned by the server (they are metadata it already knows); each participant pre-scales
its own vector, so with secure aggregation the server learns the weighted sum and nothing else.

Protocol shape, shared by every implementation:
  server = aggregator.server(round_id, weights, dim, provenance, seal)
  server.start(now)           -> Send(participant, AggregationRequest) to each participant
  client = aggregator.join(participant, request, vector)  (on the participant)
  client.start(now)           -> the participant's first message(s)
  server.receive / client.receive / on_timer             -> further actions (and Emit events)
  server.outcome              -> AggregateResult | AggregationAborted once finished
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import Message

from echelon.contract.provenance import AggregateResult, RoundSeal
from echelon.sansio import Action, PlaneAction, Send, SetTimer
from echelon.tensors import decode, encode
from echelon.v1 import device_pb2


@dataclass(frozen=True)
class AggregationAborted:
    """The round ended without a result (quorum not met); nothing individual was revealed."""

    reason: str


Outcome = AggregateResult | AggregationAborted


class AggregationServer(ABC):
    """Server side of one aggregation round (sans-IO)."""

    round_id: int

    @abstractmethod
    def start(self, now: float) -> list[Action]: ...

    @abstractmethod
    def receive(self, now: float, sender: str, message: Message) -> list[Action]: ...

    @abstractmethod
    def on_timer(self, now: float, key: str) -> list[Action]: ...

    @property
    @abstractmethod
    def outcome(self) -> Outcome | None:
        """None while the round runs; then the result or the abort reason."""

    @property
    @abstractmethod
    def excluded(self) -> Mapping[str, str]:
        """Participants dropped from this round, with the logged reason."""


class AggregationClient(ABC):
    """Participant side of one aggregation round (sans-IO). `server` is the coordinator's address."""

    @abstractmethod
    def start(self, now: float) -> list[PlaneAction]: ...

    @abstractmethod
    def receive(self, now: float, message: Message) -> list[PlaneAction]:
        """Further messages, and an `Emit` for every refusal (a failed check, a rejected share)."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """True once the participant has nothing more to send in this round."""


class Aggregator(ABC):
    """A way to aggregate: builds the server and client objects of one round."""

    name: str

    @abstractmethod
    def server(
        self, round_id: int, weights: Mapping[str, float], dim: int, provenance: int, seal: RoundSeal
    ) -> AggregationServer:
        """Open round `round_id` over `weights` (participant address -> w_i) of `dim`-vectors.

        `provenance` is the tensor_pb2.Provenance the participants' vectors have (DEVICE inside a
        boundary, BOUNDARY_AGGREGATE across boundaries); `seal` seals the round's result.
        """

    @abstractmethod
    def join(
        self,
        server: str,
        request: device_pb2.AggregationRequest,
        vector: np.ndarray,
        provenance: int,
        contributors: int = 0,
    ) -> AggregationClient:
        """A participant answers `request` with its unweighted `vector` (pre-scaled inside).

        `contributors` is the quorum a BOUNDARY_AGGREGATE `vector` guarantees (0 for a device's).
        """


class PlainServer(AggregationServer):
    """Weighted sum of pre-scaled float vectors sent in the clear (no secrecy; a baseline).

    Finishes when every participant answered, or at `deadline` with whoever answered if at least
    `min_quorum` did. A duplicate, malformed or uninvited input excludes its sender.
    """

    def __init__(
        self,
        round_id: int,
        weights: Mapping[str, float],
        dim: int,
        provenance: int,
        seal: RoundSeal,
        min_quorum: int,
        timeout_s: float,
    ) -> None:
        self.round_id = round_id
        self._seal = seal
        self._weights = dict(weights)
        self._dim = dim
        self._provenance = provenance
        self._min_quorum = min_quorum
        self._timeout_s = timeout_s
        self._sum = np.zeros(dim, dtype=np.float64)
        self._received: set[str] = set()
        self._excluded: dict[str, str] = {}
        self._outcome: Outcome | None = None

    def start(self, now: float) -> list[Action]:
        n = len(self._weights)
        actions: list[Action] = [
            Send(p, device_pb2.AggregationRequest(round_id=self.round_id, weight=w, participants=n))
            for p, w in self._weights.items()
        ]
        actions.append(SetTimer(f"agg/{self.round_id}/deadline", now + self._timeout_s))
        return actions

    def receive(self, now: float, sender: str, message: Message) -> list[Action]:
        if self._outcome is not None:
            return []
        if not isinstance(message, device_pb2.PlainInput) or message.round_id != self.round_id:
            self._exclude(sender, "unexpected message for this round")
        elif sender not in self._weights:
            self._excluded.setdefault(sender, "not invited to this round")
        elif sender in self._received or sender in self._excluded:
            pass  # the first input stays counted; a duplicate changes nothing
        elif (
            message.weighted_delta.provenance != self._provenance or message.weighted_delta.numel != self._dim
        ):
            self._exclude(sender, "input has the wrong provenance or dimension")
        else:
            try:
                self._sum += decode(message.weighted_delta)
                self._received.add(sender)
            except ValueError as e:
                self._exclude(sender, str(e))
        if len(self._received) + len(self._excluded) >= len(self._weights):
            self._finish()
        return []

    def on_timer(self, now: float, key: str) -> list[Action]:
        if key == f"agg/{self.round_id}/deadline" and self._outcome is None:
            for p in self._weights:
                if p not in self._received and p not in self._excluded:
                    self._excluded[p] = "no input before the deadline"
            self._finish()
        return []

    def _exclude(self, sender: str, reason: str) -> None:
        if sender not in self._received:  # an input already counted stays counted
            self._excluded.setdefault(sender, reason)

    def _finish(self) -> None:
        if len(self._received) < self._min_quorum:
            self._outcome = AggregationAborted(
                f"{len(self._received)} inputs, below the quorum of {self._min_quorum}"
            )
        else:
            w = sum(self._weights[p] for p in sorted(self._received))
            self._outcome = self._seal.seal(self._sum, w, len(self._received))
        self._sum = np.zeros(0)

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    @property
    def excluded(self) -> Mapping[str, str]:
        return self._excluded


class PlainClient(AggregationClient):
    def __init__(
        self,
        server: str,
        request: device_pb2.AggregationRequest,
        vector: np.ndarray,
        provenance: int,
        contributors: int = 0,
    ) -> None:
        self._server = server
        # Plain inputs are device deltas inside a boundary (DEVICE); encode refuses anything else.
        self._message = device_pb2.PlainInput(
            round_id=request.round_id, weighted_delta=encode(request.weight * vector, provenance)
        )
        self._done = False

    def start(self, now: float) -> list[Action]:
        self._done = True
        return [Send(self._server, self._message)]

    def receive(self, now: float, message: Message) -> list[Action]:
        return []

    @property
    def done(self) -> bool:
        return self._done


class PlainAggregator(Aggregator):
    """Plain weighted sum: the coordinator sees each w_i * delta_i (simulation baseline only)."""

    name = "plain"

    def __init__(self, min_quorum: int = 1, timeout_s: float = 60.0) -> None:
        self.min_quorum = min_quorum
        self.timeout_s = timeout_s

    def server(
        self, round_id: int, weights: Mapping[str, float], dim: int, provenance: int, seal: RoundSeal
    ) -> PlainServer:
        return PlainServer(round_id, weights, dim, provenance, seal, self.min_quorum, self.timeout_s)

    def join(
        self,
        server: str,
        request: device_pb2.AggregationRequest,
        vector: np.ndarray,
        provenance: int,
        contributors: int = 0,
    ) -> PlainClient:
        return PlainClient(server, request, vector, provenance, contributors)
