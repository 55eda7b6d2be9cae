"""Egress and ingress guards: the only way a message crosses a boundary.

Every party (the global plane, each boundary coordinator) owns one `EgressGuard` for what it
sends across and one `IngressGuard` for what it receives. `send` wraps the body in the envelope
of its channel with the party's audit chain head, checks it against the schema's rules
(`echelon.contract.rules`) and the run's terms (`echelon.contract.policy`), and for a boundary that
a float aggregate is one its own rounds minted (`echelon.contract.provenance.Ledger`); then it
serialises it (in typed slices when large: `echelon.contract.slicing`), counts the exact wire
bytes, records it, and only then returns the frames to transmit. `receive` checks each frame
the same way, and that it is the canonical encoding of a message (no unknown fields, no second
encoding of the same message), before reassembling it. Anything else, and any exception while
checking, raises `ContractViolation`, is recorded as refused, and nothing is sent or delivered.
Both runtimes call these very objects.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import DecodeError, Message

from echelon.contract.policy import BOUNDARY, TENSORS, Terms, role_of
from echelon.contract.provenance import Ledger
from echelon.contract.rules import flow_class_name, round_of, schema_problems, tensor_summary, tensors
from echelon.contract.slicing import REASSEMBLY_IDLE_S, Reassembler, slice_envelope
from echelon.v1 import boundary_pb2, tensor_pb2
from echelon.wire import CROSS_BOUNDARY_BODIES


class ContractViolation(Exception):
    """A message that may not cross a boundary. Nothing was sent; the attempt was recorded."""


class AuditSink(Protocol):
    """Where a guard records each crossing (the audit log)."""

    def append(self, **fields: object) -> object: ...

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record: the chain head the party's next message carries."""
        ...


def _failure(e: Exception) -> str:
    if isinstance(e, DecodeError):
        return f"undecodable envelope ({e})"
    return f"checking it failed: {type(e).__name__}: {e}"


class _Guard:
    """Shared state of a party's guards: its name and role, the run's terms, counters, the audit sink.

    A party is `global` or `boundary.<id>`; the boundary end of a channel names the boundary.
    """

    def __init__(self, party: str, terms: Terms, audit: AuditSink | None) -> None:
        self.party, self.role, self.terms, self.audit = party, role_of(party), terms, audit
        self.bytes_by_type: Counter[str] = Counter()
        self.bytes_by_boundary: Counter[str] = Counter()  # by the boundary at the channel's end
        self.messages_by_type: Counter[str] = Counter()
        self.refused = 0

    def _channel_problems(self, peer: str) -> list[str]:
        try:
            if role_of(peer) != self.role:
                return []
        except ValueError as e:
            return [str(e)]
        return [f"{self.party} and {peer} are both {self.role} parties: no channel joins them"]

    def _boundary_of_channel(self, peer: str) -> str:
        end = self.party if self.role == BOUNDARY else peer
        return end.removeprefix(f"{BOUNDARY}.")

    def _record(
        self,
        now: float,
        direction: str,
        peer: str,
        body: Message,
        frames: list[bytes],
        outcome: str,
        reason: str | None,
        peer_head: boundary_pb2.AuditHead | None = None,
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
            peer_seq=None if peer_head is None else peer_head.seq,
            peer_head=None if peer_head is None else peer_head.hash.hex(),
        )

    def _refuse(
        self, now: float, direction: str, peer: str, body: Message, frames: list[bytes], problems: list[str]
    ) -> None:
        self.refused += 1
        reason = "; ".join(problems)
        self._record(now, direction, peer, body, frames, "refused", reason)
        arrow = f"{self.party} -> {peer}" if direction == "out" else f"{peer} -> {self.party}"
        raise ContractViolation(f"{arrow}: {reason}")

    def _count(self, body: Message, frames: list[bytes], peer: str) -> None:
        name, nbytes = body.DESCRIPTOR.full_name, sum(len(f) for f in frames)
        self.bytes_by_type[name] += nbytes
        self.bytes_by_boundary[self._boundary_of_channel(peer)] += nbytes
        self.messages_by_type[name] += 1

    @property
    def bytes_total(self) -> int:
        return sum(self.bytes_by_type.values())


