"""Typed slicing of large cross-boundary messages, with a tensor's data held apart from its message.

A message whose tensor (at any depth) holds more than `MAX_SLICE_BYTES` of data travels as
several envelopes of the same type, each a valid message on its own whose tensor holds one slice
(`offset`, `total_numel`). No untyped frame ever crosses: every slice passes the same checks.
Both runtimes use these slices, so simulated and deployed byte counts agree.

The protobuf runtime (upb) copies a bytes field whenever it is read, set, copied with its message
or serialised, and on a loaded machine each copy of a 100 MB tensor costs about 0.1 s. So the
guards hold a tensor's data apart from its message, and copy it at most once per side:

- `hold_apart` copies a body without its tensor's data, which it reads once;
- `encode_around` gives the canonical encoding of a message around a hole where that data goes
  (prefix + data + suffix is exactly what `SerializeToString` would write);
- `frames` lays out the frames (the envelope, or its slices) as such prefixes and suffixes around
  slices of the data: their SHA-256 is taken over the pieces, and each frame is built (the one
  copy) only when it is taken, so a transport sends frame k while frame k+1 is built.

`Reassembler` joins the slices only when every slice is the same message (all fields but the
slice's data, numel and offset equal), in order, and the whole fits its byte cap: a slice of
another type, a reordered slice or a claimed whole beyond the cap is refused before anything is
buffered. The ingress guard drops a sliced message whose next slice is REASSEMBLY_IDLE_S late.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf import unknown_fields
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from echelon.contract.rules import tensors
from echelon.tensors import ITEMSIZE
from echelon.v1 import boundary_pb2, tensor_pb2

MAX_SLICE_BYTES = 1 << 20
REASSEMBLY_IDLE_S = 600.0  # a sliced message whose next slice has not come for this long is dropped
DATA = "data"  # the bytes field of a TensorPayload
MAX_FIELD = 1 << 29  # field numbers lie below

FieldPath = tuple[str, ...]  # field names from a message down to its tensor's `data` (empty: no tensor)


def at(msg: Message, path: FieldPath) -> Message:
    """The message at `path` (field names) below `msg`."""
    for name in path:
        msg = getattr(msg, name)
    return msg


def data_path(tensor_path: str) -> FieldPath:
    """The field path of a tensor's data from its `tensors()` path; ValueError for a tensor in a
    repeated field (the schema declares none, so no message can carry one)."""
    if "[" in tensor_path:
        raise ValueError(f"{tensor_path}: a tensor in a repeated field cannot be held apart")
    return (*tensor_path.split("."), DATA)


def _copy_field(dst: Message, field: FieldDescriptor, value: object) -> None:
    if field.is_repeated:  # repeated scalars, messages and maps alike
        getattr(dst, field.name).MergeFrom(value)
    elif field.message_type is not None:
        getattr(dst, field.name).CopyFrom(value)
        getattr(dst, field.name).SetInParent()  # present even when empty, as in `value`'s parent
    else:
        setattr(dst, field.name, value)


def _copy(src: Message, dst: Message, numbers: range) -> None:
    """Copy the fields of `src` numbered in `numbers` into `dst`, reading no other field (a read
    of a bytes field copies it); unknown fields stay behind."""
    for field in src.DESCRIPTOR.fields:
        if field.number in numbers and not (field.has_presence and not src.HasField(field.name)):
            _copy_field(dst, field, getattr(src, field.name))


def _copy_except(src: Message, dst: Message, path: FieldPath) -> None:
    """Copy `src` into the empty `dst`, all but the last field of `path` (and what is below it)."""
    number = src.DESCRIPTOR.fields_by_name[path[0]].number
    _copy(src, dst, range(number))
    _copy(src, dst, range(number + 1, MAX_FIELD))
    if len(path) > 1 and src.HasField(path[0]):
        child = getattr(dst, path[0])
        child.SetInParent()
        _copy_except(getattr(src, path[0]), child, path[1:])


def _unknown(msg: Message) -> bool:
    return len(unknown_fields.UnknownFieldSet(msg)) > 0


def hold_apart(src: Message, dst: Message) -> tuple[FieldPath, bytes]:
    """Copy `src` into the empty `dst` (same type) but for its first tensor's data, read once;
    returns that data's field path and the data. Without a tensor, or with unknown fields along its
    path (which the schema refuses anyway), a plain copy, `()` and no data."""
    found = tensors(src)
    if not found:
        dst.CopyFrom(src)
        return (), b""
    path = data_path(found[0][0])
    if any(_unknown(at(src, path[:i])) for i in range(len(path))):
        dst.CopyFrom(src)
        return (), b""
    _copy_except(src, dst, path)
    return path, found[0][1].data


def take_data(
    frame: bytes,
    envelope: boundary_pb2.CrossBoundaryEnvelope,
    found: list[tuple[str, tensor_pb2.TensorPayload]],
) -> tuple[FieldPath, bytes | memoryview, bool]:
    """Move the data of the first of `found` (the `tensors()` of `envelope`, parsed from `frame`)
    out of `envelope`: its field path (`()` without a tensor), the data, and whether `frame` is
    the canonical encoding of `envelope` (the very bytes `SerializeToString` writes for it).

    When `frame` is the canonical encoding of `envelope` with data of the length its numel says,
    the data is where that encoding puts it in `frame`, taken without a copy: the frame is then
    the encoding of the message with those bytes as data, and a frame parses to one message only.
    Otherwise the data is read (copied) from a second parse, for the checks to say what is wrong.
    """
    if not found:
        return (), b"", envelope.SerializeToString() == frame
    path, tensor = data_path(found[0][0]), found[0][1]
    n = tensor.numel * ITEMSIZE.get(tensor.dtype, 0)
    tensor.ClearField(DATA)
    if n:
        try:
            prefix, suffix = encode_around(envelope, path, n)
        except ValueError:  # unknown fields: the checks refuse them
            prefix, suffix = b"", b""
        if (
            prefix
            and len(frame) == len(prefix) + n + len(suffix)
            and frame.startswith(prefix)
            and frame.endswith(suffix)
        ):
            return path, memoryview(frame)[len(prefix) : len(prefix) + n], True
    data = tensors(boundary_pb2.CrossBoundaryEnvelope.FromString(frame))[0][1].data
    try:
        prefix, suffix = encode_around(envelope, path, len(data))
    except ValueError:  # unknown fields: the checks refuse them before asking
        return path, data, False
    return path, data, frame == b"".join((prefix, data, suffix))


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _only(msg: Message, keep: range) -> bytes:
    """The encoding of `msg` with only its fields numbered in `keep` (and no unknown fields)."""
    part = type(msg)()
    _copy(msg, part, keep)
    return part.SerializeToString()


def encode_around(msg: Message, path: FieldPath, n: int) -> tuple[bytes, bytes]:
    """(prefix, suffix): `prefix + data + suffix` is the canonical encoding (`SerializeToString`)
    of `msg` once the bytes field at `path` holds the `n` bytes `data` (whatever it holds now).

    upb writes a message's known fields in field-number order (then its unknown fields, which
    messages along `path` may not have: ValueError), so a message's encoding is that of its fields
    before the one on `path`, that field's key, length and value, then the fields after it.
    tests/contract/test_slicing.py holds this against upb's own serialisation.
    """
    if n == 0:  # proto3 writes no empty bytes field
        return msg.SerializeToString(), b""
    if _unknown(msg):
        raise ValueError(f"{msg.DESCRIPTOR.full_name} holds unknown fields")
    field = msg.DESCRIPTOR.fields_by_name[path[0]]
    inner = encode_around(getattr(msg, path[0]), path[1:], n) if len(path) > 1 else (b"", b"")
    head = _only(msg, range(field.number)) + _varint(field.number << 3 | 2)
    size = len(inner[0]) + n + len(inner[1])
    return head + _varint(size) + inner[0], inner[1] + _only(msg, range(field.number + 1, MAX_FIELD))


@dataclass
class Frames(Sequence[bytes]):
    """The frames of one outgoing envelope, each `prefix + data[start:stop] + suffix`; a frame is
    built (its data copied once) only when it is taken (`frames[k]`, or iterating)."""

    data: memoryview
    layout: list[tuple[bytes, int, int, bytes]]

    def __len__(self) -> int:
        return len(self.layout)

    def __getitem__(self, k: int) -> bytes:
        prefix, start, stop, suffix = self.layout[k]
        return b"".join((prefix, self.data[start:stop], suffix))

    @property
    def nbytes(self) -> int:
        """Bytes on the wire, all frames."""
        return sum(len(p) + stop - start + len(s) for p, start, stop, s in self.layout)

    def sizes(self) -> list[int]:
        """Bytes on the wire, frame by frame."""
        return [len(p) + stop - start + len(s) for p, start, stop, s in self.layout]

    def sha256(self) -> str:
        """SHA-256 of the frames one after the other, over the pieces (no frame is built)."""
        digest = hashlib.sha256()
        for prefix, start, stop, suffix in self.layout:
            digest.update(prefix)
            digest.update(self.data[start:stop])  # hashlib releases the GIL on large buffers
            digest.update(suffix)
        return digest.hexdigest()


def whole(envelope: boundary_pb2.CrossBoundaryEnvelope, path: FieldPath, data: bytes) -> Frames:
    """`envelope` (its data `data` held apart at `path`) as one frame."""
    prefix, suffix = encode_around(envelope, path, len(data)) if path else (envelope.SerializeToString(), b"")
    return Frames(memoryview(data), [(prefix, 0, len(data), suffix)])


def slice_envelope(envelope: boundary_pb2.CrossBoundaryEnvelope, path: FieldPath, data: bytes) -> Frames:
    """`envelope` (its tensor's `data` held apart at `path`, consistent with its numel: checked),
    as one frame, or as typed slices when the data exceeds MAX_SLICE_BYTES."""
    if len(data) <= MAX_SLICE_BYTES:
        return whole(envelope, path, data)
    part = boundary_pb2.CrossBoundaryEnvelope()
    part.CopyFrom(envelope)  # holds no data: cheap
    tensor = at(part, path[:-1])
    numel, itemsize = tensor.numel, ITEMSIZE[tensor.dtype]
    per_slice = MAX_SLICE_BYTES // itemsize
    layout = []
    for start in range(0, numel, per_slice):
        count = min(per_slice, numel - start)
        tensor.numel, tensor.offset, tensor.total_numel = count, start, numel
        prefix, suffix = encode_around(part, path, count * itemsize)
        layout.append((prefix, start * itemsize, (start + count) * itemsize, suffix))
    return Frames(memoryview(data), layout)


class Reassembler:
    """Joins the slices of one message, in order; a message without slices completes at once.

    `max_bytes` caps the data of the whole tensor a first slice may announce. Each slice's data
    is appended, as it arrives, to the whole message's encoding, which is parsed once when the
    last slice has come (reading or setting a bytes field would copy it again).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._template: boundary_pb2.CrossBoundaryEnvelope | None = None  # the first slice, data cut
        self._path = ""
        self._whole = bytearray()  # the encoding of the whole message so far
        self._suffix = b""  # and what follows its data
        self._next = 0  # element offset the next slice must start at

    @property
    def first(self) -> boundary_pb2.CrossBoundaryEnvelope | None:
        """The first slice of the message being reassembled (without its data), or None."""
        return self._template

    def add(
        self, part: boundary_pb2.CrossBoundaryEnvelope, data: bytes | memoryview
    ) -> boundary_pb2.CrossBoundaryEnvelope | None:
        """The whole message once `part` completes it, else None. `part`'s first tensor holds no
        data: `data` is it (`take_data`). ValueError (and the partial message dropped) on a slice
        of another message, out of order, beyond the cap, or with data other than its numel says."""
        found = tensors(part)
        if not found or found[0][1].total_numel == 0:
            if self._template is not None:
                self._reset()
                raise ValueError("an unsliced message arrived in the middle of a sliced one")
            if found and data:
                found[0][1].data = bytes(data)  # at most one frame's bytes
            return part
        path, tensor = found[0]
        total, numel, offset = tensor.total_numel, tensor.numel, tensor.offset
        tensor.numel = tensor.offset = 0
        if self._template is None:
            whole_bytes = total * ITEMSIZE.get(tensor.dtype, 0)
            if offset != 0 or not 0 < whole_bytes <= self.max_bytes:
                raise ValueError(
                    f"a first slice at element {offset} of a whole of {whole_bytes} B (at most {self.max_bytes} B)"
                )
        elif path != self._path or part != self._template:
            self._reset()
            raise ValueError("a slice of another message arrived in the middle of a sliced one")
        elif offset != self._next:
            expected = self._next
            self._reset()
            raise ValueError(f"slice at element {offset}, expected {expected}")
        itemsize = ITEMSIZE[tensor.dtype]
        if numel != min(MAX_SLICE_BYTES // itemsize, total - offset) or len(data) != numel * itemsize:
            self._reset()
            raise ValueError(
                f"a slice of {numel} elements ({len(data)} B) at {offset}: slices are cut at {MAX_SLICE_BYTES} B"
            )
        if self._template is None:
            self._start(part, path, total, itemsize)
        self._whole += data
        self._next = offset + numel
        if self._next < total:
            return None
        self._whole += self._suffix
        whole = boundary_pb2.CrossBoundaryEnvelope.FromString(self._whole)
        self._reset()
        return whole

    def _start(self, first: boundary_pb2.CrossBoundaryEnvelope, path: str, total: int, itemsize: int) -> None:
        """Lay out the whole message of which `first` (its data cut) is the first slice."""
        self._template, self._path = first, path
        whole = boundary_pb2.CrossBoundaryEnvelope()
        whole.CopyFrom(first)
        tensor = at(whole, data_path(path)[:-1])
        tensor.numel, tensor.total_numel = total, 0
        prefix, self._suffix = encode_around(whole, data_path(path), total * itemsize)
        self._whole = bytearray(prefix)

    def _reset(self) -> None:
        self._template, self._path, self._whole, self._suffix, self._next = None, "", bytearray(), b"", 0
