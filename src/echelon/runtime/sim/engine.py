"""The simulation driver: every plane in one process, on a virtual clock.

Device compute is real (the trainer computes gradients) but a local round's duration is taken
from the device's profile (tokens / tokens_per_s, with optional per-round straggling), so
heterogeneous speeds are modelled deterministically. Every message is serialised to protobuf
bytes and parsed back on arrival; cross-boundary messages pass the sender's egress guard and the
receiver's ingress guard, so byte counts are true wire bytes. Churn takes devices offline and
back. The same seed gives the same event order, the same losses and the same bytes.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import Message

from echelon.config import BudgetConfig, ChurnConfig, DeviceConfig, LinkConfig
from echelon.contract.guard import ContractViolation, EgressGuard, IngressGuard
from echelon.parties import GLOBAL, boundary_address, device_address, party_of
from echelon.planes.boundary import BoundaryPlane
from echelon.planes.coordinator import GlobalPlane
from echelon.planes.device import DevicePlane, StartLocalRound
from echelon.runtime.network import Network
from echelon.sansio import CancelTimer, Emit, PlaneAction, Send, SetTimer
from echelon.train.trainer import LocalTrainer, derived_seed
from echelon.v1 import device_pb2
from echelon.wire import unwrap, wrap_device


class SimulationStalled(RuntimeError):
    """No event is left but the run has not finished (e.g. a quorum that can never be met)."""


@dataclass
class Traffic:
    """Wire bytes and messages by message type, inside boundaries and across them."""

    intra_bytes: Counter = field(default_factory=Counter)
    intra_messages: Counter = field(default_factory=Counter)
    dropped: int = 0
    refused: list[str] = field(default_factory=list)


class Simulation:
    """Runs a global plane, boundary planes and device planes until the global plane finishes."""

    def __init__(
        self,
        *,
        global_plane: GlobalPlane,
        boundaries: dict[str, BoundaryPlane],
        devices: dict[str, DevicePlane],
        device_boundary: dict[str, str],
        device_profiles: dict[str, DeviceConfig],
        trainer: LocalTrainer,
        lan: LinkConfig,
        wan: dict[str, LinkConfig],
        churn: ChurnConfig,
        guards: dict[str, tuple[EgressGuard, IngressGuard]],
        seed: int,
        on_emit: Callable[[str, dict], None],
    ) -> None:
        self.global_plane = global_plane
        self._actors: dict[str, object] = {GLOBAL: global_plane}
        self._actors |= {boundary_address(b): p for b, p in boundaries.items()}
        self._actors |= {device_address(d): p for d, p in devices.items()}
        self._boundary_of = {device_address(d): boundary_address(b) for d, b in device_boundary.items()}
        self._profiles = {device_address(d): p for d, p in device_profiles.items()}
        self._trainer, self._lan, self._wan, self._churn = trainer, lan, wan, churn
        self._guards, self._seed, self._on_emit = guards, seed, on_emit
        self._network = Network(seed)
        self._queue: list[tuple[float, int, str, tuple]] = []
        self._seq = itertools.count()
        self._timer_generation: Counter = Counter()
        self._online = dict.fromkeys(self._profiles, True)
        self._session = Counter()  # bumps when a device goes offline; stale completions are ignored
        self._rngs = {
            d: np.random.default_rng(derived_seed(seed, 3, i)) for i, d in enumerate(sorted(self._profiles))
        }
        self.now = 0.0
        self.tokens = 0
        self.traffic = Traffic()

    # -- the loop -------------------------------------------------------------------------------

    def run(self, budget: BudgetConfig) -> None:
        """Process events until the global plane finishes (after a budget is reached)."""
        self._do(GLOBAL, self.global_plane.start(0.0))
        for d in sorted(self._profiles):
            self._do(d, self._actors[d].start(0.0))
            self._schedule_leave(d)
        while self._queue:
            self.now, _, kind, args = heapq.heappop(self._queue)
            getattr(self, f"_on_{kind}")(*args)
            if not self.global_plane.finished:
                self._check_budget(budget)
            if self.global_plane.finished:
                self._drain_cross_boundary()
                return
        raise SimulationStalled(f"no events left at virtual time {self.now:.1f} s before the run finished")

    def _drain_cross_boundary(self) -> None:
        """Deliver the cross-boundary messages still in flight when the run ends (the final
        reference reaches every boundary), so both ends of every crossing are on record. Device
        work and timers stop here."""
        while self._queue:
            at, _, kind, args = heapq.heappop(self._queue)
            src, dst = (args[0], args[1]) if kind == "deliver" else ("", "")
            if kind == "deliver" and src not in self._boundary_of and dst not in self._boundary_of:
                self.now = at
                self._on_deliver(*args)

    def _push(self, at: float, kind: str, *args: object) -> None:
        heapq.heappush(self._queue, (at, next(self._seq), kind, args))

    def _check_budget(self, budget: BudgetConfig) -> None:
        g = self.global_plane
        if not g.finished:
            self._do(GLOBAL, g.check_budget(self.now, budget, self.tokens, self.cross_boundary_bytes))

    @property
    def cross_boundary_bytes(self) -> int:
        """Wire bytes sent across boundaries so far (each crossing counted once, at its sender)."""
        return sum(egress.bytes_total for egress in self.egress_guards)

    @property
    def egress_guards(self) -> list[EgressGuard]:
        """Every party's egress guard: between them they count each crossing once."""
        return [egress for egress, _ in self._guards.values()]

    def cross_boundary_by_type(self) -> dict[str, int]:
        """Cross-boundary wire bytes by message type."""
        total: Counter = Counter()
        for egress in self.egress_guards:
            total.update(egress.bytes_by_type)
        return dict(sorted(total.items()))

    @property
    def boundary_planes(self) -> dict[str, BoundaryPlane]:
        """Boundary id -> its plane."""
        return {a.split("/", 1)[1]: p for a, p in self._actors.items() if isinstance(p, BoundaryPlane)}

    # -- actions --------------------------------------------------------------------------------

    def _do(self, src: str, actions: list[PlaneAction]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send(src, action.to, action.message)
            elif isinstance(action, SetTimer):
                self._timer_generation[src, action.key] += 1
                self._push(
                    max(action.at, self.now),
                    "timer",
                    src,
                    action.key,
                    self._timer_generation[src, action.key],
                )
            elif isinstance(action, CancelTimer):
                self._timer_generation[src, action.key] += 1
            elif isinstance(action, Emit):
                self._on_emit(action.kind, {"time": self.now, **action.fields})
            elif isinstance(action, StartLocalRound):
                self._start_local_round(src, action)
            else:
                raise TypeError(f"unknown action {action!r}")

    def _start_local_round(self, device: str, action: StartLocalRound) -> None:
        result = self._trainer.local_round(action.device, action.reference, action.anchor)
        profile = self._profiles[device]
        speed = profile.tokens_per_s
        if profile.speed_jitter_pct:
            speed *= 1 + (profile.speed_jitter_pct / 100) * self._rngs[device].uniform(-1.0, 1.0)
        self._push(self.now + result.tokens / speed, "local_done", device, result, self._session[device])

    def _send(self, src: str, dst: str, message: Message) -> None:
        if not self._online.get(src, True) or not self._online.get(dst, True):
            self.traffic.dropped += 1
            return
        if src in self._boundary_of or dst in self._boundary_of:
            device = src if src in self._boundary_of else dst
            frames = [wrap_device(device.split("/", 1)[1], message).SerializeToString()]
            name = message.DESCRIPTOR.full_name
            self.traffic.intra_bytes[name] += len(frames[0])
            self.traffic.intra_messages[name] += 1
            link_cfg = self._lan
        else:
            boundary = src if src != GLOBAL else dst
            try:
                frames = self._guards[party_of(src)][0].send(self.now, message, party_of(dst))
            except ContractViolation as e:
                self.traffic.refused.append(str(e))
                self._on_emit("contract_violation", {"time": self.now, "reason": str(e)})
                return
            link_cfg = self._wan[boundary.split("/", 1)[1]]
        link = self._network.link(src, dst, link_cfg)
        for frame in frames:
            self._push(link.transit(self.now, len(frame)), "deliver", src, dst, frame)

    # -- events ---------------------------------------------------------------------------------

    def _on_deliver(self, src: str, dst: str, data: bytes) -> None:
        if not self._online.get(dst, True):
            self.traffic.dropped += 1
            return
        if src in self._boundary_of or dst in self._boundary_of:
            message = unwrap(device_pb2.DeviceEnvelope.FromString(data))
        else:
            try:
                message = self._guards[party_of(dst)][1].receive(self.now, data, party_of(src))
            except ContractViolation as e:
                self.traffic.refused.append(str(e))
                return
            if message is None:
                return  # a slice of a larger message: wait for the rest
        self._do(dst, self._actors[dst].receive(self.now, src, message))

    def _on_timer(self, actor: str, key: str, generation: int) -> None:
        if self._timer_generation[actor, key] == generation:
            self._do(actor, self._actors[actor].on_timer(self.now, key))

    def _on_local_done(self, device: str, result, session: int) -> None:
        if session != self._session[device] or not self._online[device]:
            return  # the device went offline mid-round: the work is lost with it
        self.tokens += result.tokens
        self._do(device, self._actors[device].local_round_finished(self.now, result))

    def _schedule_leave(self, device: str) -> None:
        if self._churn.mean_uptime_s is not None:
            self._push(self.now + self._rngs[device].exponential(self._churn.mean_uptime_s), "leave", device)

    def _on_leave(self, device: str) -> None:
        self._online[device] = False
        self._session[device] += 1
        boundary = self._boundary_of[device]
        self._do(boundary, self._actors[boundary].peer_lost(self.now, device))
        self._push(self.now + self._rngs[device].exponential(self._churn.mean_downtime_s), "join", device)

    def _on_join(self, device: str) -> None:
        self._online[device] = True
        self._do(device, self._actors[device].start(self.now))
        self._schedule_leave(device)
