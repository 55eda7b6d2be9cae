"""The device plane: one device's protocol inside its boundary (sans-IO).

A device trains against the boundary reference it was last sent, clips its delta and announces
it (`UpdateReady`: metadata only). The delta stays on the device until the boundary invites it
into an aggregation round; then the aggregator's client pre-scales it by the staleness weight
the boundary assigned and submits it (masked, with secure aggregation).

Alignment gating (paper Proposition 1, optional): the device estimates the boundary's direction
from the references it is sent, as an EMA (decay 0.9) of the movement between consecutive
references (theta_b's recent direction, smoothed so one noisy step does not set it), and
announces its delta only when cos(delta_i, direction) >= the gate; otherwise it discards the
delta and trains again. The gate runs on the device, so secure aggregation is untouched; the
coordinator learns only that no update came.

Events: start, receive(message), local_round_finished(result). Actions: Send, StartLocalRound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from google.protobuf.message import Message

from echelon.planes.aggregation import AggregationClient, Aggregator
from echelon.sansio import Emit, LocalResult, PlaneAction, Send
from echelon.tensors import float_problem, to_tensor
from echelon.v1 import device_pb2, tensor_pb2

DIRECTION_EMA = 0.9  # decay of the boundary-direction estimate of alignment gating


@dataclass(frozen=True, slots=True)
class StartLocalRound:
    """Run K inner steps from `reference` towards `anchor`, then report `local_round_finished`."""

    device: str
    reference: torch.Tensor
    anchor: torch.Tensor


def clip_delta(delta: torch.Tensor, clip: float | None, model_dim: int | None = None) -> torch.Tensor:
    """delta * min(1, C / ||delta||_2); unchanged when clipping is off or the norm is within C.

    With `model_dim`, only the model part delta[:model_dim] is clipped (the rest is strategy
    state, such as SCAFFOLD's control variates).
    """
    if clip is None:
        return delta
    head = delta if model_dim is None else delta[:model_dim]
    norm = float(torch.linalg.vector_norm(head))
    if norm <= clip:
        return delta
    if model_dim is None:
        return delta * (clip / norm)
    return torch.cat([head * (clip / norm), delta[model_dim:]])


class DevicePlane:
    """Protocol state of one device. `boundary` is its coordinator's address."""

    def __init__(
        self,
        device_id: str,
        boundary: str,
        aggregator: Aggregator,
        clip: float | None,
        reference_ema: float | None,
        model_dim: int | None = None,
        alignment_gate: float | None = None,
    ) -> None:
        """`model_dim`: length of the model part of the exchanged state (None: all of it).
        `alignment_gate`: the least cos(delta_i, boundary direction) an announced delta has."""
        self.device_id, self.boundary = device_id, boundary
        self._aggregator, self._clip, self._reference_ema = aggregator, clip, reference_ema
        self._model_dim = model_dim
        self._gate = alignment_gate
        self._direction: torch.Tensor | None = None  # EMA of the boundary's movement, as seen here
        self.reference: torch.Tensor | None = None
        self.version = 0
        self._anchor: torch.Tensor | None = None
        self.training = False
        self.pending: torch.Tensor | None = None  # the clipped delta awaiting aggregation
        self._client: AggregationClient | None = None
        self._client_round: int | None = None
        self.local_rounds = 0
        self.left = False  # it said goodbye: it takes part no more

    def start(self, now: float) -> list[PlaneAction]:
        """(Re)join the boundary: ask for the current reference. A rejoining device starts clean."""
        self.training, self.pending, self._client, self._client_round = False, None, None, None
        return [Send(self.boundary, device_pb2.Hello(device_id=self.device_id))]

    def leave(self, now: float) -> list[PlaneAction]:
        """Leave the run for good: tell the boundary; whatever was pending is dropped."""
        self.training, self.pending, self._client, self._client_round = False, None, None, None
        self.left = True
        return [Send(self.boundary, device_pb2.Goodbye(device_id=self.device_id))]

    def receive(self, now: float, sender: str, message: Message) -> list[PlaneAction]:
        """A message from the boundary coordinator (`sender` is its address)."""
        if self.left:
            return []
        reason = self._refusal(sender, message)
        if reason is not None:
            fields = {
                "device": self.device_id,
                "message_type": message.DESCRIPTOR.full_name,
                "reason": reason,
            }
            return [Emit("refused", fields)]
        if isinstance(message, device_pb2.BoundaryReference):
            reference = to_tensor(message.parameters)
            if self.reference is not None and message.version != self.version:
                step = reference - self.reference
                ema = DIRECTION_EMA
                self._direction = (
                    step if self._direction is None else ema * self._direction + (1 - ema) * step
                )
            self.reference = reference
            self.version = message.version
            if self._reference_ema is None or self._anchor is None:
                self._anchor = self.reference
            else:
                self._anchor = self._reference_ema * self._anchor + (1 - self._reference_ema) * self.reference
            return self._maybe_train()
        if isinstance(message, device_pb2.AggregationRequest):
            if self.pending is None or self._client_round == message.round_id:
                return []  # nothing to contribute (e.g. lost with a restart), or a replayed request
            self._client = self._aggregator.join(
                self.boundary, message, self.pending.numpy(), tensor_pb2.DEVICE
            )
            self._client_round = message.round_id
            return self._after_client(self._client.start(now))
        if isinstance(message, device_pb2.UpdateDiscarded):
            self.pending, self._client = None, None
            return []
        if self._client is not None:
            return self._after_client(self._client.receive(now, message))
        return []

    def _refusal(self, sender: str, message: Message) -> str | None:
        """Why a received message cannot be used (checked before any use), or None."""
        if sender != self.boundary:
            return f"a message from {sender}, not from this device's boundary"
        if isinstance(message, device_pb2.BoundaryReference):
            # The exchanged state's length is the first reference's (the model part, at least).
            numel = self.reference.numel() if self.reference is not None else message.parameters.numel
            if self._model_dim is not None and numel < self._model_dim:
                return f"a reference of {numel} elements for a model of {self._model_dim}"
            return float_problem(message.parameters, numel)
        return None

    def _after_client(self, actions: list[PlaneAction]) -> list[PlaneAction]:
        if self._client is not None and self._client.done:
            # Submitted: the delta now lives only inside the aggregate.
            self.pending, self._client = None, None
        return list(actions)

    def local_round_finished(self, now: float, result: LocalResult) -> list[PlaneAction]:
        """The driver finished the local round: clip the delta and announce it."""
        assert self.reference is not None
        self.training = False
        self.local_rounds += 1
        self.pending = clip_delta(result.theta - self.reference, self._clip, self._model_dim)
        if self._gate is not None and self._direction is not None:
            alignment = self._alignment(self.pending)
            accepted = alignment >= self._gate
            gate = Emit("alignment_gate", {"alignment": alignment, "accepted": accepted})
            if not accepted:
                self.pending = None
                return [gate, *self._maybe_train()]
            return [gate, *self._announce(result)]
        return self._announce(result)

    def _alignment(self, delta: torch.Tensor) -> float:
        """cos(delta_i, direction) over the model part (0 when either is zero)."""
        a, b = delta[: self._model_dim], self._direction[: self._model_dim]
        norms = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
        return float(torch.dot(a, b)) / norms if norms > 0 else 0.0

    def _announce(self, result: LocalResult) -> list[PlaneAction]:
        ready = device_pb2.UpdateReady(
            base_version=self.version,
            tokens=result.tokens,
            train_loss=result.loss,
            local_round=self.local_rounds,
        )
        return [Send(self.boundary, ready)]

    def _maybe_train(self) -> list[PlaneAction]:
        if self.training or self.pending is not None or self.reference is None:
            return []
        self.training = True
        return [StartLocalRound(self.device_id, self.reference, self._anchor)]
