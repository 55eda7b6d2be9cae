"""Typed slicing of large cross-boundary messages.

A message whose tensor holds more than `MAX_SLICE_BYTES` of data travels as several envelopes of
the same type, each a valid message on its own whose tensor holds one slice (`offset`,
`total_numel`). No untyped frame ever crosses: every slice passes the same checks. Both runtimes
use these slices, so simulated and deployed byte counts agree.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from echelon.contract.rules import ITEMSIZE
from echelon.v1 import boundary_pb2, tensor_pb2

MAX_SLICE_BYTES = 1 << 20


def _find_tensor(message: Message) -> tensor_pb2.TensorPayload | None:
    """The first tensor in `message`, at any depth of its singular fields (+SA's masked Delta_b sits
    in OuterAggregation.secagg.masked_input.masked); the message's own, so setting it edits it."""
    for field, value in message.ListFields():
        if isinstance(value, tensor_pb2.TensorPayload):
            return value
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated:
            found = _find_tensor(value)
            if found is not None:
                return found
    return None


def slice_envelope(envelope: boundary_pb2.CrossBoundaryEnvelope) -> list[boundary_pb2.CrossBoundaryEnvelope]:
    """`envelope` itself, or its slices when its tensor exceeds MAX_SLICE_BYTES."""
    tensor = _find_tensor(getattr(envelope, envelope.WhichOneof("body")))
    if tensor is None or len(tensor.data) <= MAX_SLICE_BYTES:
        return [envelope]
    data, numel = memoryview(tensor.data), tensor.numel  # read once: each read copies the bytes
    itemsize = ITEMSIZE[tensor.dtype]
    per_slice = MAX_SLICE_BYTES // itemsize
    # A template without the data, so each slice copies only the small fields, not the tensor.
    template = boundary_pb2.CrossBoundaryEnvelope()
    template.CopyFrom(envelope)
    _find_tensor(template).ClearField("data")
    slices = []
    for start in range(0, numel, per_slice):
        count = min(per_slice, numel - start)
        part = boundary_pb2.CrossBoundaryEnvelope()
        part.CopyFrom(template)
        part_tensor = _find_tensor(part)
        part_tensor.data = bytes(data[start * itemsize : (start + count) * itemsize])
        part_tensor.numel, part_tensor.offset, part_tensor.total_numel = count, start, numel
        slices.append(part)
    return slices


class Reassembler:
    """Joins the slices of one message, in order; a message without slices completes at once."""

    def __init__(self) -> None:
        self._parts: list[boundary_pb2.CrossBoundaryEnvelope] = []

    def add(self, part: boundary_pb2.CrossBoundaryEnvelope) -> boundary_pb2.CrossBoundaryEnvelope | None:
        """The whole message once `part` completes it, else None. ValueError on a slice out of order."""
        tensor = _find_tensor(getattr(part, part.WhichOneof("body")))
        if tensor is None or tensor.total_numel == 0:
            if self._parts:
                raise ValueError("an unsliced message arrived in the middle of a sliced one")
            return part
        expected = sum(_find_tensor(p).numel for p in self._parts)
        if tensor.offset != expected:
            raise ValueError(f"slice at element {tensor.offset}, expected {expected}")
        self._parts.append(part)
        if tensor.offset + tensor.numel < tensor.total_numel:
            return None
        whole = boundary_pb2.CrossBoundaryEnvelope()
        whole.CopyFrom(self._parts[0])
        whole_tensor = _find_tensor(whole)
        whole_tensor.data = b"".join(_find_tensor(p).data for p in self._parts)
        whole_tensor.numel, whole_tensor.offset, whole_tensor.total_numel = tensor.total_numel, 0, 0
        self._parts = []
        return whole
