"""Envelopes: how a plane's message body travels, derived from the proto descriptors.

Planes return bodies (`BoundaryDelta`, `UpdateReady`, ...); drivers wrap them in the envelope
of the channel they travel on. Inside a boundary that is `DeviceEnvelope`; across a boundary it
is `CrossBoundaryEnvelope`, whose `body` oneof is the complete list of what may cross, and which
only the egress guard (`echelon.contract.guard`) builds.
"""

from __future__ import annotations

from google.protobuf.message import Message

from echelon.v1 import boundary_pb2, device_pb2


def _body_fields(envelope: type[Message]) -> dict[str, str]:
    oneof = envelope.DESCRIPTOR.oneofs_by_name["body"]
    return {f.message_type.full_name: f.name for f in oneof.fields}


DEVICE_BODIES = _body_fields(device_pb2.DeviceEnvelope)
CROSS_BOUNDARY_BODIES = _body_fields(boundary_pb2.CrossBoundaryEnvelope)


def wrap_device(device_id: str, body: Message) -> device_pb2.DeviceEnvelope:
    """Envelope for a message between device `device_id` and its boundary coordinator."""
    env = device_pb2.DeviceEnvelope(device_id=device_id)
    try:
        field = DEVICE_BODIES[body.DESCRIPTOR.full_name]
    except KeyError:
        raise TypeError(
            f"{body.DESCRIPTOR.full_name} cannot travel between a device and its boundary"
        ) from None
    getattr(env, field).CopyFrom(body)
    return env


def unwrap(envelope: Message) -> Message:
    """The body an envelope carries; ValueError when it carries none."""
    field = envelope.WhichOneof("body")
    if field is None:
        raise ValueError(f"empty {envelope.DESCRIPTOR.name}")
    return getattr(envelope, field)
