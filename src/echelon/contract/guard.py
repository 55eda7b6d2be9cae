"""Egress and ingress guards: the only way a message crosses a boundary.

Every party (the global plane, each boundary coordinator) owns one `EgressGuard` for what it
sends across and one `IngressGuard` for what it receives. `send` wraps the body in the envelope
of its channel, checks it against the contract (`echelon.contract.rules`), serialises it (in
typed slices when large: `echelon.contract.slicing`), counts the exact wire bytes, records it,
and only then returns the frames to transmit. Anything else raises `ContractViolation`, is
recorded as refused, and nothing is sent. Both runtimes call these very objects.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Protocol

from google.protobuf.message import DecodeError, Message

from echelon.contract.rules import contract_problems, flow_class_name, round_of, tensor_summary
from echelon.contract.slicing import Reassembler, slice_envelope
from echelon.v1 import boundary_pb2
from echelon.wire import CROSS_BOUNDARY_BODIES


class ContractViolation(Exception):
    """A message that may not cross a boundary. Nothing was sent; the attempt was recorded."""


class AuditSink(Protocol):
    """Where a guard records each crossing (the audit log)."""

    def append(self, **fields: object) -> object: ...


class _Guard:
    """Shared state of a party's guards: its name, the quorum, counters and the audit sink.

    A party is `global` or `boundary.<id>`; the boundary end of a channel names the boundary.
    """

    def __init__(self, party: str, min_quorum: int, audit: AuditSink | None) -> None:
        self.party, self.min_quorum, self.audit = party, min_quorum, audit
        self.bytes_by_type: Counter[str] = Counter()
        self.messages_by_type: Counter[str] = Counter()
        self.refused = 0

    def _boundary_of_channel(self, peer: str) -> str:
        end = self.party if self.party != "global" else peer
        return end.removeprefix("boundary.")

    def _record(
        self,
        now: float,
        direction: str,
        peer: str,
        body: Message,
        frames: list[bytes],
        outcome: str,
        reason: str | None,
    ) -> None:
        if self.audit is None:
            return
        provenance, quorum = tensor_summary(body)
        digest = hashlib.sha256()
        for frame in frames:
            digest.update(frame)
        self.audit.append(
            time=now,
            channel=f"{peer}<->{self.party}" if direction == "in" else f"{self.party}<->{peer}",
            direction=direction,
            peer=peer,
            message_type=body.DESCRIPTOR.full_name,
            flow_class=flow_class_name(body.DESCRIPTOR),
            wire_bytes=sum(len(f) for f in frames),
            round_id=round_of(body),
            payload_sha256=digest.hexdigest(),
            quorum=quorum,
            provenance=provenance,
            outcome=outcome,
            reason=reason,
        )

    def _refuse(
        self, now: float, direction: str, peer: str, body: Message, frames: list[bytes], problems: list[str]
    ) -> None:
        self.refused += 1
        reason = "; ".join(problems)
        self._record(now, direction, peer, body, frames, "refused", reason)
        arrow = f"{self.party} -> {peer}" if direction == "out" else f"{peer} -> {self.party}"
        raise ContractViolation(f"{arrow}: {reason}")

    def _count(self, body: Message, frames: list[bytes]) -> None:
        name = body.DESCRIPTOR.full_name
        self.bytes_by_type[name] += sum(len(f) for f in frames)
        self.messages_by_type[name] += 1

    @property
    def bytes_total(self) -> int:
        return sum(self.bytes_by_type.values())


class EgressGuard(_Guard):
    """One party's single choke point for outgoing cross-boundary messages."""

    def send(self, now: float, body: Message, peer: str) -> list[bytes]:
        """Wrap `body` for the channel to `peer`, check, serialise, count and record it.

        Returns the frames to transmit in order (one, or typed slices of a large tensor). Raises
        ContractViolation (recorded, nothing sent) when the body has no way across or breaks the
        contract.
        """
        boundary_id = self._boundary_of_channel(peer)
        field = CROSS_BOUNDARY_BODIES.get(body.DESCRIPTOR.full_name)
        if field is None:
            problem = f"{body.DESCRIPTOR.full_name} ({flow_class_name(body.DESCRIPTOR)}) has no way across a boundary"
            self._refuse(now, "out", peer, body, [body.SerializeToString()], [problem])
        envelope = boundary_pb2.CrossBoundaryEnvelope(boundary_id=boundary_id)
        getattr(envelope, field).CopyFrom(body)
        problems = contract_problems(envelope, self.min_quorum, boundary_id)
        if problems:
            self._refuse(now, "out", peer, body, [envelope.SerializeToString()], problems)
        frames = [part.SerializeToString() for part in slice_envelope(envelope)]
        self._count(body, frames)
        self._record(now, "out", peer, body, frames, "sent", None)
        return frames


class IngressGuard(_Guard):
    """One party's mirror check on incoming cross-boundary frames."""

    def __init__(self, party: str, min_quorum: int, audit: AuditSink | None) -> None:
        super().__init__(party, min_quorum, audit)
        self._partial: dict[str, tuple[Reassembler, list[bytes]]] = {}

    def forget(self, peer: str) -> None:
        """Drop what a half-received message from `peer` left (its stream ended)."""
        self._partial.pop(peer, None)

    def receive(self, now: float, frame: bytes, peer: str) -> Message | None:
        """Check one frame from `peer`; the message body once its last frame arrived, else None.

        Every frame is checked on its own (it is a typed message); a frame that breaks the
        contract raises ContractViolation (recorded) and discards the message it belonged to.
        """
        reassembler, frames = self._partial.setdefault(peer, (Reassembler(), []))
        frames.append(frame)
        try:
            envelope = boundary_pb2.CrossBoundaryEnvelope.FromString(frame)
        except DecodeError as e:
            self._partial.pop(peer)
            self._refuse(
                now, "in", peer, boundary_pb2.CrossBoundaryEnvelope(), frames, [f"undecodable envelope ({e})"]
            )
        field = envelope.WhichOneof("body")
        body = getattr(envelope, field) if field else envelope
        problems = contract_problems(envelope, self.min_quorum, self._boundary_of_channel(peer))
        if not problems:
            try:
                whole = reassembler.add(envelope)
            except ValueError as e:
                problems = [str(e)]
        if problems:
            self._partial.pop(peer)
            self._refuse(now, "in", peer, body, frames, problems)
        if whole is None:
            return None
        del self._partial[peer]
        body = getattr(whole, whole.WhichOneof("body"))
        self._count(body, frames)
        self._record(now, "in", peer, body, frames, "received", None)
        return body
