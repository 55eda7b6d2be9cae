"""Typed slicing of large cross-boundary messages, with a tensor's data held apart from its message.

A message whose tensor (at any depth) holds more than `MAX_SLICE_BYTES` of data travels as
several envelopes of the same type, each a valid message on its own whose tensor holds one slice
(`offset`, `total_numel`). No untyped frame ever crosses: a first slice passes every check, and
each later one either is byte for byte the next slice of that message (`Reassembler.next_slice`:
it then differs from the checked first only in its data, numel and offset) or passes them too.
Both runtimes use these slices, so simulated and deployed byte counts agree.

The protobuf runtime (upb) copies a bytes field whenever it is read, set, copied with its message
or serialised, and on a loaded machine each copy of a 100 MB tensor costs about 0.1 s. So the
guards hold a tensor's data apart from its message, and copy it at most once per side:

- `hold_apart` copies a body without its tensor's data, which it reads once;
- `encode_around` gives the canonical encoding of a message around a hole where that data goes
  (prefix + data + suffix is exactly what `SerializeToString` would write);
- `slice_envelope` lays out the frames (the envelope, or its slices) as such prefixes and
  suffixes around slices of the data: their `WireDigest` is taken over the pieces and the data's
  own SHA-256, and each frame is built (the one copy) only when it is taken, so a transport sends
  frame k while frame k+1 is built.

`Reassembler` joins the slices only when every slice is the same message (all fields but the
slice's data, numel and offset equal), in order, and the whole fits its byte cap: a slice of
another type, a reordered slice or a claimed whole beyond the cap is refused before anything is
buffered. The ingress guard drops a sliced message whose next slice is REASSEMBLY_IDLE_S late.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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


def hold_apart(src: Message, dst: Message, data: bytes | memoryview | None = None) -> tuple[FieldPath, bytes]:
    """Copy `src` into the empty `dst` (same type) but for its first tensor's data, read once;
    returns that data's field path and the data. Without a tensor, or with unknown fields along its
    path (which the schema refuses anyway), a plain copy, `()` and no data.

    `data`: the tensor's data, held apart by the caller (`src`'s tensor holds none); ValueError
    when `src` has no tensor to hold it or its tensor holds data too.
    """
    found = tensors(src)
    if data is not None:
        if not found:
            raise ValueError(f"{len(data)} B of tensor data beside a message that holds no tensor")
        if found[0][1].data:
            raise ValueError(f"{found[0][0]} holds data of its own beside the {len(data)} B held apart")
        dst.CopyFrom(src)  # holds no data: cheap
        return data_path(found[0][0]), data
    if not found:
        dst.CopyFrom(src)
        return (), b""
    path = data_path(found[0][0])
    if any(_unknown(at(src, path[:i])) for i in range(len(path))):
        dst.CopyFrom(src)
        return (), b""
    _copy_except(src, dst, path)
    return path, found[0][1].data


Split = tuple[int, int]  # [start, stop) of a tensor's data in the frame that encodes it


def take_data(
    frame: bytes,
    envelope: boundary_pb2.CrossBoundaryEnvelope,
    found: list[tuple[str, tensor_pb2.TensorPayload]],
) -> tuple[FieldPath, bytes | memoryview, Split | None]:
    """Move the data of the first of `found` (the `tensors()` of `envelope`, parsed from `frame`)
    out of `envelope`: its field path (`()` without a tensor), the data, and where it lies in
    `frame` when `frame` is the canonical encoding of `envelope` (the very bytes
    `SerializeToString` writes for it), else None.

    When `frame` is the canonical encoding of `envelope` with data of the length its numel says,
    the data is where that encoding puts it in `frame`, taken without a copy: the frame is then
    the encoding of the message with those bytes as data, and a frame parses to one message only.
    Otherwise the data is read (copied) from a second parse, for the checks to say what is wrong.
    """
    if not found:
        return (), b"", (len(frame), len(frame)) if envelope.SerializeToString() == frame else None
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
            split = len(prefix), len(prefix) + n
            return path, memoryview(frame)[split[0] : split[1]], split
    data = tensors(boundary_pb2.CrossBoundaryEnvelope.FromString(frame))[0][1].data
    try:
        prefix, suffix = encode_around(envelope, path, len(data))
    except ValueError:  # unknown fields: the checks refuse them before asking
        return path, data, None
    canonical = frame == b"".join((prefix, data, suffix))
    return path, data, (len(prefix), len(prefix) + len(data)) if canonical else None


BACKGROUND_HASH_BYTES = 1 << 16  # a frame's data at least this long is hashed on the hasher thread


@functools.cache
def _hasher() -> ThreadPoolExecutor:
    """The one thread that hashes received data: one worker, so every digest's updates run in order."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="echelon-wire-digest")


