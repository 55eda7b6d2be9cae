"""Framing: a DeviceEnvelope as DeviceChunk stream items (at most MAX_CHUNK bytes of data each)
inside a boundary, and the reassembly of any message from a peer's frames (device chunks, or the
guards' typed slices across a boundary) under a byte cap and an expiry, so no peer can make the
receiver buffer without limit or hold a half-received message forever."""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.message import DecodeError, Message

from echelon.v1 import device_pb2, services_pb2
from echelon.wire import wrap_device

MAX_CHUNK = 1 << 20  # bytes of data per stream item
REASSEMBLY_EXPIRY_S = 600.0  # a half-received envelope older than this is dropped


class FrameRefused(ValueError):
    """A received frame that cannot be used; the parts of the message it belonged to are dropped."""


class MessageTooLarge(FrameRefused):
    """A message grew past its byte cap while being reassembled: its stream should end."""


class Reassembly:
    """The bytes and age of one message being reassembled from a peer's frames, kept under
    `max_bytes` and `expiry_s` (by `clock`, seconds)."""

    def __init__(
        self, max_bytes: int, clock: Callable[[], float], expiry_s: float = REASSEMBLY_EXPIRY_S
    ) -> None:
        self.max_bytes, self.expiry_s, self._clock = max_bytes, expiry_s, clock
        self.size = 0
        self._since = 0.0

    def reset(self) -> None:
        """The message completed, or was dropped."""
        self.size = 0

    def take(self, nbytes: int) -> None:
        """Count `nbytes` more of the message; FrameRefused (and a reset) when it took too long,
        MessageTooLarge when it grew past the cap."""
        now = self._clock()
        if self.size and now - self._since > self.expiry_s:
            self.reset()
            raise FrameRefused(f"a message took over {self.expiry_s:g} s to arrive; its parts were dropped")
        if not self.size:
            self._since = now
        self.size += nbytes
        if self.size > self.max_bytes:
            size = self.size
            self.reset()
            raise MessageTooLarge(f"a message of over {size:,} B exceeds the cap of {self.max_bytes:,} B")


def chunk(data: bytes) -> list[tuple[bytes, bool]]:
    """`data` as (chunk, last) pieces of at most MAX_CHUNK bytes."""
    pieces = [data[i : i + MAX_CHUNK] for i in range(0, max(len(data), 1), MAX_CHUNK)]
    return [(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]


def device_frames(device_id: str, body: Message) -> list[bytes]:
    """The stream items carrying `body` between device `device_id` and its boundary."""
    data = wrap_device(device_id, body).SerializeToString()
    return [services_pb2.DeviceChunk(data=c, last=last).SerializeToString() for c, last in chunk(data)]


def envelope_cap(state_dim: int, devices: int) -> int:
    """The largest message two parties exchange, in bytes: a masked input of `state_dim` 64-bit ring
    elements (the largest tensor), plus room for framing and one share per peer."""
    return 8 * state_dim + (1 << 20) + 1024 * devices


class DeviceReassembly:
    """DeviceChunk frames -> whole DeviceEnvelopes, holding at most `max_bytes` of one envelope for
    at most `expiry_s` (by `clock`, seconds)."""

    def __init__(
        self, max_bytes: int, clock: Callable[[], float], expiry_s: float = REASSEMBLY_EXPIRY_S
    ) -> None:
        self._budget = Reassembly(max_bytes, clock, expiry_s)
        self._parts: list[bytes] = []

    def reset(self) -> None:
        """Drop a half-received envelope (its stream ended)."""
        self._parts = []
        self._budget.reset()

    def add(self, frame: bytes) -> device_pb2.DeviceEnvelope | None:
        """The envelope `frame` completes, or None; FrameRefused for an unusable frame or envelope."""
        try:
            piece = services_pb2.DeviceChunk.FromString(frame)
        except DecodeError as e:
            self.reset()
            raise FrameRefused(f"undecodable chunk ({e})") from None
        if not piece.data and not piece.last:  # would be held at no cost to the cap, without end
            self.reset()
            raise FrameRefused("an empty chunk that is not the last: only the last chunk may be empty")
        try:
            self._budget.take(len(piece.data))
        except FrameRefused:
            self._parts = []
            raise
        self._parts.append(piece.data)
        if not piece.last:
            return None
        data = b"".join(self._parts)
        self.reset()
        try:
            envelope = device_pb2.DeviceEnvelope.FromString(data)
        except DecodeError as e:
            raise FrameRefused(f"undecodable envelope ({e})") from None
        if envelope.WhichOneof("body") is None:
            raise FrameRefused("an envelope without a body")
        return envelope
