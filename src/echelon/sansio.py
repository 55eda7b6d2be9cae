"""Sans-IO vocabulary shared by the planes and secure aggregation.

A protocol object takes events (a message received, a timer fired, a local round finished),
each stamped with the caller's notion of `now` in seconds, and returns a list of actions.
It never touches sockets, clocks or threads: the simulation driver and the gRPC driver
execute the very same actions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from google.protobuf.message import Message

Data = bytes | memoryview | None  # a tensor's data held apart from its message (`Send.data`), or none


@dataclass(frozen=True, slots=True)
class Send:
    """Deliver `message` to the peer at address `to` (the driver serialises it).

    `data`: the data of `message`'s one tensor, held apart from it (the tensor holds none), so a
    large tensor is never copied into a message and out again; the driver passes it beside the
    message, and the receiving plane is given it beside the message too (`receive(..., data)`).
    """

    to: str
    message: Message
    data: Data = None


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Fire `key` back into the protocol at absolute time `at` (seconds); replaces a pending `key`."""

    key: str
    at: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    """Forget the pending timer `key`, if any."""

    key: str


Action = Send | SetTimer | CancelTimer


@dataclass(frozen=True, slots=True)
class Emit:
    """A telemetry record (`kind` plus JSON-able fields) for the driver to write to metrics."""

    kind: str
    fields: dict


PlaneAction = Action | Emit


@dataclass(frozen=True)
class LocalResult:
    """The event a driver gives a device plane when a local round ends (`local_round_finished`):
    the device's parameters after the round, the tokens it trained on, its mean task loss."""

    theta: torch.Tensor
    tokens: int
    loss: float