# A forked child has no hasher thread (only its parent's record of one): it starts its own.
os.register_at_fork(after_in_child=_hasher.cache_clear)


class WireDigest:
    """The digest an audit record carries of a message's frames (`payload_sha256`, format 2).

    Each frame is split into prefix | data | suffix, its data being the slice of the tensor's data
    it carries (empty when it carries none, or could not be parsed as a canonical encoding). The
    digest is SHA-256 over a tag, every frame's three lengths, prefix and suffix, in order, and then
    the SHA-256 of all the frames' data one after another. It fixes every byte of every frame, and
    the data's own SHA-256 can be taken once, when an aggregate is minted
    (`echelon.contract.provenance.Ledger`), instead of on every send.
    """

    TAG = b"echelon/wire/v2"

    def __init__(self) -> None:
        self._frames = hashlib.sha256(self.TAG)
        self._data = hashlib.sha256()
        self._hashing: Future | None = None  # the last of `_data`'s updates given to the hasher
        self.nbytes = 0

    def frame(self, prefix: bytes | memoryview, ndata: int, suffix: bytes | memoryview) -> None:
        """Take one frame's prefix, data length and suffix (its data goes to `data`, or is known)."""
        self._frames.update(b"".join(n.to_bytes(8, "little") for n in (len(prefix), ndata, len(suffix))))
        self._frames.update(prefix)
        self._frames.update(suffix)
        self.nbytes += len(prefix) + ndata + len(suffix)

    def data(self, data: bytes | memoryview) -> None:
        """Take a frame's data (in order; it must not change until `hexdigest`). A large slice is
        hashed on the hasher thread (hashlib releases the GIL), so a receiver hashes one slice
        while the next arrives instead of after it; `hexdigest` waits for the last one."""
        if len(data) >= BACKGROUND_HASH_BYTES:
            self._hashing = _hasher().submit(self._data.update, data)  # one thread: in order
        elif data:
            self._wait()
            self._data.update(data)

    def _wait(self) -> None:
        if self._hashing is not None:
            self._hashing.result()
            self._hashing = None

    def split(self, frame: bytes, split: Split | None) -> None:
        """Take a whole received frame, its data at `split` (None: it carries none)."""
        start, stop = split if split is not None else (len(frame), len(frame))
        view = memoryview(frame)
        self.frame(view[:start], stop - start, view[stop:])
        self.data(view[start:stop])

    def hexdigest(self, data_digest: bytes | None = None) -> str:
        """The digest; `data_digest`: the SHA-256 of all the data, when known (none was taken)."""
        self._wait()
        final = self._frames.copy()
        final.update(self._data.digest() if data_digest is None else data_digest)
        return final.hexdigest()


def wire_digest(frames: Sequence[bytes]) -> str:
    """`WireDigest` of received frames, each split as an ingress guard splits it."""
    digest = WireDigest()
    for frame in frames:
        split = None
        try:
            envelope = boundary_pb2.CrossBoundaryEnvelope.FromString(frame)
            split = take_data(frame, envelope, tensors(envelope))[2]
        except Exception:  # undecodable, or unknown enum values: a frame without data
            pass
        digest.split(frame, split)
    return digest.hexdigest()


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


Layer = tuple[bytes, bytes]  # a message's fields before the one on a path, with its key; those after


def layers(msg: Message, path: FieldPath) -> list[Layer]:
    """`msg`'s layers along `path` down to the bytes field at its end, outermost first: for each
    message on the way, the encoding of its fields before the field on `path` with that field's
    key, and of its fields after it. ValueError when a message along `path` holds unknown fields.
    upb writes a message's known fields in field-number order (then its unknown fields, which
    messages along `path` may not have), so a message's encoding is its fields before the one on
    `path`, that field's key, length and value, then the fields after it."""
    out = []
    for i, name in enumerate(path):
        if _unknown(msg):
            raise ValueError(f"{msg.DESCRIPTOR.full_name} holds unknown fields")
        number = msg.DESCRIPTOR.fields_by_name[name].number
        out.append(
            (_only(msg, range(number)) + _varint(number << 3 | 2), _only(msg, range(number + 1, MAX_FIELD)))
        )
        if i < len(path) - 1:
            msg = getattr(msg, name)
    return out


def wrap(layers: Sequence[Layer], n: int) -> tuple[bytes, bytes]:
    """(prefix, suffix) of `n` bytes of data inside `layers` (`layers`), outermost first."""
    prefix, suffix, size = b"", b"", n
    for head, tail in reversed(layers):
        prefix, suffix = head + _varint(size) + prefix, suffix + tail
        size = len(prefix) + n + len(suffix)
    return prefix, suffix


