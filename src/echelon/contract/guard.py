"""Egress and ingress guards: the only way a message crosses a boundary.

Every party (the global plane, each boundary coordinator) owns one `EgressGuard` for what it
sends across and one `IngressGuard` for what it receives. `send` checks the message against the
contract, serialises it, counts the exact wire bytes, records it, and only then returns the
bytes to transmit. Anything else raises `ContractViolation`, is recorded as refused, and
nothing is sent. Both runtimes (simulation and gRPC) call these very objects.

The contract, checked on every crossing:
- the message is a `CrossBoundaryEnvelope` whose body type is one of its oneof fields, and whose
  `boundary_id` names the boundary end of this very channel;
- the body's declared flow class is AGGREGATE, CONTROL, TELEMETRY or AUDIT (never DEVICE_LOCAL);
- every tensor inside has provenance BOUNDARY_AGGREGATE (with at least `min_quorum`
  contributors) or GLOBAL, a known dtype and exactly numel * itemsize bytes;
- every string or bytes field outside a tensor declares `max_bytes` in the schema and respects it,
  so no free-form field can smuggle a tensor.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Protocol

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from echelon.v1 import boundary_pb2, options_pb2, tensor_pb2
from echelon.wire import CROSS_BOUNDARY_BODIES

CROSSING_CLASSES = frozenset(
    {options_pb2.AGGREGATE, options_pb2.CONTROL, options_pb2.TELEMETRY, options_pb2.AUDIT}
)
CROSSING_PROVENANCE = frozenset({tensor_pb2.BOUNDARY_AGGREGATE, tensor_pb2.GLOBAL})
ITEMSIZE = {tensor_pb2.FLOAT32: 4, tensor_pb2.UINT32: 4, tensor_pb2.UINT64: 8}
ROUND_FIELDS = ("outer_step", "round_id", "middle_step")


class ContractViolation(Exception):
    """A message that may not cross a boundary. Nothing was sent; the attempt was recorded."""


class AuditSink(Protocol):
    """Where a guard records each crossing (the audit log)."""

    def append(self, **fields: object) -> object: ...


def flow_class(descriptor: Descriptor) -> int:
    """The flow class a message type declares in the schema (FLOW_CLASS_UNSPECIFIED if none)."""
    return descriptor.GetOptions().Extensions[options_pb2.flow_class]


def flow_class_name(descriptor: Descriptor) -> str:
    return options_pb2.FlowClass.Name(flow_class(descriptor))


def _tensor_problems(t: tensor_pb2.TensorPayload, min_quorum: int) -> list[str]:
    out = []
    if t.provenance not in CROSSING_PROVENANCE:
        out.append(f"tensor provenance {tensor_pb2.Provenance.Name(t.provenance)} may not cross a boundary")
    elif t.provenance == tensor_pb2.BOUNDARY_AGGREGATE and t.contributors < min_quorum:
        out.append(f"boundary aggregate of {t.contributors} contributors is below the quorum of {min_quorum}")
    if t.dtype not in ITEMSIZE:
        out.append(f"tensor dtype {t.dtype} is unknown")
    elif len(t.data) != t.numel * ITEMSIZE[t.dtype]:
        out.append(f"tensor holds {len(t.data)} B, not numel {t.numel} x {ITEMSIZE[t.dtype]} B")
    return out


def _field_problems(msg: Message, min_quorum: int, path: str) -> list[str]:
    if isinstance(msg, tensor_pb2.TensorPayload):
        return [f"{path}: {p}" for p in _tensor_problems(msg, min_quorum)]
    out = []
    for field, value in msg.ListFields():
        where = f"{path}.{field.name}"
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            values = value if field.is_repeated else [value]
            for i, v in enumerate(values):
                out += _field_problems(v, min_quorum, where if len(values) == 1 else f"{where}[{i}]")
        elif field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
            limit = field.GetOptions().Extensions[options_pb2.max_bytes]
            values = value if field.is_repeated else [value]
            for v in values:
                size = len(v.encode() if isinstance(v, str) else v)
                if limit == 0:
                    out.append(f"{where}: free-form field without a declared max_bytes may not cross")
                elif size > limit:
                    out.append(f"{where}: {size} B exceeds its declared limit of {limit} B")
    return out


def contract_problems(envelope: Message, min_quorum: int, boundary_id: str | None = None) -> list[str]:
    """Every way `envelope` breaks the cross-boundary contract (empty when it may cross).

    `boundary_id`, when given, is the boundary end of the channel the envelope travels on.
    """
    if not isinstance(envelope, boundary_pb2.CrossBoundaryEnvelope):
        return [f"{type(envelope).__name__} is not a CrossBoundaryEnvelope"]
    field = envelope.WhichOneof("body")
    if field is None:
        return ["envelope carries no body"]
    body = getattr(envelope, field)
    cls = flow_class(body.DESCRIPTOR)
    problems = []
    if boundary_id is not None and envelope.boundary_id != boundary_id:
        problems.append(
            f"envelope names boundary {envelope.boundary_id[:32]!r}, the channel's is {boundary_id!r}"
        )
    if cls not in CROSSING_CLASSES:
        problems.append(f"{body.DESCRIPTOR.full_name} has flow class {options_pb2.FlowClass.Name(cls)}")
    return problems + _field_problems(envelope, min_quorum, "envelope")


def round_of(body: Message) -> int:
    """The round a message belongs to (outer step, aggregation round or middle step), or 0."""
    for name in ROUND_FIELDS:
        if name in body.DESCRIPTOR.fields_by_name:
            return int(getattr(body, name))
    return 0


def _tensor_summary(body: Message) -> tuple[str | None, int]:
    """Provenance and contributor count of the first tensor in `body` (None, 0 without one)."""
    for _, value in body.ListFields():
        if isinstance(value, tensor_pb2.TensorPayload):
            return tensor_pb2.Provenance.Name(value.provenance), value.contributors
    return None, 0


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
        data: bytes,
        outcome: str,
        reason: str | None,
    ) -> None:
        if self.audit is None:
            return
        provenance, quorum = _tensor_summary(body)
        self.audit.append(
            time=now,
            channel=f"{peer}<->{self.party}" if direction == "in" else f"{self.party}<->{peer}",
            direction=direction,
            peer=peer,
            message_type=body.DESCRIPTOR.full_name,
            flow_class=flow_class_name(body.DESCRIPTOR),
            wire_bytes=len(data),
            round_id=round_of(body),
            payload_sha256=hashlib.sha256(data).hexdigest(),
            quorum=quorum,
            provenance=provenance,
            outcome=outcome,
            reason=reason,
        )

    def _refuse(
        self, now: float, direction: str, peer: str, body: Message, data: bytes, problems: list[str]
    ) -> None:
        self.refused += 1
        reason = "; ".join(problems)
        self._record(now, direction, peer, body, data, "refused", reason)
        arrow = f"{self.party} -> {peer}" if direction == "out" else f"{peer} -> {self.party}"
        raise ContractViolation(f"{arrow}: {reason}")

    def _count(self, body: Message, size: int) -> None:
        name = body.DESCRIPTOR.full_name
        self.bytes_by_type[name] += size
        self.messages_by_type[name] += 1

    @property
    def bytes_total(self) -> int:
        return sum(self.bytes_by_type.values())


class EgressGuard(_Guard):
    """One party's single choke point for outgoing cross-boundary messages."""

    def send(self, now: float, body: Message, peer: str) -> bytes:
        """Wrap `body` for the channel to `peer`, check, serialise, count and record it.

        Returns the bytes to transmit. Raises ContractViolation (recorded, nothing sent) when the
        body has no way across or breaks the contract.
        """
        boundary_id = self._boundary_of_channel(peer)
        field = CROSS_BOUNDARY_BODIES.get(body.DESCRIPTOR.full_name)
        if field is None:
            problem = f"{body.DESCRIPTOR.full_name} ({flow_class_name(body.DESCRIPTOR)}) has no way across a boundary"
            self._refuse(now, "out", peer, body, body.SerializeToString(), [problem])
        envelope = boundary_pb2.CrossBoundaryEnvelope(boundary_id=boundary_id)
        getattr(envelope, field).CopyFrom(body)
        data = envelope.SerializeToString()
        problems = contract_problems(envelope, self.min_quorum, boundary_id)
        if problems:
            self._refuse(now, "out", peer, body, data, problems)
        self._count(body, len(data))
        self._record(now, "out", peer, body, data, "sent", None)
        return data


class IngressGuard(_Guard):
    """One party's mirror check on incoming cross-boundary bytes."""

    def receive(self, now: float, data: bytes, peer: str) -> Message:
        """Parse and check bytes from `peer`; the body they carry. ContractViolation (recorded) otherwise."""
        try:
            envelope = boundary_pb2.CrossBoundaryEnvelope.FromString(data)
        except DecodeError as e:
            envelope = boundary_pb2.CrossBoundaryEnvelope()
            self._refuse(now, "in", peer, envelope, data, [f"undecodable envelope ({e})"])
        field = envelope.WhichOneof("body")
        body = getattr(envelope, field) if field else envelope
        problems = contract_problems(envelope, self.min_quorum, self._boundary_of_channel(peer))
        if problems:
            self._refuse(now, "in", peer, body, data, problems)
        self._count(body, len(data))
        self._record(now, "in", peer, body, data, "received", None)
        return body
