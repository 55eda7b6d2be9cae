"""Egress and ingress guards: the only way a message crosses a boundary.

Every party (the global plane, each boundary coordinator) owns one `EgressGuard` for what it
sends across and one `IngressGuard` for what it receives. `send` wraps the body in the envelope
of its channel with the party's audit chain head, checks it against the schema's rules
(`echelon.contract.rules`) and the run's terms (`echelon.contract.policy`), and for a boundary that
a float aggregate is one its own rounds minted (`echelon.contract.provenance.Ledger`); then it
lays out its frames (in typed slices when large: `echelon.contract.slicing`), counts the exact
wire bytes, hashes them, records it (a sent record is synced), and only then returns the frames
to transmit. `receive` checks each frame the same way, and that it is the canonical encoding of
a message (no unknown fields, no second encoding of the same message), before reassembling it.
Anything else, and any exception while checking, raises `ContractViolation`, is recorded as
refused, and nothing is sent or delivered. Both runtimes call these very objects.

A tensor's data is held apart from its message on both sides and copied once per side
(`echelon.contract.slicing`): `stream` takes it beside the body or reads it out once, and returns
frames that are built as they are taken, so a transport writes frame k while frame k+1 is built.
The record carries the frames' wire digest (`WireDigest`) and must be on disk before the first
byte leaves; a minted aggregate's data was hashed when it was minted, any other data is hashed
here. An ingress guard hashes the data as it arrives and gives the body with its data beside it
(`receive_apart`) or parsed into it (`receive`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import DecodeError, Message

from echelon.contract.policy import BOUNDARY, TENSORS, Terms, role_of
from echelon.contract.provenance import Ledger, Minted
from echelon.contract.rules import flow_class_name, round_of, schema_problems, tensor_summary, tensors
from echelon.contract.slicing import (
    REASSEMBLY_IDLE_S,
    FieldPath,
    Frames,
    Reassembler,
    Whole,
    WireDigest,
    hold_apart,
    slice_envelope,
    take_data,
    whole,
)
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

    def countersigned(self, peer: str, seq: int) -> bool:
        """Whether `peer`'s chain head at `seq` was countersigned already."""
        ...


Wire = tuple[str, int]  # what a record says of the frames: their `WireDigest` (hex) and byte count


def _wire(frame: bytes) -> Wire:
    """A frame that is no envelope (a body refused before it was wrapped), as a frame without data."""
    digest = WireDigest()
    digest.split(frame, None)
    return digest.hexdigest(), digest.nbytes