def encode_around(msg: Message, path: FieldPath, n: int) -> tuple[bytes, bytes]:
    """(prefix, suffix): `prefix + data + suffix` is the canonical encoding (`SerializeToString`)
    of `msg` once the bytes field at `path` holds the `n` bytes `data` (whatever it holds now);
    ValueError when a message along `path` holds unknown fields (`layers`).
    tests/contract/test_slicing.py holds this against upb's own serialisation.
    """
    if n == 0:  # proto3 writes no empty bytes field
        return msg.SerializeToString(), b""
    return wrap(layers(msg, path), n)


def _sliced(outer: list[Layer], tensor: tensor_pb2.TensorPayload, n: int) -> tuple[bytes, bytes]:
    """`encode_around` of one slice, `n` bytes of data in `tensor` (its numel and offset set), the
    layers around the tensor (`outer`) being the same for every slice of a message."""
    return wrap([*outer, *layers(tensor, (DATA,))], n)


@dataclass
class Frames(Sequence[bytes]):
    """The frames of one outgoing envelope, each `prefix + data[start:stop] + suffix`; a frame is
    built (its data copied once) only when it is taken (`frames[k]`, or iterating). `data_digest`:
    the SHA-256 of `data`."""

    data: memoryview
    layout: list[tuple[bytes, int, int, bytes]]
    data_digest: bytes

    def __len__(self) -> int:
        return len(self.layout)

    def __getitem__(self, k: int) -> bytes:
        prefix, start, stop, suffix = self.layout[k]
        return b"".join((prefix, self.data[start:stop], suffix))

    @property
    def nbytes(self) -> int:
        """Bytes on the wire, all frames."""
        return sum(self.sizes())

    def sizes(self) -> list[int]:
        """Bytes on the wire, frame by frame."""
        return [len(p) + stop - start + len(s) for p, start, stop, s in self.layout]

    def digest(self) -> str:
        """`WireDigest` of the frames, without a pass over the data (its digest is known)."""
        digest = WireDigest()
        for prefix, start, stop, suffix in self.layout:
            digest.frame(prefix, stop - start, suffix)
        return digest.hexdigest(self.data_digest)


def whole(
    envelope: boundary_pb2.CrossBoundaryEnvelope, path: FieldPath, data: bytes, data_digest: bytes
) -> Frames:
    """`envelope` (its data `data`, of SHA-256 `data_digest`, held apart at `path`) as one frame."""
    prefix, suffix = encode_around(envelope, path, len(data)) if path else (envelope.SerializeToString(), b"")
    return Frames(memoryview(data), [(prefix, 0, len(data), suffix)], data_digest)


def slice_envelope(
    envelope: boundary_pb2.CrossBoundaryEnvelope, path: FieldPath, data: bytes, data_digest: bytes
) -> Frames:
    """`envelope` (its tensor's `data`, of SHA-256 `data_digest`, held apart at `path`, consistent
    with its numel: checked), as one frame, or as typed slices when the data exceeds MAX_SLICE_BYTES."""
    if len(data) <= MAX_SLICE_BYTES:
        return whole(envelope, path, data, data_digest)
    part = boundary_pb2.CrossBoundaryEnvelope()
    part.CopyFrom(envelope)  # holds no data: cheap
    tensor = at(part, path[:-1])
    numel, itemsize = tensor.numel, ITEMSIZE[tensor.dtype]
    per_slice = MAX_SLICE_BYTES // itemsize
    layout, outer = [], layers(part, path)[:-1]
    for start in range(0, numel, per_slice):
        count = min(per_slice, numel - start)
        tensor.numel, tensor.offset, tensor.total_numel = count, start, numel
        prefix, suffix = _sliced(outer, tensor, count * itemsize)
        layout.append((prefix, start * itemsize, (start + count) * itemsize, suffix))
    return Frames(memoryview(data), layout, data_digest)


def encode_frames(envelope: boundary_pb2.CrossBoundaryEnvelope) -> Frames:
    """`envelope` in the frames a guard sends it in, with no check (for tests and attackers)."""
    dataless = boundary_pb2.CrossBoundaryEnvelope()
    path, data = hold_apart(envelope, dataless)
    return slice_envelope(dataless, path, data, hashlib.sha256(data).digest())


@dataclass
class Whole:
    """A reassembled envelope: `envelope` without its tensor's data, which is `data` (held apart
    at `path`; `()` and no data without a tensor), and the envelope's canonical `encoding` that
    holds it there."""

    envelope: boundary_pb2.CrossBoundaryEnvelope
    path: FieldPath
    data: bytes | memoryview
    encoding: bytes | bytearray

    @property
    def body(self) -> Message:
        """The envelope's body (its tensor, if any, holding no data: that is `data`)."""
        return getattr(self.envelope, self.envelope.WhichOneof("body"))

    def apart(self) -> tuple[Message, bytes | memoryview | None]:
        """(body, data) for a plane: a tensor that is a field of the body itself (a Delta_b, a
        global reference) stays apart, in place; one nested deeper (SecAgg+'s masked input, which
        the aggregation protocol reads from its message) is parsed back in, and data is None."""
        if len(self.path) == 3 or not self.data:  # body field, tensor field, its data
            return self.body, self.data or None
        envelope = self.message()
        return getattr(envelope, envelope.WhichOneof("body")), None

    def message(self) -> boundary_pb2.CrossBoundaryEnvelope:
        """The envelope with its data (parsed once from its encoding: the one copy)."""
        return boundary_pb2.CrossBoundaryEnvelope.FromString(self.encoding) if self.data else self.envelope


