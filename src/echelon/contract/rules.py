"""The information-flow contract as pure checks on cross-boundary messages.

`contract_problems` lists every way an envelope breaks the contract (empty when it may cross):
- it is a `CrossBoundaryEnvelope` whose body type is one of its oneof fields, and whose
  `boundary_id` names the boundary end of the channel it travels on;
- the body's declared flow class is AGGREGATE, CONTROL, TELEMETRY or AUDIT (never DEVICE_LOCAL);
- every tensor inside has provenance BOUNDARY_AGGREGATE (with at least `min_quorum`
  contributors) or GLOBAL, a known dtype and exactly numel * itemsize bytes;
- every string or bytes field outside a tensor declares `max_bytes` in the schema and respects it,
  so no free-form field can smuggle a tensor.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from echelon.v1 import boundary_pb2, options_pb2, tensor_pb2

CROSSING_CLASSES = frozenset(
    {options_pb2.AGGREGATE, options_pb2.CONTROL, options_pb2.TELEMETRY, options_pb2.AUDIT}
)
CROSSING_PROVENANCE = frozenset({tensor_pb2.BOUNDARY_AGGREGATE, tensor_pb2.GLOBAL})
ITEMSIZE = {tensor_pb2.FLOAT32: 4, tensor_pb2.UINT32: 4, tensor_pb2.UINT64: 8, tensor_pb2.BFLOAT16: 2}
ROUND_FIELDS = ("outer_step", "round_id", "middle_step")


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


def tensor_summary(body: Message) -> tuple[str | None, int]:
    """Provenance and contributor count of the first tensor in `body` (None, 0 without one)."""
    for _, value in body.ListFields():
        if isinstance(value, tensor_pb2.TensorPayload):
            return tensor_pb2.Provenance.Name(value.provenance), value.contributors
    return None, 0