class EgressGuard(_Guard):
    """One party's single choke point for outgoing cross-boundary messages.

    `ledger`: a boundary's record of the aggregates it minted; without one, a boundary can send
    no float aggregate at all.
    """

    def __init__(
        self, party: str, terms: Terms, audit: AuditSink | None, ledger: Ledger | None = None
    ) -> None:
        super().__init__(party, terms, audit)
        self.ledger = ledger

    def send(self, now: float, body: Message, peer: str) -> list[bytes]:
        """Wrap `body` for the channel to `peer`, check, serialise, count and record it.

        Returns the frames to transmit in order (one, or typed slices of a large tensor). Raises
        ContractViolation (recorded, nothing sent) when the body has no way across or breaks the
        contract.
        """
        field = CROSS_BOUNDARY_BODIES.get(body.DESCRIPTOR.full_name)
        if field is None:
            problem = f"{body.DESCRIPTOR.full_name} ({flow_class_name(body.DESCRIPTOR)}) has no way across a boundary"
            self._refuse(now, "out", peer, body, [body.SerializeToString()], [problem])
        envelope = boundary_pb2.CrossBoundaryEnvelope(boundary_id=self._boundary_of_channel(peer))
        try:
            getattr(envelope, field).CopyFrom(body)
            if self.audit is not None:
                seq, head = self.audit.head()
                envelope.audit_head.seq, envelope.audit_head.hash = seq, bytes.fromhex(head)
            found = tensors(envelope)
            problems = self._channel_problems(peer) + schema_problems(envelope, found)
            problems = problems or self.terms.problems(envelope, self.role, found) + self._minted_problems(
                found
            )
        except Exception as e:  # a check that fails is a refusal, never a dead sender
            problems = [_failure(e)]
        if problems:
            self._refuse(now, "out", peer, body, [envelope.SerializeToString()], problems)
        frames = [part.SerializeToString() for part in slice_envelope(envelope)]
        self._count(body, frames, peer)
        self._record(now, "out", peer, body, frames, "sent", None)
        return frames

    def _minted_problems(self, found: list[tuple[str, tensor_pb2.TensorPayload]]) -> list[str]:
        out = []
        for path, t in found:
            if TENSORS[path].minted and (self.ledger is None or not self.ledger.minted(t)):
                out.append(
                    f"{path}: this boundary's aggregation rounds did not mint this aggregate (a provenance "
                    "label is no proof)"
                )
        return out


@dataclass
class _Partial:
    """A sliced message being reassembled: its frames so far, and when the last one came."""

    reassembler: Reassembler
    frames: list[bytes] = field(default_factory=list)
    last_at: float = 0.0


class IngressGuard(_Guard):
    """One party's mirror check on incoming cross-boundary frames."""

    def __init__(self, party: str, terms: Terms, audit: AuditSink | None) -> None:
        super().__init__(party, terms, audit)
        self._partial: dict[str, _Partial] = {}

    def forget(self, peer: str) -> None:
        """Drop what a half-received message from `peer` left (its stream ended)."""
        self._partial.pop(peer, None)

    def _expire(self, now: float, peer: str) -> None:
        """Drop (and record as refused) a sliced message from `peer` whose next slice has not come
        for REASSEMBLY_IDLE_S: a stalled peer holds nothing for ever (the cap bounds the bytes)."""
        partial = self._partial.get(peer)
        if partial is None or now - partial.last_at <= REASSEMBLY_IDLE_S:
            return
        del self._partial[peer]
        first = boundary_pb2.CrossBoundaryEnvelope.FromString(partial.frames[0])  # checked on arrival
        self.refused += 1
        reason = f"no slice of this message for over {REASSEMBLY_IDLE_S:g} s: its parts were dropped"
        self._record(
            now, "in", peer, getattr(first, first.WhichOneof("body")), partial.frames, "refused", reason
        )

    def receive(self, now: float, frame: bytes, peer: str) -> Message | None:
        """Check one frame from `peer`; the message body once its last frame arrived, else None.

        Every frame is checked on its own (it is a typed message); a frame that breaks the
        contract, or whose checking fails in any way, raises ContractViolation (recorded) and
        discards the message it belonged to.
        """
        self._expire(now, peer)
        partial = self._partial.setdefault(peer, _Partial(Reassembler(self.terms.max_tensor_bytes)))
        reassembler, frames, partial.last_at = partial.reassembler, partial.frames, now
        frames.append(frame)
        envelope, body, whole = boundary_pb2.CrossBoundaryEnvelope(), None, None
        try:
            envelope.ParseFromString(frame)
            field = envelope.WhichOneof("body")
            body = getattr(envelope, field) if field else envelope
            found = tensors(envelope)
            problems = self._channel_problems(peer) + schema_problems(envelope, found)
            if not problems and envelope.SerializeToString() != frame:
                problems = [
                    "the frame is not the canonical encoding of its message (fields repeated or reordered)"
                ]
            if not problems:
                problems = self.terms.problems(envelope, role_of(peer), found)
            if self.audit is not None and not envelope.HasField("audit_head"):
                problems.append("the envelope carries no audit chain head of its sender to countersign")
            boundary = self._boundary_of_channel(peer)
            if envelope.boundary_id != boundary:
                problems.append(
                    f"envelope names boundary {envelope.boundary_id[:32]!r}, the channel's is {boundary!r}"
                )
            if not problems:
                whole = reassembler.add(envelope)
        except Exception as e:  # undecodable, or a check that fails: a refusal, never a dead reader
            problems = [_failure(e)]
        if problems:
            self._partial.pop(peer)
            self._refuse(now, "in", peer, envelope if body is None else body, frames, problems)
        if whole is None:
            return None
        del self._partial[peer]
        body = getattr(whole, whole.WhichOneof("body"))
        self._count(body, frames, peer)
        head = whole.audit_head if whole.HasField("audit_head") else None
        self._record(now, "in", peer, body, frames, "received", None, head)
        return body
