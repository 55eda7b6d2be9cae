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


@dataclass(frozen=True, slots=True)
class Send:
    """Deliver `message` to the peer at address `to` (the driver serialises it)."""

    to: str
    message: Message


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