def _held(path: FieldPath, data: bytes | memoryview) -> tuple[str, int] | None:
    """The `tensors()` path and data length of a tensor whose data is held apart at `path`."""
    return (".".join(path[:-1]), len(data)) if path else None


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
        wire: Wire,
        outcome: str,
        reason: str | None,
        peer_head: boundary_pb2.AuditHead | None = None,
    ) -> None:
        if self.audit is None:
            return
        provenance, quorum = tensor_summary(body)
        self.audit.append(
            time=now,
            channel=f"{peer}<->{self.party}" if direction == "in" else f"{self.party}<->{peer}",
            direction=direction,
            peer=peer,
            message_type=body.DESCRIPTOR.full_name,
            flow_class=flow_class_name(body.DESCRIPTOR),
            wire_bytes=wire[1],
            round_id=round_of(body),
            payload_sha256=wire[0],
            quorum=quorum,
            provenance=provenance,
            outcome=outcome,
            reason=reason,
            peer_seq=None if peer_head is None else peer_head.seq,
            peer_head=None if peer_head is None else peer_head.hash.hex(),
        )

    def _refuse(
        self, now: float, direction: str, peer: str, body: Message, wire: Wire, problems: list[str]
    ) -> None:
        self.refused += 1
        reason = "; ".join(problems)
        self._record(now, direction, peer, body, wire, "refused", reason)
        arrow = f"{self.party} -> {peer}" if direction == "out" else f"{peer} -> {self.party}"
        raise ContractViolation(f"{arrow}: {reason}")

    def _count(self, body: Message, wire_bytes: int, peer: str) -> None:
        name = body.DESCRIPTOR.full_name
        self.bytes_by_type[name] += wire_bytes
        self.bytes_by_boundary[self._boundary_of_channel(peer)] += wire_bytes
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
        self._hashed: tuple[bytes, bytes] | None = None  # the data hashed at the last send, its SHA-256

    def _sha256(self, data: bytes | memoryview) -> bytes:
        """SHA-256 of data that was not minted, taken once for the same bytes object sent again
        (the global plane sends one reference to every boundary)."""
        if not isinstance(data, bytes):
            return hashlib.sha256(data).digest()
        if self._hashed is None or self._hashed[0] is not data:
            self._hashed = data, hashlib.sha256(data).digest()
        return self._hashed[1]

    def send(self, now: float, body: Message, peer: str, data: bytes | None = None) -> list[bytes]:
        """Wrap `body` for the channel to `peer`, check, serialise, count and record it.

        Returns the frames to transmit in order (one, or typed slices of a large tensor). Raises
        ContractViolation (recorded, nothing sent) when the body has no way across or breaks the
        contract. `data`: as `stream`.
        """
        return list(self.stream(now, body, peer, data))

    def stream(self, now: float, body: Message, peer: str, data: bytes | memoryview | None = None) -> Frames:
        """`send`, with the frames built one by one as they are taken (`Frames`), so a transport
        sends each while the next is built. Checked, counted and recorded when this returns.

        `data`: the data of `body`'s tensor, held apart by the caller (the tensor holds none), as a
        boundary holds what its ledger minted (`Minted.data`); it is checked against the tensor's
        numel as if the tensor held it.
        """
        field = CROSS_BOUNDARY_BODIES.get(body.DESCRIPTOR.full_name)
        if field is None:
            problem = f"{body.DESCRIPTOR.full_name} ({flow_class_name(body.DESCRIPTOR)}) has no way across a boundary"
            self._refuse(now, "out", peer, body, _wire(body.SerializeToString()), [problem])
        envelope = boundary_pb2.CrossBoundaryEnvelope(boundary_id=self._boundary_of_channel(peer))
        path: FieldPath = ()
        held: bytes | memoryview = b""
        minted: Minted | None = None
        try:
            # The envelope gets the body without its tensor's data: the data is read once, here.
            path, held = hold_apart(body, getattr(envelope, field), data)
            path = (field, *path) if path else ()
            if self.audit is not None:
                seq, head = self.audit.head()
                envelope.audit_head.seq, envelope.audit_head.hash = seq, bytes.fromhex(head)
            found = tensors(envelope)
            problems = self._channel_problems(peer) + schema_problems(envelope, found, _held(path, held))
            if not problems:
                problems, minted = self._minted_problems(found, path, held)
                problems = self.terms.problems(envelope, self.role, found) + problems
        except Exception as e:  # a check that fails is a refusal, never a dead sender
            problems = [_failure(e)]
        if problems:
            refused = whole(envelope, path, held, hashlib.sha256(held).digest())
            self._refuse(now, "out", peer, body, (refused.digest(), refused.nbytes), problems)
        # A minted aggregate's data was hashed when it was minted; any other is hashed here.
        frames = slice_envelope(
            envelope, path, held, minted.digest if minted is not None else self._sha256(held)
        )
        self._count(body, frames.nbytes, peer)
        self._record(now, "out", peer, body, (frames.digest(), frames.nbytes), "sent", None)
        return frames

    def _minted_problems(
        self, found: list[tuple[str, tensor_pb2.TensorPayload]], held: FieldPath, data: bytes | memoryview
    ) -> tuple[list[str], Minted | None]:
        """A minted tensor the ledger did not mint, and the ledger's record of the one it did; the
        tensor whose data is held apart at `held` is compared with that data."""
        out, record = [], None
        for path, t in found:
            if not TENSORS[path].minted:
                continue
            if self.ledger is not None:
                record = self.ledger.minted(t, data if held and path == ".".join(held[:-1]) else None)
            if record is None:
                out.append(
                    f"{path}: this boundary's aggregation rounds did not mint this aggregate (a provenance "
                    "label is no proof)"
                )
        return out, record


