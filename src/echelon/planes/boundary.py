"""The boundary plane: one boundary's coordinator (sans-IO).

Middle step. Devices announce finished local rounds (`UpdateReady`, metadata only) into a
buffer of capacity K_buf (or the whole cohort, `buffer_size: boundary`). The buffer fires when
full, or when tau seconds have passed since its first arrival. A device not aggregated in the
last W middle steps is starved: it is picked first, and a full buffer waits (up to tau) for a
live starved device that is still training; the rest are picked at random (seeded) when
`privacy.shuffle` is on, else first come first served. Each picked device gets the staleness
weight w_i = (1 + s_i)^-a, where s_i is the age since device i last participated (or (re)joined),
in middle steps (the paper's definition), or the version lag v_b - v_i as an option; with s_max
set, staler updates are dropped, and every dropped update is recorded. The aggregator computes
sum_i w_i delta_i; the coordinator only ever holds that sum and the public sum of weights. Then

    delta_b = sum_i w_i delta_i / sum_i w_i,   theta_b += eta_mid * delta_b,   v_b += 1,   u_b = ||delta_b||_2,
    D_b = EMA_beta(||theta_b - theta_g||_2) / (eta_mid * EMA_beta(u_b))   (scale-free drift proxy):

the distance from the global reference in units of the boundary's own recent middle-step update.

Membership. Devices are admitted (`admit`, e.g. after a deployment checked a joining device's
certificate) and removed for good (`remove`); they go offline (`peer_lost`) and come back
(`Hello`). With fixed-membership windows (`privacy.membership_window`), the cohort whose updates
a middle step may aggregate changes only at window edges, every that many middle steps: a device
that joins or rejoins from outside the cohort waits for the next edge. With a whole-cohort buffer
a middle step never fires without a lost cohort member; at the buffer deadline the window ends
early instead (an edge, recorded), so the member set of the aggregates changes only at edges.
What crosses about the contributors (counts and tokens) follows `privacy.status_counts`.

Outer step. On the global plane's `SyncRequest` the boundary sends Delta_b = theta_b - theta_g
(a boundary aggregate). Without overlap it stops firing until the new global reference arrives
and adopts it; with overlap it keeps training and re-bases:
theta_b = theta_g_new + (theta_b_now - theta_b_at_send).

Lockstep (synchronous strategies such as FedAvg or DiLoCo): once H middle steps have passed since
the last outer step (H from the global's `CadenceUpdate`), the devices of a finished round wait
for the next global reference instead of starting again from theta_b.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from google.protobuf.message import Message

from echelon.config import EchelonConfig
from echelon.contract.provenance import AggregateResult, BoundaryModel, Ledger, QuorumNotMet
from echelon.planes.aggregation import AggregationClient, AggregationServer, Aggregator
from echelon.sansio import Data, Emit, PlaneAction, Send, SetTimer
from echelon.tensors import Bounds, float_problem, fragment_bounds, to_tensor
from echelon.v1 import boundary_pb2, device_pb2, tensor_pb2

BUFFER_TIMER = "buffer"
AGGREGATION_TIMER_PREFIX = "agg/"


def _checkpointed(message: Message, data: Data) -> tuple[bytes, bytes | None]:
    """A message and its tensor's data held apart, as plain bytes for a checkpoint."""
    return message.SerializeToString(), None if data is None else bytes(data)


def staleness_weight(staleness: int, exponent: float) -> float:
    """w = (1 + s)^-a: fresh updates weigh 1, stale ones less."""
    return (1.0 + staleness) ** -exponent


@dataclass(eq=False)
class _Arrival:
    device: str
    base_version: int
    tokens: int
    loss: float
    at: float


@dataclass
class _Device:
    live: bool = False
    training: bool = False
    last_aggregated: int = 0  # middle step of its latest contribution (or of its joining)
    departed: bool = False  # removed for good


@dataclass(frozen=True)
class StepMembers:
    """Who a finished middle step aggregated, with which weights, and when its round opened
    (boundary-local knowledge: the coordinator invited them; it never crosses the boundary)."""

    middle_step: int
    weights: dict[str, float]
    opened_at: float


@dataclass
class _Round:
    server: AggregationServer
    arrivals: dict[str, _Arrival]
    weights: dict[str, float]
    buffer_occupancy: int
    dropped_stale: int
    opened_at: float
    staleness: Counter = field(default_factory=Counter)


