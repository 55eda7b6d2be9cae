"""The simulation driver: every plane in one process, on a virtual clock.

Device compute is real (the trainer computes gradients) but a local round's duration is taken
from the device's profile (tokens / tokens_per_s, with optional per-round straggling), so
heterogeneous speeds are modelled deterministically. Every message is serialised to protobuf
bytes and parsed back on arrival; cross-boundary messages pass the sender's egress guard and the
receiver's ingress guard, so byte counts are true wire bytes. The same seed gives the same event
order, the same losses and the same bytes.

Churn (`ChurnConfig`): a seeded share of the devices cycle offline and back; devices outside the
initial membership join (their boundary admits them, as a deployment would after checking their
certificate; a one-device boundary joining with its device is admitted by the global plane);
devices leave for good; a whole boundary, coordinator and devices, goes offline and comes back
restarted. An `Observer` may watch what the global plane receives and what devices submit.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from google.protobuf.message import Message

from echelon.config import BudgetConfig, ChurnConfig, DeviceConfig, LinkConfig
from echelon.contract.guard import ContractViolation, EgressGuard, IngressGuard
from echelon.parties import GLOBAL, boundary_address, device_address, party_of
from echelon.planes.boundary import BoundaryPlane, StepMembers
from echelon.planes.coordinator import GlobalPlane
from echelon.planes.device import DevicePlane, StartLocalRound
from echelon.runtime.churn import churn_rngs, cycling_devices
from echelon.runtime.network import Network
from echelon.sansio import CancelTimer, Data, Emit, PlaneAction, Send, SetTimer
from echelon.train.trainer import LocalTrainer
from echelon.v1 import device_pb2
from echelon.wire import unwrap, wrap_device


class SimulationStalled(RuntimeError):
    """No event is left but the run has not finished (e.g. a quorum that can never be met)."""


class Observer(Protocol):
    """Watches a simulation (the red-team records with it); never changes what happens."""

    def received(self, now: float, sender: str, message: Message, data: Data, frames: list[bytes]) -> None:
        """The global plane received `message` (its tensor's data held apart: `data`; cross-boundary
        wire `frames`) from `sender`."""

    def submitted(self, now: float, device: str, boundary: str, delta: torch.Tensor) -> None:
        """`device` joined an aggregation round of `boundary` with its clipped delta."""

    def aggregated(self, now: float, boundary: str, step: StepMembers) -> None:
        """`boundary` finished a middle step over `step`'s members."""

    def outer_step(self, now: float, plane: GlobalPlane) -> None:
        """The global plane applied an outer step (`plane.last_pseudo_gradient` is what it learned)."""


@dataclass
class Traffic:
    """Wire bytes and messages by message type, inside boundaries and across them."""

    intra_bytes: Counter = field(default_factory=Counter)
    intra_messages: Counter = field(default_factory=Counter)
    dropped: int = 0
    refused: list[str] = field(default_factory=list)


