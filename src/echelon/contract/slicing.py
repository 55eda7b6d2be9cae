"""Typed slicing of large cross-boundary messages.

A message whose tensor (at any depth) holds more than `MAX_SLICE_BYTES` of data travels as
several envelopes of the same type, each a valid message on its own whose tensor holds one slice
(`offset`, `total_numel`). No untyped frame ever crosses: every slice passes the same checks.
Both runtimes use these slices, so simulated and deployed byte counts agree.

`Reassembler` joins them only when every slice is the same message (all fields but the slice's
data, numel and offset equal), in order, and the whole fits its byte cap: a slice of another
type, a reordered slice or a claimed whole beyond the cap is refused before anything is buffered.
The ingress guard drops a sliced message whose next slice is REASSEMBLY_IDLE_S late.
"""

from __future__ import annotations

from google.protobuf.message import Message

from echelon.contract.rules import tensors
from echelon.tensors import ITEMSIZE
from echelon.v1 import boundary_pb2, tensor_pb2

MAX_SLICE_BYTES = 1 << 20
REASSEMBLY_IDLE_S = 600.0  # a sliced message whose next slice has not come for this long is dropped


def _at(msg: Message, path: str) -> tensor_pb2.TensorPayload:
    for name in path.split("."):
        msg = getattr(msg, name)
    return msg  # type: ignore[return-value]


def slice_envelope(envelope: boundary_pb2.CrossBoundaryEnvelope) -> list[boundary_pb2.CrossBoundaryEnvelope]:
    """`envelope` itself, or its slices when its tensor exceeds MAX_SLICE_BYTES."""
    found = tensors(envelope)
    if not found or len(found[0][1].data) <= MAX_SLICE_BYTES:
        return [envelope]
    path, tensor = found[0]
    data, numel = memoryview(tensor.data), tensor.numel  # read once: each read copies the bytes
    itemsize = ITEMSIZE[tensor.dtype]
    per_slice = MAX_SLICE_BYTES // itemsize
    # A template without the data, so each slice copies only the small fields, not the tensor.
    template = boundary_pb2.CrossBoundaryEnvelope()
    template.CopyFrom(envelope)
    _at(template, path).ClearField("data")
    slices = []
    for start in range(0, numel, per_slice):
        count = min(per_slice, numel - start)
        part = boundary_pb2.CrossBoundaryEnvelope()
        part.CopyFrom(template)
        part_tensor = _at(part, path)
        part_tensor.data = bytes(data[start * itemsize : (start + count) * itemsize])
        part_tensor.numel, part_tensor.offset, part_tensor.total_numel = count, start, numel
        slices.append(part)
    return slices


class Reassembler:
    """Joins the slices of one message, in order; a message without slices completes at once.

    `max_bytes` caps the data of the whole tensor a first slice may announce.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._template: boundary_pb2.CrossBoundaryEnvelope | None = None  # the first slice, data cut
        self._path = ""
        self._chunks: list[bytes] = []
        self._next = 0  # element offset the next slice must start at

    @property
    def partial(self) -> bool:
        return self._template is not None

    def add(self, part: boundary_pb2.CrossBoundaryEnvelope) -> boundary_pb2.CrossBoundaryEnvelope | None:
        """The whole message once `part` completes it, else None. ValueError (and the partial
        message dropped) on a slice of another message, out of order, or beyond the cap."""
        found = tensors(part)
        if not found or found[0][1].total_numel == 0:
            if self._template is not None:
                self._reset()
                raise ValueError("an unsliced message arrived in the middle of a sliced one")
            return part
        path, tensor = found[0]
        data, total, numel, offset = tensor.data, tensor.total_numel, tensor.numel, tensor.offset
        tensor.ClearField("data")
        tensor.numel = tensor.offset = 0
        if self._template is None:
            whole_bytes = total * ITEMSIZE.get(tensor.dtype, 0)
            if offset != 0 or not 0 < whole_bytes <= self.max_bytes:
                raise ValueError(
                    f"a first slice at element {offset} of a whole of {whole_bytes} B (at most {self.max_bytes} B)"
                )
            self._template, self._path = part, path
        elif path != self._path or part != self._template:
            self._reset()
            raise ValueError("a slice of another message arrived in the middle of a sliced one")
        elif offset != self._next:
            expected = self._next
            self._reset()
            raise ValueError(f"slice at element {offset}, expected {expected}")
        if numel != min(MAX_SLICE_BYTES // ITEMSIZE[tensor.dtype], total - offset):
            self._reset()
            raise ValueError(
                f"a slice of {numel} elements at {offset}: slices are cut at {MAX_SLICE_BYTES} B"
            )
        self._chunks.append(data)
        self._next = offset + numel
        if self._next < total:
            return None
        whole, chunks = self._template, self._chunks
        self._reset()
        whole_tensor = _at(whole, path)
        whole_tensor.data = b"".join(chunks)
        whole_tensor.numel, whole_tensor.total_numel = total, 0
        return whole

    def _reset(self) -> None:
        self._template, self._path, self._chunks, self._next = None, "", [], 0