class BoundaryPlane:
    """Protocol state of one boundary coordinator. Device and global addresses are opaque strings."""

    def __init__(
        self,
        boundary_id: str,
        devices: list[str],
        global_address: str,
        cfg: EchelonConfig,
        aggregator: Aggregator,
        dim: int,
        lockstep: bool = False,
        outer_aggregator: Aggregator | None = None,
        outer_range: float | None = None,
        fragments: int | Bounds = 1,
        seed: int = 0,
        round_tokens: int | None = None,
    ) -> None:
        """`outer_aggregator`: secure outer aggregation (+SA); Delta_b then joins the global plane's
        round masked instead of crossing in BoundaryDelta, each coordinate encoded within
        +/- `outer_range` (coordinates beyond it are clipped, and counted). `fragments`: P, or the
        fragments' [lo, hi) ranges (Streaming DiLoCo). `seed`: the shuffling of participants.
        `round_tokens`: the tokens one local round trains (the run file fixes it); a device
        reporting more is refused, since tokens weigh its boundary in the outer step (None: unchecked)."""
        self.boundary_id, self.global_address, self.cfg, self.dim = boundary_id, global_address, cfg, dim
        self.round_tokens = round_tokens
        self._aggregator = aggregator
        self._devices = {d: _Device() for d in devices}
        self.model: BoundaryModel | None = None  # theta_b and Delta_b, with their provenance
        self.ledger = Ledger()  # the aggregates this boundary minted: its egress guard checks them
        self._fragments = fragments
        self._bounds = fragment_bounds(dim, fragments) if isinstance(fragments, int) else list(fragments)
        self.version = 0
        self.middle_step = 0
        self.drift = 0.0
        self.update_norm = 0.0
        self._distance_ema = 0.0  # EMA of ||theta_b - theta_g||
        self._norm_ema = 0.0  # EMA of u_b
        self._rng = np.random.default_rng(seed)
        self._cohort: set[str] | None = None  # fixed-membership window: who may be aggregated
        self._window_start = 0
        self._round_tokens = 0  # tokens of one local round, as the latest arrival reported
        self.last_step: StepMembers | None = None
        self._buffer: list[_Arrival] = []
        self._round: _Round | None = None
        self._next_round_id = 1
        self._tokens_since_sync = 0
        self.tokens_total = 0
        self._sync_requested: int | None = None  # outer step the global asked for, not yet answered
        self._awaiting_global: int | None = None  # outer step whose reference we wait for
        self.lockstep = lockstep
        self.interval: int | None = None  # H, as announced by the global plane
        self._middle_at_send = 0
        self._held: list[str] = []  # lockstep: devices waiting for the next global reference
        self.finished = False  # the global plane sent the final reference
        self.closing = False  # the global plane asked for the last Delta_b: no local round starts
        self._sync_fragment = 0  # Streaming DiLoCo: the fragment the pending sync asked for
        self._deferred: tuple[boundary_pb2.GlobalReference, Data] | None = None  # tau: not yet applied
        self.adopted_step = 0  # the outer step of the global reference theta_b is based on
        self._last_delta: Send | None = None  # Delta_b as sent: resent if asked again
        self._outer_aggregator = outer_aggregator
        self._outer_range = outer_range
        self._outer_input: tuple[int, torch.Tensor, int] | None = None  # +SA: (outer step, Delta_b, quorum)
        self._outer_client: AggregationClient | None = None

    # -- events ---------------------------------------------------------------------------------

    def receive(self, now: float, sender: str, message: Message, data: Data = None) -> list[PlaneAction]:
        """A message from a device or the global plane; `data`: its tensor's data, held apart from
        it (`Send.data`)."""
        reason = self._refusal(sender, message, data)
        if reason is not None:
            fields = {"boundary": self.boundary_id, "sender": sender, "reason": reason}
            return [Emit("refused", {**fields, "message_type": message.DESCRIPTOR.full_name})]
        if isinstance(message, device_pb2.Hello):
            return self._on_hello(now, sender)
        if isinstance(message, device_pb2.UpdateReady):
            return self._on_update_ready(now, sender, message)
        if isinstance(message, device_pb2.Goodbye):
            return self._on_goodbye(now, sender)
        if isinstance(message, boundary_pb2.GlobalReference):
            return self._on_global_reference(now, message, data)
        if isinstance(message, boundary_pb2.SyncRequest):
            return self._on_sync_request(now, message)
        if isinstance(message, boundary_pb2.OuterAggregation):
            return self._on_outer_aggregation(now, message)
        if isinstance(message, boundary_pb2.CadenceUpdate):
            self.interval = message.interval
            return []
        if self._round is not None and sender in self._devices:
            # Aggregation traffic: the server validates round ids and excludes misbehaving senders.
            actions = list(self._round.server.receive(now, sender, message))
            return actions + self._after_round_event(now)
        return []

    def _refusal(self, sender: str, message: Message, data: Data) -> str | None:
        """Why a received message cannot be applied (checked before any use), or None."""
        from_global = isinstance(message, boundary_pb2.GlobalReference | boundary_pb2.SyncRequest)
        from_global |= isinstance(message, boundary_pb2.OuterAggregation | boundary_pb2.CadenceUpdate)
        if from_global != (sender == self.global_address):
            return f"{message.DESCRIPTOR.name} may not come from {sender}"
        fragments = len(self._bounds)
        if isinstance(message, boundary_pb2.SyncRequest):
            if (message.fragments > 1 or fragments > 1) and (
                message.fragments != fragments or message.fragment >= fragments
            ):
                return f"fragment {message.fragment} of {message.fragments} in a run of {fragments}"
        elif isinstance(message, boundary_pb2.GlobalReference):
            if message.fragments > 1 and (message.fragments != fragments or message.fragment >= fragments):
                return f"fragment {message.fragment} of {message.fragments} in a run of {fragments}"
            whole = message.fragments <= 1
            lo, hi = (0, self.dim) if whole else self._bounds[message.fragment]
            return float_problem(message.parameters, hi - lo, data)
        elif isinstance(message, boundary_pb2.CadenceUpdate) and message.interval < 1:
            return "an outer interval H of 0 middle steps"
        elif isinstance(message, device_pb2.UpdateReady):
            if not math.isfinite(message.train_loss):
                return f"a local round whose train loss is {message.train_loss}"
            if self.round_tokens is not None and message.tokens > self.round_tokens:
                return f"a local round of {message.tokens:,} tokens: one trains {self.round_tokens:,}"
        return None

    def on_timer(self, now: float, key: str) -> list[PlaneAction]:
        if key == BUFFER_TIMER:
            return self._try_fire(now)
        if key.startswith(AGGREGATION_TIMER_PREFIX) and self._round is not None:
            return list(self._round.server.on_timer(now, key)) + self._after_round_event(now)
        return []

    def peer_lost(self, now: float, device: str) -> list[PlaneAction]:
        """A device disconnected: its buffered update is lost with it (the delta lived on the device)."""
        info = self._devices.get(device)
        if info is None:
            return []
        info.live = info.training = False
        return (
            self._drop_buffered(now, device, "device lost") + self._reform_if_stuck(now) + self._try_fire(now)
        )

    def admit(self, now: float, device: str) -> list[PlaneAction]:
        """Admit a device outside the initial membership (a deployment calls this once the
        device's certificate is checked); it takes part once it says hello (and, with
        fixed-membership windows, from the next window edge)."""
        if device not in self._devices:
            self._devices[device] = _Device()
        return []

    def remove(self, now: float, device: str) -> list[PlaneAction]:
        """`device` left for good: it is never aggregated again, even if it says hello."""
        info = self._devices.get(device)
        if info is None:
            return []
        info.departed = True
        return self.peer_lost(now, device)

    # -- handlers -------------------------------------------------------------------------------

    def _on_hello(self, now: float, device: str) -> list[PlaneAction]:
        info = self._devices.get(device)
        if info is None or info.departed:
            return []
        info.live, info.training = True, False
        info.last_aggregated = self.middle_step
        actions = self._drop_buffered(now, device, "device restarted")
        if self.model is not None and self._eligible(device):
            actions += self._send_reference(device)
        return actions + self._reform_if_stuck(now)

    def _on_goodbye(self, now: float, device: str) -> list[PlaneAction]:
        """The device leaves for good, by its own word: removed, and the departure emitted."""
        info = self._devices.get(device)
        if info is None or info.departed:
            return []
        fields = {"boundary": self.boundary_id, "device": device, "middle_step": self.middle_step}
        return [Emit("departed", fields), *self.remove(now, device)]

    def departed(self, device: str) -> bool:
        """`device` was removed for good."""
        info = self._devices.get(device)
        return info is not None and info.departed

    def member(self, device: str) -> bool:
        """`device` is of this boundary: of its initial membership or admitted (departed or not)."""
        return device in self._devices

    @property
    def roster(self) -> tuple[int, int]:
        """(members, departed members): changes when a device is admitted or removed."""
        return len(self._devices), sum(1 for i in self._devices.values() if i.departed)

    def _on_update_ready(self, now: float, device: str, msg: device_pb2.UpdateReady) -> list[PlaneAction]:
        info = self._devices.get(device)
        if info is None or not info.live or not info.training:
            return []
        info.training = False
        self._round_tokens = msg.tokens
        self._buffer.append(_Arrival(device, msg.base_version, msg.tokens, msg.train_loss, now))
        return self._arm_buffer_timer(now) + self._try_fire(now)

    def _on_global_reference(
        self, now: float, msg: boundary_pb2.GlobalReference, data: Data
    ) -> list[PlaneAction]:
        theta_g = to_tensor(msg.parameters, data)
        actions: list[PlaneAction] = []
        fragment = msg.fragment if msg.fragments > 1 else None  # None: the whole vector
        if msg.final:
            # The run is over: keep the final model, start nothing more, send nothing more.
            self.finished = True
            if self.model is not None:
                self.model.adopt(theta_g, keep_since_send=False, fragment=fragment)
            return []
        if self.model is None:
            # The initial reference (or the current one, after a restart): devices that said hello start.
            self.model = BoundaryModel(theta_g, self.cfg.min_quorum, self._fragments, self.ledger)
            self.adopted_step = msg.outer_step
            if self.cfg.privacy.membership_window is not None:
                actions += self._window_edge(now, "start")  # sends the cohort its reference
            for d, info in self._devices.items():
                if info.live and not info.training and self._eligible(d):
                    actions += self._send_reference(d)
            return actions
        if msg.outer_step != self._awaiting_global:
            if fragment is None and msg.outer_step > self.adopted_step:
                # A newer whole reference resent after a restart (ours or the global plane's):
                # catch up, keeping the middle steps since (they were never sent).
                self.model.adopt(theta_g, keep_since_send=True)
                self.adopted_step = msg.outer_step
                self.version += 1
            return []
        if self.middle_step - self._middle_at_send < self.cfg.streaming.overlap_steps:
            self._deferred = msg, data  # tau: applied after that many middle steps since the send
            return []
        self._deferred = None
        streaming = self.cfg.streaming
        self.model.adopt(theta_g, self.cfg.sync.overlap, fragment, streaming.mixing)
        self._awaiting_global = None
        self.adopted_step = msg.outer_step
        self.version += 1
        held, self._held = self._held, []
        for d in held:
            if self._devices[d].live and self._eligible(d):
                actions += self._send_reference(d)
        return actions + self._try_fire(now)

    def _on_sync_request(self, now: float, msg: boundary_pb2.SyncRequest) -> list[PlaneAction]:
        # A budget is spent: devices start nothing more, so what the run counts is what was
        # aggregated when Delta_b goes (a deployment's devices would otherwise train on meanwhile).
        self.closing |= msg.final
        last = self._last_delta
        if last is not None and msg.outer_step == self._awaiting_global == last.message.outer_step:
            # Asked again for a delta already sent (the global plane restarted): the same one.
            return [last]
        if (
            self.finished
            or self.model is None
            or msg.outer_step == self._awaiting_global
            # Answered when the round in flight ends; without one (after a restart), now.
            or (msg.outer_step == self._sync_requested and self._round is not None)
        ):
            return []
        self._sync_requested = msg.outer_step
        self._sync_fragment = msg.fragment if msg.fragments > 1 else 0
        return [] if self._round is not None else self._send_boundary_delta()

    def _send_boundary_delta(self) -> list[PlaneAction]:
        outer_step, self._sync_requested = self._sync_requested, None
        f = self._sync_fragment
        quorum = self._crossing_count(self.model.contributors[f])
        delta = boundary_pb2.BoundaryDelta(
            outer_step=outer_step,
            tokens=self._crossing_tokens(self._tokens_since_sync, nearest=True),
            middle_step=self.middle_step,
            contributors=quorum,
        )
        dtype = (
            tensor_pb2.BFLOAT16
            if self.cfg.streaming.pseudo_gradient_dtype == "bfloat16"
            else tensor_pb2.FLOAT32
        )
        # The quorum it guarantees, as coarse as privacy.status_counts says (a lower bound still).
        minted = self.model.mint(f, dtype, quorum)
        data = None
        if minted is not None and self._outer_aggregator is None:
            delta.delta.CopyFrom(minted.header)
            data = minted.data  # beside the message, as minted: never copied into it
        elif minted is not None:
            # +SA: Delta_b waits for the global plane's aggregation request and crosses masked.
            self._outer_input = (outer_step, self.model.delta(f).clone(), quorum)
        self.model.start_sync(f)
        self._last_delta = Send(self.global_address, delta, data)
        self._middle_at_send = self.middle_step
        self._awaiting_global = outer_step
        self._tokens_since_sync = 0
        return [self._last_delta]

    def _on_outer_aggregation(self, now: float, msg: boundary_pb2.OuterAggregation) -> list[PlaneAction]:
        """+SA: take part in the global plane's SecAgg+ round over the boundaries' Delta_b."""
        if msg.WhichOneof("body") == "request":
            if self._outer_input is None or self._outer_input[0] != msg.outer_step:
                return []  # nothing to contribute for that outer step (or a replay)
            _, delta_b, quorum = self._outer_input
            self._outer_input = None
            clipped = self._outer_clipped(delta_b, msg.request.weight)
            self._outer_client = self._outer_aggregator.join(
                self.global_address, msg.request, delta_b.numpy(), tensor_pb2.BOUNDARY_AGGREGATE, quorum
            )
            actions = self._outer_client.start(now)
            if clipped:
                fields = {"boundary": self.boundary_id, "outer_step": msg.outer_step, "coordinates": clipped}
                actions = [*actions, Emit("outer_input_clipped", fields)]
        elif msg.WhichOneof("body") == "secagg" and self._outer_client is not None:
            actions = self._outer_client.receive(now, msg.secagg)
        else:
            return []
        if self._outer_client.done:
            self._outer_client = None
        return [
            Send(a.to, boundary_pb2.OuterAggregation(outer_step=msg.outer_step, secagg=a.message))
            if isinstance(a, Send)
            else a
            for a in actions
        ]

    # -- membership ----------------------------------------------------------------------------

    def _eligible(self, device: str) -> bool:
        """Whether `device` may train for (and be aggregated into) the current window."""
        return self._cohort is None or device in self._cohort

    def _window_edge(self, now: float, reason: str) -> list[PlaneAction]:
        """A fixed-membership window edge: the cohort becomes the live devices; newcomers start."""
        before = self._cohort or set()
        self._cohort = {d for d, i in self._devices.items() if i.live and not i.departed}
        self._window_start = self.middle_step
        record = {
            "boundary": self.boundary_id,
            "time": now,
            "middle_step": self.middle_step,
            "reason": reason,
            "cohort": len(self._cohort),
            "joined": len(self._cohort - before),
            "left": len(before - self._cohort),
        }
        actions: list[PlaneAction] = [Emit("membership_window", record)]
        if self.model is None:
            return actions
        for d in sorted(self._cohort - before):
            info = self._devices[d]
            info.last_aggregated = self.middle_step  # its information is fresh from here on
            if not info.training and not any(a.device == d for a in self._buffer) and d not in self._held:
                actions += self._send_reference(d)
        return actions

    def _reform_if_stuck(self, now: float) -> list[PlaneAction]:
        """An early edge when the cohort's live members cannot reach the quorum but live devices
        outside it wait: no aggregate can be formed, so changing the cohort reveals nothing."""
        if self._cohort is None or self.model is None:
            return []
        live = {d for d, i in self._devices.items() if i.live and not i.departed}
        if len(live & self._cohort) >= self.cfg.min_quorum or not live - self._cohort:
            return []
        return self._window_edge(now, "quorum unreachable")

    def _window_due(self) -> bool:
        window = self.cfg.privacy.membership_window
        return window is not None and self.middle_step - self._window_start >= window

    def _capacity(self) -> int:
        """K_buf, or the whole cohort (its live members) with `buffer_size: boundary`."""
        if self.cfg.buffer_size != "boundary":
            return self.cfg.buffer_size
        members = self._cohort if self._cohort is not None else self._devices
        return max(1, sum(1 for d in members if self._devices[d].live))

    # -- what crosses about the contributors ----------------------------------------------------

    def _crossing_count(self, count: int) -> int:
        """A contributor count as it may cross: exact, coarse (a lower bound), or the quorum floor."""
        privacy, quorum = self.cfg.privacy, self.cfg.min_quorum
        if count == 0 or privacy.status_counts == "exact":
            return count
        if privacy.status_counts == "coarse":
            return max(quorum, count - count % privacy.count_bucket)
        return quorum

    def _crossing_tokens(self, tokens: int, nearest: bool = False) -> int:
        """A token count as it may cross: exact, or in quanta of count_bucket local rounds (coarse)
        or of a round of the whole roster (suppressed): floored (monotone totals) or to the nearest
        quantum, at least one when positive (the outer step's token weights)."""
        privacy = self.cfg.privacy
        if tokens == 0 or privacy.status_counts == "exact" or self._round_tokens == 0:
            return tokens
        # Suppressed: quanta of a round of the whole roster, a constant (the cohort's size would leak).
        roster = sum(1 for i in self._devices.values() if not i.departed)
        rounds = privacy.count_bucket if privacy.status_counts == "coarse" else roster
        quantum = rounds * self._round_tokens
        if not nearest:
            return tokens - tokens % quantum
        return max(1, math.floor(tokens / quantum + 0.5)) * quantum

    def _outer_clipped(self, delta_b: torch.Tensor, weight: float) -> int:
        """+SA: coordinates of weight * Delta_b outside the outer round's encoding range."""
        if self._outer_range is None:
            return 0
        return int((weight * delta_b).abs().gt(self._outer_range).sum())

    # -- middle steps ---------------------------------------------------------------------------

    def _starved(self, device: str) -> bool:
        return self.middle_step - self._devices[device].last_aggregated >= self.cfg.participation_window

    def _staleness(self, arrival: _Arrival) -> int:
        """s_i: the age since the device last participated (middle steps), or its version lag."""
        if self.cfg.staleness == "version_lag":
            return self.version - arrival.base_version
        return self.middle_step - self._devices[arrival.device].last_aggregated

    def _drop_buffered(self, now: float, device: str, reason: str) -> list[PlaneAction]:
        lost = [a for a in self._buffer if a.device == device]
        self._buffer = [a for a in self._buffer if a.device != device]
        return [self._dropped(now, a, reason) for a in lost]

    def _dropped(self, now: float, arrival: _Arrival, reason: str) -> Emit:
        fields = {
            "boundary": self.boundary_id,
            "time": now,
            "reason": reason,
            "staleness": self._staleness(arrival),
        }
        return Emit("update_dropped", fields)

    def _pick(self) -> list[_Arrival]:
        """Starved devices first; the rest at random (shuffle) or in arrival order."""
        order = list(self._buffer)
        if self.cfg.privacy.shuffle:
            order = [order[i] for i in self._rng.permutation(len(order))]
        return sorted(order, key=lambda a: not self._starved(a.device))[: self._capacity()]

    def _try_fire(self, now: float) -> list[PlaneAction]:
        if self.finished or self._round is not None or self.model is None or not self._buffer:
            return []
        if self._awaiting_global is not None and not self.cfg.sync.overlap:
            return []  # retried when the global reference arrives
        full = len(self._buffer) >= self._capacity()
        # Participation window: a full buffer still waits (until the deadline) for a starved device.
        starved_training = any(
            i.live and i.training and self._starved(d) and self._eligible(d) for d, i in self._devices.items()
        )
        # A whole-cohort buffer waits (until the deadline) for cohort members that are offline.
        missing = (
            self.cfg.buffer_size == "boundary"
            and self._cohort is not None
            and any(not self._devices[d].live for d in self._cohort)
        )
        if now < self._deadline() and (not full or starved_training or missing):
            return []  # the buffer timer, set for the deadline, retries
        actions: list[PlaneAction] = []
        if missing:
            actions += self._window_edge(now, "member lost")  # the member set changes only at an edge
        picked = self._pick()
        stale = [
            a
            for a in picked
            if self.cfg.max_staleness is not None and self._staleness(a) > self.cfg.max_staleness
        ]
        fresh = [a for a in picked if a not in stale]
        for a in stale:
            actions.append(self._dropped(now, a, "stale"))
            actions.append(Send(a.device, device_pb2.UpdateDiscarded(reason="too stale")))
            actions += self._send_reference(a.device)
        if len(fresh) < self.cfg.min_quorum:
            # Nothing below quorum is aggregated: keep the fresh updates and wait for arrivals.
            self._buffer = [a for a in self._buffer if a not in stale]
            return actions + self._arm_buffer_timer(now)
        self._buffer = [a for a in self._buffer if a not in picked]
        staleness = Counter(self._staleness(a) for a in fresh)
        weights = {a.device: staleness_weight(self._staleness(a), self.cfg.staleness_exponent) for a in fresh}
        round_id = self._next_round_id
        self._next_round_id += 1
        seal = self.model.open_round(round_id, len(weights))
        server = self._aggregator.server(round_id, weights, self.dim, tensor_pb2.DEVICE, seal)
        self._round = _Round(
            server,
            {a.device: a for a in fresh},
            weights,
            len(picked) + len(self._buffer),
            len(stale),
            now,
            staleness,
        )
        actions += self._arm_buffer_timer(now)
        actions += server.start(now)
        return actions + self._after_round_event(now)

    def _deadline(self) -> float:
        return self._buffer[0].at + self.cfg.buffer_timeout_s

    def _arm_buffer_timer(self, now: float) -> list[PlaneAction]:
        # A deadline already past is handled when the blocking condition ends (round end, arrival).
        return [SetTimer(BUFFER_TIMER, self._deadline())] if self._buffer and self._deadline() > now else []

    def _after_round_event(self, now: float) -> list[PlaneAction]:
        rnd = self._round
        if rnd is None or rnd.server.outcome is None:
            return []
        if self.finished:
            self._round = None  # a round that ends after the final reference changes nothing
            return []
        self._round = None
        outcome = rnd.server.outcome
        actions: list[PlaneAction] = []
        record = {
            "boundary": self.boundary_id,
            "time": now,
            "buffer_occupancy": rnd.buffer_occupancy,
            "dropped_stale": rnd.dropped_stale,
            "excluded": len(rnd.server.excluded),
            "staleness": {str(s): n for s, n in sorted(rnd.staleness.items())},
        }
        if isinstance(outcome, AggregateResult):
            contributed = [d for d in rnd.arrivals if d not in rnd.server.excluded]
            delta_b = self.model.apply_aggregate(outcome, self.cfg.middle_lr)
            self.version += 1
            self.middle_step += 1
            self.last_step = StepMembers(
                self.middle_step, {d: rnd.weights[d] for d in contributed}, rnd.opened_at
            )
            if self._deferred is not None:
                actions += self._on_global_reference(now, *self._deferred)
            self.update_norm = float(torch.linalg.vector_norm(delta_b))
            self.drift = self._drift_proxy()
            tokens = sum(rnd.arrivals[d].tokens for d in contributed)
            self._tokens_since_sync += tokens
            self.tokens_total += tokens
            for d in contributed:
                self._devices[d].last_aggregated = self.middle_step
            loss = sum(rnd.arrivals[d].loss for d in contributed) / len(contributed)
            actions.append(
                Send(
                    self.global_address,
                    boundary_pb2.BoundaryStatus(
                        middle_step=self.middle_step,
                        drift=self.drift,
                        update_norm=self.update_norm,
                        tokens=self._crossing_tokens(self._tokens_since_sync),
                        contributors=self._crossing_count(outcome.contributors),
                        train_loss=loss,
                        tokens_total=self._crossing_tokens(self.tokens_total),
                    ),
                )
            )
            record |= {
                "kind": "middle_step",
                "middle_step": self.middle_step,
                "contributors": outcome.contributors,
                "weight_sum": outcome.weight_sum,
                "train_loss": loss,
                "tokens": tokens,
                "update_norm": self.update_norm,
                "drift": self.drift,
            }
        else:
            self.model.close_round(rnd.server.round_id)
            for d in rnd.arrivals:
                actions.append(Send(d, device_pb2.UpdateDiscarded(reason=outcome.reason)))
            record |= {"kind": "aggregation_aborted", "reason": outcome.reason}
        actions.append(Emit(record.pop("kind"), record))
        hold = (
            self.lockstep
            and self.interval is not None
            and self.middle_step - self._middle_at_send >= self.interval
        )
        if isinstance(outcome, AggregateResult) and self._window_due():
            actions += self._window_edge(now, "window")
        for d in rnd.arrivals:
            if hold:
                self._held.append(d)
            elif self._devices[d].live and self._eligible(d):
                actions += self._send_reference(d)
        if self._sync_requested is not None:
            actions += self._send_boundary_delta()
        return actions + self._try_fire(now)

    def _drift_proxy(self) -> float:
        """D_b: EMA of ||theta_b - theta_g|| over eta_mid times the EMA of u_b (same beta, so the
        EMAs' start-up bias cancels): how many of its own recent updates the boundary is away."""
        beta = self.cfg.sync.drift_ema
        self._distance_ema = beta * self._distance_ema + (1 - beta) * self.model.drift_distance()
        self._norm_ema = beta * self._norm_ema + (1 - beta) * self.update_norm
        scale = self.cfg.middle_lr * self._norm_ema
        return self._distance_ema / scale if scale > 0 else 0.0

    def _send_reference(self, device: str) -> list[PlaneAction]:
        if self.closing:
            return []
        self._devices[device].training = True
        ref = device_pb2.BoundaryReference(version=self.version, parameters=self.model.reference_payload())
        return [Send(device, ref)]

    @property
    def awaiting_global(self) -> int | None:
        """The outer step whose global reference this boundary waits for (its delta was sent)."""
        return self._awaiting_global

    @property
    def buffered(self) -> int:
        """Updates waiting in the buffer."""
        return len(self._buffer)

    def participation_gaps(self) -> dict[str, int]:
        """Middle steps since each device was last aggregated (boundary-local telemetry)."""
        return {d: self.middle_step - i.last_aggregated for d, i in self._devices.items()}

    def state_dict(self) -> dict:
        """The boundary's state as tensors and plain values (`torch.load(weights_only=True)`), for a
        checkpoint: theta_b, Delta_b, counters and the sync in progress. Not the devices' state, the
        buffer or an aggregation round in flight: devices reconnect after a restart and start over."""
        return {
            "model": None if self.model is None else self.model.state_dict(),
            "version": self.version,
            "middle_step": self.middle_step,
            "drift": self.drift,
            "update_norm": self.update_norm,
            "next_round_id": self._next_round_id,
            "tokens_since_sync": self._tokens_since_sync,
            "tokens_total": self.tokens_total,
            "sync_requested": self._sync_requested,
            "awaiting_global": self._awaiting_global,
            "interval": self.interval,
            "middle_at_send": self._middle_at_send,
            "finished": self.finished,
            "closing": self.closing,
            "sync_fragment": self._sync_fragment,
            "deferred": None if self._deferred is None else _checkpointed(*self._deferred),
            "adopted_step": self.adopted_step,
            "last_delta": None
            if self._last_delta is None
            else _checkpointed(self._last_delta.message, self._last_delta.data),
            "outer_input": self._outer_input,
            "last_aggregated": {d: i.last_aggregated for d, i in self._devices.items()},
            "departed": sorted(d for d, i in self._devices.items() if i.departed),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s output, every device offline until it says hello. The
        devices admitted since the start are admitted again, and those departed stay removed."""
        e = self.cfg
        if not set(self._devices) <= set(state["last_aggregated"]):
            raise ValueError("the checkpoint is of another boundary (other devices)")
        model = state["model"]
        self.model = (
            None
            if model is None
            else BoundaryModel.from_state_dict(model, e.min_quorum, self._fragments, self.ledger)
        )
        if self.model is not None and self.model.theta_g.numel() != self.dim:
            raise ValueError("the checkpoint is of another model size")
        self.version, self.middle_step = state["version"], state["middle_step"]
        self.drift, self.update_norm = state["drift"], state["update_norm"]
        self._next_round_id = state["next_round_id"]
        self._tokens_since_sync, self.tokens_total = state["tokens_since_sync"], state["tokens_total"]
        self._sync_requested, self._awaiting_global = state["sync_requested"], state["awaiting_global"]
        self.interval, self._middle_at_send = state["interval"], state["middle_at_send"]
        self.finished, self._sync_fragment = state["finished"], state["sync_fragment"]
        self.closing = state["closing"]
        deferred, last = state["deferred"], state["last_delta"]
        self._deferred = (
            None if deferred is None else (boundary_pb2.GlobalReference.FromString(deferred[0]), deferred[1])
        )
        self.adopted_step = state["adopted_step"]
        self._last_delta = None
        if last is not None:
            message, data = boundary_pb2.BoundaryDelta.FromString(last[0]), last[1]
            if message.HasField("delta"):
                # Resent if the global plane asks again: minted before the restart, under the quorum.
                if message.delta.contributors < e.min_quorum:
                    raise QuorumNotMet(f"a checkpointed Delta_b of {message.delta.contributors} contributors")
                data = self.ledger.mint(message.delta, data).data
            self._last_delta = Send(self.global_address, message, data)
        self._outer_input = state["outer_input"]
        departed = set(state.get("departed", ()))
        self._devices = {
            d: _Device(last_aggregated=last, departed=d in departed)
            for d, last in state["last_aggregated"].items()
        }