@dataclass
class _Partial:
    """A sliced message being reassembled: the digest and byte count of its frames so far
    (`WireDigest`), and when the last one came."""

    reassembler: Reassembler
    digest: WireDigest = field(default_factory=WireDigest)
    last_at: float = 0.0

    @property
    def wire(self) -> Wire:
        return self.digest.hexdigest(), self.digest.nbytes


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
        first = partial.reassembler.first  # checked on arrival
        self.refused += 1
        reason = f"no slice of this message for over {REASSEMBLY_IDLE_S:g} s: its parts were dropped"
        self._record(
            now, "in", peer, getattr(first, first.WhichOneof("body")), partial.wire, "refused", reason
        )

    def receive(self, now: float, frame: bytes, peer: str) -> Message | None:
        """Check one frame from `peer`; the message body once its last frame arrived, else None.

        Every frame is checked on its own (it is a typed message); a frame that breaks the
        contract, or whose checking fails in any way, raises ContractViolation (recorded) and
        discards the message it belonged to.
        """
        complete = self.receive_apart(now, frame, peer)
        if complete is None:
            return None
        envelope = complete.message()
        return getattr(envelope, envelope.WhichOneof("body"))

    def receive_apart(self, now: float, frame: bytes, peer: str) -> Whole | None:
        """`receive`, the whole envelope given with its tensor's data held apart (`Whole`: its body
        holds no data, `data` is it, in place in the buffer the slices were gathered in)."""
        self._expire(now, peer)
        partial = self._partial.get(peer)
        if partial is None:
            partial = self._partial[peer] = _Partial(Reassembler(self.terms.max_tensor_bytes))
        partial.last_at = now
        split = partial.reassembler.next_slice(frame)
        if split is not None:  # exactly the next slice of a message whose first slice was checked
            partial.digest.split(frame, split)
            complete = partial.reassembler.add_next(memoryview(frame)[split[0] : split[1]])
            return None if complete is None else self._received(now, peer, partial, complete)
        envelope, body, complete, hashed = boundary_pb2.CrossBoundaryEnvelope(), None, None, False
        try:
            envelope.ParseFromString(frame)
            field = envelope.WhichOneof("body")
            body = getattr(envelope, field) if field else envelope
            found = tensors(envelope)
            path, data, split = take_data(frame, envelope, found)  # held apart, not copied
            problems = self._channel_problems(peer) + schema_problems(envelope, found, _held(path, data))
            if not problems and split is None:
                problems = [
                    "the frame is not the canonical encoding of its message (fields repeated or reordered)"
                ]
            if not problems:
                problems = self.terms.problems(envelope, role_of(peer), found)
            if self.audit is not None and not envelope.HasField("audit_head"):
                problems.append("the envelope carries no audit chain head of its sender to countersign")
            elif self.audit is not None and self.audit.countersigned(peer, envelope.audit_head.seq):
                problems.append(
                    f"a replayed message: {peer}'s chain head at seq {envelope.audit_head.seq} was "
                    "countersigned already"
                )
            boundary = self._boundary_of_channel(peer)
            if envelope.boundary_id != boundary:
                problems.append(
                    f"envelope names boundary {envelope.boundary_id[:32]!r}, the channel's is {boundary!r}"
                )
            partial.digest.split(frame, split)  # the frame's data is hashed once, here
            hashed = True
            if not problems:
                complete = partial.reassembler.add(envelope, data, frame)
        except Exception as e:  # undecodable, or a check that fails: a refusal, never a dead reader
            problems = [_failure(e)]
        if not hashed:  # it could not be split: a frame without data
            partial.digest.split(frame, None)
        if problems:
            self._partial.pop(peer)
            self._refuse(now, "in", peer, envelope if body is None else body, partial.wire, problems)
        return None if complete is None else self._received(now, peer, partial, complete)

    def _received(self, now: float, peer: str, partial: _Partial, complete: Whole) -> Whole:
        """Count and record the message `complete` from `peer`."""
        del self._partial[peer]
        body = complete.body
        self._count(body, partial.digest.nbytes, peer)
        head = complete.envelope.audit_head if complete.envelope.HasField("audit_head") else None
        self._record(now, "in", peer, body, partial.wire, "received", None, head)
        return complete