class Simulation:
    """Runs a global plane, boundary planes and device planes until the global plane finishes.

    `boundaries` and `devices` hold every plane that may ever take part, including those that
    join later (`churn.joins`); `make_boundary` builds a fresh boundary plane for a restart.
    """

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
        make_boundary: Callable[[str], BoundaryPlane] | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.global_plane = global_plane
        self._actors: dict[str, object] = {GLOBAL: global_plane}
        self._actors |= {boundary_address(b): p for b, p in boundaries.items()}
        self._actors |= {device_address(d): p for d, p in devices.items()}
        self._boundary_of = {device_address(d): boundary_address(b) for d, b in device_boundary.items()}
        self._profiles = {device_address(d): p for d, p in device_profiles.items()}
        self._trainer, self._lan, self._wan, self._churn = trainer, lan, wan, churn
        self._guards, self._seed, self._on_emit = guards, seed, on_emit
        self._make_boundary, self._observer = make_boundary, observer
        self._network = Network(seed)
        self._queue: list[tuple[float, int, str, tuple]] = []
        self._seq = itertools.count()
        self._timer_generation: Counter = Counter()
        joining = {device_address(j.device.id) for j in churn.joins}
        self._online = {a: a not in joining for a in self._profiles}
        self._online |= {boundary_address(b): True for b in boundaries}
        self._departed: set[str] = set()
        self._session = Counter()  # bumps when a device goes offline; stale completions are ignored
        self._cycle = Counter()  # bumps when a device's cycling restarts; stale leave/join events are ignored
        self._rngs = churn_rngs(list(self._profiles), seed)
        self._cycling = cycling_devices(churn, [a for a in self._profiles if a not in joining], seed)
        self._partial: dict[str, list[bytes]] = {}  # frames on their way to the global plane
        self.now = 0.0
        self.tokens = 0
        # CPU seconds of the real local-round compute (measured tokens/s; CPU time, not wall time,
        # so that other work on a shared machine does not count against it)
        self.compute_s = 0.0
        self.traffic = Traffic()

    # -- the loop -------------------------------------------------------------------------------

    def run(self, budget: BudgetConfig) -> None:
        """Process events until the global plane finishes (after a budget is reached)."""
        self._do(GLOBAL, self.global_plane.start(0.0))
        for d in sorted(self._profiles):
            if self._online[d]:
                self._do(d, self._actors[d].start(0.0))
                self._schedule_leave(d)
        for j in self._churn.joins:
            self._push(j.at_s, "device_join", device_address(j.device.id))
        for leave in self._churn.departures:
            self._push(leave.at_s, "departure", device_address(leave.device))
        for o in self._churn.outages:
            self._push(o.at_s, "outage", boundary_address(o.boundary), o.at_s + o.duration_s)
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
                self._send(src, action)
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
                if self._observer is not None and action.kind == "middle_step":
                    self._observer.aggregated(self.now, src, self._actors[src].last_step)
                if self._observer is not None and action.kind == "outer_step" and src == GLOBAL:
                    self._observer.outer_step(self.now, self.global_plane)
            elif isinstance(action, StartLocalRound):
                self._start_local_round(src, action)
            else:
                raise TypeError(f"unknown action {action!r}")

    def _start_local_round(self, device: str, action: StartLocalRound) -> None:
        if self.global_plane.final_reason is not None:
            # A budget is spent: the final outer step is under way (it may wait on a slow link or
            # a stalled round), and what a new round trained would count without being aggregated.
            return
        cpu0 = time.process_time()
        result = self._trainer.local_round(action.device, action.reference, action.anchor)
        self.compute_s += time.process_time() - cpu0
        profile = self._profiles[device]
        speed = profile.tokens_per_s
        if profile.speed_jitter_pct:
            speed *= 1 + (profile.speed_jitter_pct / 100) * self._rngs[device].uniform(-1.0, 1.0)
        self._push(self.now + result.tokens / speed, "local_done", device, result, self._session[device])

    def _send(self, src: str, send: Send) -> None:
        dst, message = send.to, send.message
        if not self._online.get(src, True) or not self._online.get(dst, True):
            self.traffic.dropped += 1
            return
        if src in self._boundary_of or dst in self._boundary_of:
            if send.data is not None:
                raise TypeError(
                    "tensor data beside a message crosses boundaries only: a device's holds its own"
                )
            device = src if src in self._boundary_of else dst
            frames = [wrap_device(device.split("/", 1)[1], message).SerializeToString()]
            name = message.DESCRIPTOR.full_name
            self.traffic.intra_bytes[name] += len(frames[0])
            self.traffic.intra_messages[name] += 1
            link_cfg = self._lan
        else:
            boundary = src if src != GLOBAL else dst
            try:
                frames = self._guards[party_of(src)][0].send(self.now, message, party_of(dst), send.data)
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
            if (
                self._observer is not None
                and dst in self._boundary_of
                and isinstance(message, device_pb2.AggregationRequest)
                and self._actors[dst].pending is not None
            ):
                self._observer.submitted(self.now, dst, src, self._actors[dst].pending)
        else:
            try:
                complete = self._guards[party_of(dst)][1].receive_apart(self.now, data, party_of(src))
            except ContractViolation as e:
                self.traffic.refused.append(str(e))
                self._partial.pop(src, None)
                return
            if dst == GLOBAL and self._observer is not None:
                self._partial.setdefault(src, []).append(data)
            if complete is None:
                return  # a slice of a larger message: wait for the rest
            message, held = complete.apart()
            if dst == GLOBAL and self._observer is not None:
                self._observer.received(self.now, src, message, held, self._partial.pop(src))
            self._do(dst, self._actors[dst].receive(self.now, src, message, held))
            return
        self._do(dst, self._actors[dst].receive(self.now, src, message))

    def _on_timer(self, actor: str, key: str, generation: int) -> None:
        if self._timer_generation[actor, key] == generation and self._online.get(actor, True):
            self._do(actor, self._actors[actor].on_timer(self.now, key))

    def _on_local_done(self, device: str, result, session: int) -> None:
        if session != self._session[device] or not self._online[device]:
            return  # the device went offline mid-round: the work is lost with it
        self.tokens += result.tokens
        self._do(device, self._actors[device].local_round_finished(self.now, result))

    # -- churn ----------------------------------------------------------------------------------

    def _schedule_leave(self, device: str) -> None:
        self._cycle[device] += 1
        if device in self._cycling:
            at = self.now + self._rngs[device].exponential(self._churn.mean_uptime_s)
            self._push(at, "leave", device, self._cycle[device])

    def _go_offline(self, device: str) -> None:
        self._online[device] = False
        self._session[device] += 1
        self._cycle[device] += 1

    def _on_leave(self, device: str, cycle: int) -> None:
        if cycle != self._cycle[device] or not self._online[device]:
            return
        self._go_offline(device)
        boundary = self._boundary_of[device]
        self._do(boundary, self._actors[boundary].peer_lost(self.now, device))
        at = self.now + self._rngs[device].exponential(self._churn.mean_downtime_s)
        self._push(at, "join", device, self._cycle[device])

    def _on_join(self, device: str, cycle: int | None = None) -> None:
        """A device comes (back) online: a cycling one after its downtime (`cycle`), or a new one."""
        stale = cycle is not None and cycle != self._cycle[device]
        if stale or device in self._departed or not self._online[self._boundary_of[device]]:
            return  # a boundary back from an outage brings its devices back itself
        self._online[device] = True
        self._do(device, self._actors[device].start(self.now))
        self._schedule_leave(device)

    def _on_device_join(self, device: str) -> None:
        """A device outside the initial membership joins: its boundary admits it (a one-device
        boundary joining with it is admitted by the global plane first)."""
        boundary = self._boundary_of[device]
        if boundary not in self.global_plane.boundaries:
            self._do(GLOBAL, self.global_plane.admit(self.now, boundary))
        self._do(boundary, self._actors[boundary].admit(self.now, device))
        self._on_join(device)

    def _on_departure(self, device: str) -> None:
        """`device` leaves for good."""
        self._departed.add(device)
        self._go_offline(device)
        boundary = self._boundary_of[device]
        if self._online[boundary]:
            self._do(boundary, self._actors[boundary].remove(self.now, device))

    def _on_outage(self, boundary: str, until: float) -> None:
        """The boundary's coordinator and every device go offline; they come back at `until`."""
        self._online[boundary] = False
        for d, b in self._boundary_of.items():
            if b == boundary and self._online[d]:
                self._go_offline(d)
        self._do(GLOBAL, self.global_plane.peer_lost(self.now, boundary))
        self._push(until, "boundary_back", boundary)

    def _on_boundary_back(self, boundary: str) -> None:
        """The boundary restarted: a fresh plane, brought up to date by the global plane; its
        devices (those not gone for good, and already members) start again."""
        if self._make_boundary is None:
            raise RuntimeError("a boundary outage needs make_boundary to restart the boundary")
        plane = self._make_boundary(boundary.split("/", 1)[1])
        self._actors[boundary] = plane
        egress, _ = self._guards[party_of(boundary)]
        egress.ledger = plane.ledger  # the restarted plane mints its own aggregates
        self._online[boundary] = True
        self._do(GLOBAL, self.global_plane.peer_rejoined(self.now, boundary))
        joined = {device_address(j.device.id): j.at_s for j in self._churn.joins}
        for d in sorted(self._profiles):
            if self._boundary_of[d] != boundary or d in self._departed or joined.get(d, 0.0) > self.now:
                continue
            self._do(boundary, plane.admit(self.now, d))
            self._online[d] = True
            self._do(d, self._actors[d].start(self.now))
            self._schedule_leave(d)