class Reassembler:
    """Joins the slices of one message, in order; a message without slices completes at once.

    `max_bytes` caps the data of the whole tensor a first slice may announce. Each slice's data
    is appended, as it arrives, to the whole message's encoding (`Whole`): a receiver takes the
    data from it in place, or parses it once (reading or setting a bytes field would copy it again).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._template: boundary_pb2.CrossBoundaryEnvelope | None = None  # the first slice, data cut
        self._envelope = boundary_pb2.CrossBoundaryEnvelope()  # the whole message, without its data
        self._path = ""
        self._whole = bytearray()  # the encoding of the whole message so far
        self._suffix = b""  # and what follows its data
        self._outer: list[Layer] = []  # the layers around the tensor, the same in every slice
        self._next = 0  # element offset the next slice must start at
        self._itemsize = 1  # of the tensor's dtype

    @property
    def first(self) -> boundary_pb2.CrossBoundaryEnvelope | None:
        """The first slice of the message being reassembled (without its data), or None."""
        return self._template

    def add(
        self, part: boundary_pb2.CrossBoundaryEnvelope, data: bytes | memoryview, frame: bytes
    ) -> Whole | None:
        """The whole message once `part` completes it, else None. `part`'s first tensor holds no
        data: `data` is it (`take_data`), and `frame` is `part`'s canonical encoding holding it.
        ValueError (and the partial message dropped) on a slice of another message, out of order,
        beyond the cap, or with data other than its numel says."""
        found = tensors(part)
        if not found or found[0][1].total_numel == 0:
            if self._template is not None:
                self._reset()
                raise ValueError("an unsliced message arrived in the middle of a sliced one")
            return Whole(part, data_path(found[0][0]) if found else (), data, frame)
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
        return self._append(data, numel)

    def next_slice(self, frame: bytes) -> Split | None:
        """Where the data lies in `frame` when `frame` is, byte for byte, the canonical encoding of
        the next slice of the message being reassembled, else None. Such a frame is that slice
        and no other message (a canonical encoding parses to one message only): it differs from
        the first slice, which passed every check, only in its data, numel and offset, which are
        where they must be. So it needs no parse and no check of its own (`add_next`)."""
        if self._template is None:
            return None
        tensor = at(self._template, data_path(self._path)[:-1])
        count = min(MAX_SLICE_BYTES // self._itemsize, tensor.total_numel - self._next)
        tensor.numel, tensor.offset = count, self._next
        try:
            prefix, suffix = _sliced(self._outer, tensor, count * self._itemsize)
        finally:
            tensor.numel = tensor.offset = 0
        stop = len(prefix) + count * self._itemsize
        if len(frame) == stop + len(suffix) and frame.startswith(prefix) and frame.endswith(suffix):
            return len(prefix), stop
        return None

    def add_next(self, data: bytes | memoryview) -> Whole | None:
        """`add` of the next slice's data, its frame recognised by `next_slice`."""
        return self._append(data, len(data) // self._itemsize)

    def _append(self, data: bytes | memoryview, numel: int) -> Whole | None:
        self._whole += data
        self._next += numel
        total = at(self._envelope, data_path(self._path)[:-1]).numel
        if self._next < total:
            return None
        start = len(self._whole) - total * self._itemsize
        self._whole += self._suffix
        done = Whole(
            self._envelope,
            data_path(self._path),
            memoryview(self._whole)[start : start + total * self._itemsize],
            self._whole,
        )
        self._reset()
        return done

    def _start(self, first: boundary_pb2.CrossBoundaryEnvelope, path: str, total: int, itemsize: int) -> None:
        """Lay out the whole message of which `first` (its data cut) is the first slice."""
        self._template, self._path, self._itemsize = first, path, itemsize
        self._envelope = boundary_pb2.CrossBoundaryEnvelope()
        self._envelope.CopyFrom(first)
        tensor = at(self._envelope, data_path(path)[:-1])
        tensor.numel, tensor.total_numel = total, 0
        prefix, self._suffix = encode_around(self._envelope, data_path(path), total * itemsize)
        self._whole = bytearray(prefix)
        self._outer = layers(first, data_path(path))[:-1]

    def _reset(self) -> None:
        self._template, self._path, self._whole, self._suffix, self._next = None, "", bytearray(), b"", 0
