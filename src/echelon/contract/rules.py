"""The rules the schema declares, checked at every depth of a cross-boundary envelope.

`schema_problems` lists every way an envelope breaks them (empty when it keeps them all):
- it is a `CrossBoundaryEnvelope` with a body;
- every message in it, at any depth, declares a flow class that may cross (AGGREGATE, CONTROL,
  TELEMETRY, AUDIT, SECURE_AGGREGATION; never DEVICE_LOCAL or none), tensors aside;
- no message in it holds unknown fields (bytes the schema does not declare);
- every string or bytes field declares `max_bytes` and respects it, every repeated field declares
  `max_count` and respects it, so no free-form or unbounded field can carry a tensor;
- every enum holds a declared value and every float is finite;
- it holds at most one tensor, of a declared dtype, with exactly numel x itemsize bytes, and a
  slice lies within its whole.
Who may send what, provenance and dimensions are the run's terms: `echelon.contract.policy`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cache

from google.protobuf import unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from echelon.tensors import ITEMSIZE
from echelon.v1 import boundary_pb2, options_pb2, tensor_pb2

CROSSING_CLASSES = frozenset(
    {
        options_pb2.AGGREGATE,
        options_pb2.CONTROL,
        options_pb2.TELEMETRY,
        options_pb2.AUDIT,
        options_pb2.SECURE_AGGREGATION,
    }
)
ROUND_FIELDS = ("outer_step", "round_id", "middle_step")
TENSOR = tensor_pb2.TensorPayload.DESCRIPTOR
_TEXT = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
_FLOAT = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)


@cache
def flow_class(descriptor: Descriptor) -> int:
    """The flow class a message type declares in the schema (FLOW_CLASS_UNSPECIFIED if none)."""
    return descriptor.GetOptions().Extensions[options_pb2.flow_class]


@cache
def holds_tensor(descriptor: Descriptor) -> bool:
    """Whether a message of this type can hold a tensor at some depth."""
    return descriptor is TENSOR or any(
        f.message_type is not None and f.message_type is not descriptor and holds_tensor(f.message_type)
        for f in descriptor.fields
    )


def flow_class_name(descriptor: Descriptor) -> str:
    return options_pb2.FlowClass.Name(flow_class(descriptor))


@cache
def limits(field: FieldDescriptor) -> tuple[int, int]:
    """(max_bytes, max_count) a field declares (0: none)."""
    options = field.GetOptions()
    return options.Extensions[options_pb2.max_bytes], options.Extensions[options_pb2.max_count]


def enum_name(value: int, enum: type) -> str:
    """The declared name of `value` in a generated enum, or `UNDECLARED_<value>`."""
    return enum.Name(value) if value in enum.values() else f"UNDECLARED_{value}"


def tensors(msg: Message, path: str = "") -> list[tuple[str, tensor_pb2.TensorPayload]]:
    """Every tensor in `msg` with its path (field names joined by '.', `[i]` for repeated)."""
    out: list[tuple[str, tensor_pb2.TensorPayload]] = []
    if not holds_tensor(msg.DESCRIPTOR):
        return out
    for field, value in msg.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE or not holds_tensor(field.message_type):
            continue
        where = f"{path}.{field.name}" if path else field.name
        values = list(enumerate(value)) if field.is_repeated else [(None, value)]
        for i, v in values:
            at = where if i is None else f"{where}[{i}]"
            if v.DESCRIPTOR is TENSOR:
                out.append((at, v))
            else:
                out += tensors(v, at)
    return out


def tensor_problems(t: tensor_pb2.TensorPayload, nbytes: int | None = None) -> list[str]:
    """A tensor's own consistency: declared enums, dtype, byte count, slice bounds.

    `nbytes`: the length of its data when that is held apart from the message (`t` holds none).
    """
    out = []
    size = len(t.data) if nbytes is None else nbytes  # reading `data` copies it
    if t.provenance not in tensor_pb2.Provenance.values():
        out.append(f"tensor provenance {t.provenance} is not declared in the schema")
    if t.dtype not in ITEMSIZE:
        out.append(f"tensor dtype {enum_name(t.dtype, tensor_pb2.DType)} is not a wire dtype")
    elif size != t.numel * ITEMSIZE[t.dtype]:
        out.append(f"tensor holds {size} B, not numel {t.numel} x {ITEMSIZE[t.dtype]} B")
    if t.total_numel and t.offset + t.numel > t.total_numel:
        out.append(f"slice [{t.offset}, {t.offset + t.numel}) exceeds its whole of {t.total_numel}")
    elif not t.total_numel and t.offset:
        out.append("tensor has an offset but no total_numel (a slice of nothing)")
    return out


def walk_problems(msg: Message, path: str = "message", held: Mapping[str, int] | None = None) -> list[str]:
    """Every way `msg` and the messages in it, at any depth, break the schema's declarations.

    `held`: the data length of each tensor whose data is held apart, by its path (`path` first).
    """
    out: list[str] = []
    _walk(msg, path, out, held or {})
    return out


def _walk(msg: Message, path: str, out: list[str], held: Mapping[str, int]) -> None:
    desc = msg.DESCRIPTOR
    unknown = unknown_fields.UnknownFieldSet(msg)
    if len(unknown):
        numbers = sorted({f.field_number for f in unknown})
        out.append(f"{path}: unknown fields {numbers[:8]} ({desc.full_name} declares no such field)")
    if desc is TENSOR:
        out += [f"{path}: {p}" for p in tensor_problems(msg, held.get(path))]
        return
    cls = flow_class(desc)
    if cls not in CROSSING_CLASSES:
        name = options_pb2.FlowClass.Name(cls)
        out.append(f"{path}: {desc.full_name} has flow class {name}, which may not cross a boundary")
    for field, value in msg.ListFields():
        where = f"{path}.{field.name}"
        max_bytes, max_count = limits(field)
        values = value if field.is_repeated else (value,)
        if field.is_repeated:
            if max_count == 0:
                out.append(f"{where}: repeated field without a declared max_count may not cross")
            elif len(values) > max_count:
                out.append(f"{where}: {len(values)} elements exceed its declared limit of {max_count}")
        kind = field.type
        if kind == FieldDescriptor.TYPE_MESSAGE:
            for i, v in enumerate(values):
                _walk(v, where if not field.is_repeated else f"{where}[{i}]", out, held)
        elif kind in _TEXT:
            for v in values:
                size = len(v.encode() if isinstance(v, str) else v)
                if max_bytes == 0:
                    out.append(f"{where}: free-form field without a declared max_bytes may not cross")
                elif size > max_bytes:
                    out.append(f"{where}: {size} B exceeds its declared limit of {max_bytes} B")
        elif kind == FieldDescriptor.TYPE_ENUM:
            declared = field.enum_type.values_by_number
            out += [
                f"{where}: value {v} is not declared in {field.enum_type.name}"
                for v in values
                if v not in declared
            ]
        elif kind in _FLOAT:
            out += [f"{where}: {v} is not a finite number" for v in values if not math.isfinite(v)]


def schema_problems(
    envelope: Message,
    found: list[tuple[str, tensor_pb2.TensorPayload]] | None = None,
    held: tuple[str, int] | None = None,
) -> list[str]:
    """Every way `envelope` breaks the rules the schema declares (empty when it keeps them).

    `found`: `tensors(envelope)`, when the caller has it already. `held`: the `tensors()` path and
    data length of the tensor whose data is held apart from the envelope (`echelon.contract.slicing`).
    """
    if not isinstance(envelope, boundary_pb2.CrossBoundaryEnvelope):
        return [f"{type(envelope).__name__} is not a CrossBoundaryEnvelope"]
    if envelope.WhichOneof("body") is None:
        return ["envelope carries no body"]
    out = walk_problems(envelope, "envelope", {f"envelope.{held[0]}": held[1]} if held else None)
    found = tensors(envelope) if found is None else found
    if len(found) > 1:
        out.append(f"envelope holds {len(found)} tensors; a message crosses with at most one")
    return out


def round_of(body: Message) -> int:
    """The round a message belongs to (outer step, aggregation round or middle step), or 0."""
    for name in ROUND_FIELDS:
        if name in body.DESCRIPTOR.fields_by_name:
            return int(getattr(body, name))
    return 0


def tensor_summary(body: Message) -> tuple[str | None, int]:
    """Provenance name and contributor count of the tensor in `body`, at any depth (None, 0
    without one); an undeclared provenance is named `UNDECLARED_<n>`."""
    found = tensors(body)
    if not found:
        return None, 0
    t = found[0][1]
    return enum_name(t.provenance, tensor_pb2.Provenance), t.contributors
