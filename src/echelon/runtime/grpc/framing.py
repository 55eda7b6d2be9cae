"""Framing inside a boundary: a DeviceEnvelope as DeviceChunk stream items (at most MAX_CHUNK bytes
of data each), and their reassembly with a byte cap and an expiry, so no peer can make the
receiver buffer without limit or hold a half-received envelope forever."""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.message import DecodeError, Message

from echelon.v1 import device_pb2, services_pb2
from echelon.wire import wrap_device

MAX_CHUNK = 1 << 20  # bytes of data per stream item
REASSEMBLY_EXPIRY_S = 600.0  # a half-received envelope older than this is dropped


class FrameRefused(ValueError):
    """A received frame that cannot be used; the parts of the envelope it belonged to are dropped."""


def chunk(data: bytes) -> list[tuple[bytes, bool]]:
    """`data` as (chunk, last) pieces of at most MAX_CHUNK bytes."""
    pieces = [data[i : i + MAX_CHUNK] for i in range(0, max(len(data), 1), MAX_CHUNK)]
    return [(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]


def device_frames(device_id: str, body: Message) -> list[bytes]:
    """The stream items carrying `body` between device `device_id` and its boundary."""
    data = wrap_device(device_id, body).SerializeToString()
    return [services_pb2.DeviceChunk(data=c, last=last).SerializeToString() for c, last in chunk(data)]


def envelope_cap(state_dim: int, devices: int) -> int:
    """The largest DeviceEnvelope a boundary and its devices exchange, in bytes: a masked input of
    `state_dim` 64-bit ring elements, plus room for framing and one share per peer."""
    return 8 * state_dim + (1 << 20) + 1024 * devices


class DeviceReassembly:
    """DeviceChunk frames -> whole DeviceEnvelopes, holding at most `max_bytes` of one envelope for
    at most `expiry_s` (by `clock`, seconds)."""

    def __init__(
        self, max_bytes: int, clock: Callable[[], float], expiry_s: float = REASSEMBLY_EXPIRY_S
    ) -> None:
        self.max_bytes, self.expiry_s, self._clock = max_bytes, expiry_s, clock
        self._parts: list[bytes] = []
        self._size = 0
        self._since = 0.0

    def reset(self) -> None:
        """Drop a half-received envelope (its stream ended)."""
        self._parts, self._size = [], 0

    def add(self, frame: bytes) -> device_pb2.DeviceEnvelope | None:
        """The envelope `frame` completes, or None; FrameRefused for an unusable frame or envelope."""
        now = self._clock()
        if self._parts and now - self._since > self.expiry_s:
            self.reset()
            raise FrameRefused(f"an envelope took over {self.expiry_s:g} s to arrive; its parts were dropped")
        try:
            piece = services_pb2.DeviceChunk.FromString(frame)
        except DecodeError as e:
            self.reset()
            raise FrameRefused(f"undecodable chunk ({e})") from None
        if not self._parts:
            self._since = now
        self._size += len(piece.data)
        if self._size > self.max_bytes:
            size = self._size
            self.reset()
            raise FrameRefused(f"an envelope of over {size:,} B exceeds the cap of {self.max_bytes:,} B")
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
