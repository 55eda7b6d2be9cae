"""The global plane: the one coordinator above the boundaries (sans-IO).

It sees only boundary aggregates and O(1) metadata. When the leading boundary has completed
H middle steps since the last outer step (H from the cadence controller), it asks every
boundary for Delta_b = theta_b - theta_g and applies a DiLoCo-style outer step:

    g = -sum_b omega_b Delta_b,   omega_b = tokens_b / sum_b tokens_b   (tokens are metadata),
    theta_g = OuterOpt(theta_g, g),   SGD with Nesterov momentum (lr 0.7, momentum 0.9).

With lr 1 and momentum 0 this is plain averaging of the boundary references. With P fragments
(Streaming DiLoCo, Douillard et al. 2025) an outer step synchronises one fragment, in turn, every
H/P middle steps, so each fragment is synchronised every H steps, staggered.

Effective divergence budget (paper §8.5): at each outer step k, every reporting boundary adds
m_b(k) * D_b(k) * tokens_b(k), its middle steps in the interval times its drift proxy at the sync
times the tokens it exchanged; B_eff is the running sum divided by all tokens exchanged so far,
so B_eff = sum_k sum_b m_b(k) D_b(k) tokens_b(k) / sum_k sum_b tokens_b(k) is the token-weighted
mean of (interval length x drift), in middle steps x update norms (docs/fidelity.md).

Membership: boundaries may be lost (`peer_lost`: outer steps go on without them), rejoin
(`peer_rejoined`) and join late (`admit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from google.protobuf.message import Message

from echelon.config import BudgetConfig, OuterConfig
from echelon.contract.provenance import AggregateResult, RoundSeal
from echelon.planes.aggregation import AggregationServer, Aggregator
from echelon.planes.controller import Cadence
from echelon.sansio import Data, Emit, PlaneAction, Send, SetTimer
from echelon.tensors import Bounds, encode_apart, float_problem, fragment_bounds, to_tensor
from echelon.v1 import boundary_pb2, device_pb2, tensor_pb2

SYNC_TIMER = "sync-timeout"
BARRIER_TIMER = "barrier-deadline"


@dataclass
class _Reported:
    delta: torch.Tensor | None  # None with secure outer aggregation: it arrives masked
    tokens: int
    contributors: int
    middle_step: int


class OuterOptimizer:
    """SGD with (Nesterov) momentum on the flat global parameters, fed pseudo-gradients."""

    def __init__(self, theta: torch.Tensor, cfg: OuterConfig) -> None:
        self.theta = torch.nn.Parameter(theta.clone(), requires_grad=False)
        nesterov = cfg.nesterov and cfg.momentum > 0  # torch refuses Nesterov without momentum
        self._opt = torch.optim.SGD([self.theta], lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov)

    def step(self, pseudo_gradient: torch.Tensor) -> torch.Tensor:
        """theta <- OuterOpt(theta, g); returns a copy of the new theta."""
        self.theta.grad = pseudo_gradient
        self._opt.step()
        self.theta.grad = None
        return self.theta.detach().clone()

    def state_dict(self) -> dict:
        return {"theta": self.theta.detach().clone(), "optimizer": self._opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.theta.copy_(state["theta"])
        self._opt.load_state_dict(state["optimizer"])


class GlobalPlane:
    """Protocol state of the global coordinator. Boundary addresses are opaque strings."""

    def __init__(
        self,
        boundaries: list[str],
        theta0: torch.Tensor,
        outer: OuterConfig,
        cadence: Cadence,
        sync_timeout_s: float,
        barrier: bool = False,
        outer_aggregator: Aggregator | None = None,
        fragments: int | Bounds = 1,
    ) -> None:
        """`barrier`: synchronise only when every boundary has done H middle steps (synchronous
        strategies), or `sync_timeout_s` after the first one did; otherwise the leading boundary
        triggers the outer step. `outer_aggregator` (+SA): the Delta_b reach this plane only as a
        secure aggregate sum_b omega_b Delta_b, through a round it serves (`OuterAggregation`).
        `fragments` (Streaming DiLoCo): P, or the [lo, hi) ranges of the P fragments of theta; outer
        step k synchronises fragment (k - 1) mod P only, each fragment with its own outer
        optimizer state, and an outer step comes every H/P middle steps."""
        self.outer_aggregator = outer_aggregator
        self._outer_round: AggregationServer | None = None
        self._outer_seal: RoundSeal | None = None
        self.boundaries = list(boundaries)
        self.bounds = fragment_bounds(theta0.numel(), fragments) if isinstance(fragments, int) else fragments
        self.outers = [OuterOptimizer(theta0[lo:hi], outer) for lo, hi in self.bounds]
        self.theta_g = theta0.clone()
        self.cadence = cadence
        self.sync_timeout_s = sync_timeout_s
        self.barrier = barrier
        self._announced_interval: int | None = None
        self._barrier_armed = False
        self.outer_step = 0
        self._middle_step = dict.fromkeys(boundaries, 0)
        self._update_norm = dict.fromkeys(boundaries, 0.0)
        self._tokens_total = dict.fromkeys(boundaries, 0)
        self.ticks = 0
        self._divergence = 0.0  # sum over outer steps and boundaries of m_b * D_b * tokens_b
        self._exchanged_tokens = 0  # sum over outer steps and boundaries of tokens_b
        self._middle_at_sync = dict.fromkeys(boundaries, 0)
        self.absent: set[str] = set()  # boundaries lost and not back: outer steps go on without them
        self.last_pseudo_gradient: torch.Tensor | None = None
        self._syncing: int | None = None
        self._reported: dict[str, _Reported] = {}
        self.final_reason: str | None = None
        self.finished = False
        self.max_outer_steps: int | None = None  # the outer step that finishes the run
        self.max_tokens: int | None = None  # the token budget: an outer step that applies it is the last
        self.tokens_applied = 0  # tokens behind the Delta_b folded into theta_g: what the model learnt from

    def start(self, now: float) -> list[PlaneAction]:
        """Send every boundary the initial global reference (outer step 0) and the cadence."""
        return (
            self._broadcast_reference()
            + self._announce_cadence()
            + [Emit("outer_step", {"outer_step": 0, "time": now})]
        )

    @property
    def b_eff(self) -> float:
        """The effective divergence budget so far (see the module docstring); 0 before any sync."""
        return self._divergence / self._exchanged_tokens if self._exchanged_tokens else 0.0

    def admit(self, now: float, boundary: str) -> list[PlaneAction]:
        """A boundary outside the initial membership joins (a deployment admits it by its
        certificate first); it is brought up to date like a rejoining one."""
        if boundary not in self._middle_step:
            self.boundaries.append(boundary)
            self._middle_step[boundary] = self._middle_at_sync[boundary] = 0
            self._update_norm[boundary], self._tokens_total[boundary] = 0.0, 0
        return self.peer_rejoined(now, boundary)

    def peer_lost(self, now: float, boundary: str) -> list[PlaneAction]:
        """`boundary` went offline: outer steps go on without it until it rejoins. An outer step
        waiting only for it proceeds now."""
        if boundary not in self._middle_step or boundary in self.absent:
            return []
        self.absent.add(boundary)
        self.cadence.forget(boundary)
        if self._syncing is not None and self._outer_round is None and self._all_reported():
            return self._outer_step(now) if self._reported else []
        return self._maybe_sync(now)

    def peer_rejoined(self, now: float, boundary: str) -> list[PlaneAction]:
        """`boundary` (re)connected, or this plane resumed from a checkpoint: bring it up to date
        with the whole current reference, the cadence and, during a sync it has not answered,
        the sync request again (a boundary answers a repeated request with the same delta)."""
        if boundary not in self._middle_step:
            return []
        self.absent.discard(boundary)
        actions: list[PlaneAction] = [
            *self._references(whole=True, to=[boundary]),
            Send(boundary, boundary_pb2.CadenceUpdate(interval=self.cadence.interval)),
        ]
        if self._syncing is not None and boundary not in self._reported:
            actions.append(Send(boundary, self._sync_request()))
        return actions

    def receive(self, now: float, sender: str, message: Message, data: Data = None) -> list[PlaneAction]:
        """A message from a boundary; `data`: its tensor's data, held apart from it (`Send.data`)."""
        if sender not in self._middle_step or self.finished:
            return []
        if sender in self.absent:
            return []  # lost: it is brought back by peer_rejoined
        if isinstance(message, boundary_pb2.BoundaryStatus):
            if message.middle_step < self._middle_step[sender]:
                self._middle_at_sync[sender] = 0  # it restarted: its middle steps count from zero again
            self._middle_step[sender] = message.middle_step
            self.cadence.observe(sender, message.drift, message.middle_step)
            return [
                self._controller_tick(now, sender, message),
                *self._announce_cadence(),
                *self._maybe_sync(now),
            ]
        if isinstance(message, boundary_pb2.BoundaryDelta):
            if message.outer_step != self._syncing or sender in self._reported:
                return []  # late (an outer step already applied without it) or duplicate
            delta = None  # +SA: Delta_b arrives through the outer round
            if self.outer_aggregator is None:
                delta, problem = self._checked_delta(message, data)
                if problem is not None:
                    fields = {
                        "sender": sender,
                        "message_type": message.DESCRIPTOR.full_name,
                        "reason": problem,
                    }
                    return [Emit("refused", fields)]
            self._reported[sender] = _Reported(
                delta, message.tokens, message.contributors, message.middle_step
            )
            if self._all_reported():
                return self._outer_step(now)
        if isinstance(message, boundary_pb2.OuterAggregation) and self._outer_round is not None:
            if message.outer_step != self._syncing or message.WhichOneof("body") != "secagg":
                return []
            return self._after_outer_round(now, self._outer_round.receive(now, sender, message.secagg))
        return []

    def _checked_delta(
        self, message: boundary_pb2.BoundaryDelta, data: Data
    ) -> tuple[torch.Tensor | None, str | None]:
        """(Delta_b of the fragment in sync, None), or (None, why it is refused) unless it is a
        whole float vector of exactly the fragment's length holding only finite values (one NaN
        would poison theta_g for the rest of the run). No delta at all is a zero Delta_b."""
        if not message.HasField("delta"):
            return self._zero_fragment(), None
        problem = float_problem(message.delta, self._zero_fragment().numel(), data)
        if problem is not None:
            return None, problem
        delta = to_tensor(message.delta, data)
        if not bool(torch.isfinite(delta).all()):
            return None, "a BoundaryDelta holding NaN or infinite values"
        return delta, None

    def _all_reported(self) -> bool:
        return all(b in self._reported or b in self.absent for b in self.boundaries)

    def _controller_tick(self, now: float, sender: str, status: boundary_pb2.BoundaryStatus) -> Emit:
        """One controller tick (a boundary reported): the controller's telemetry (paper Table 11)."""
        self.ticks += 1
        self._update_norm[sender] = status.update_norm
        self._tokens_total[sender] = status.tokens_total
        c = self.cadence
        return Emit(
            "controller",
            {
                "tick": self.ticks,
                "reporter": sender,
                "drift": dict(c.drift),
                "update_norm": dict(self._update_norm),
                "scheduled": {b: c.scheduled(b) for b in c.drift},
                "interval": c.interval,
                "driver": c.driver,
                "d0": {b: c.d0(b) for b in c.drift},
                "b_eff": self.b_eff,
            },
        )

    def on_timer(self, now: float, key: str) -> list[PlaneAction]:
        if self._outer_round is not None and key.startswith(f"agg/{self._outer_round.round_id}/"):
            return self._after_outer_round(now, self._outer_round.on_timer(now, key))
        if key == f"{SYNC_TIMER}/{self._syncing}" and self._reported and self._outer_round is None:
            return self._outer_step(now)  # proceed with the boundaries that answered
        if (
            key == f"{BARRIER_TIMER}/{self.outer_step}"
            and self._syncing is None
            and self.final_reason is None
        ):
            return self._start_sync(now)  # stragglers send what they have
        return []

    @property
    def middle_steps(self) -> dict[str, int]:
        """Each boundary's middle steps as it last reported them, by boundary id."""
        return {b.split("/", 1)[1]: n for b, n in self._middle_step.items()}

    @property
    def tokens_reported(self) -> int:
        """Tokens the boundaries have aggregated so far, as their status reports say."""
        return sum(self._tokens_total.values())

    def check_budget(
        self, now: float, budget: BudgetConfig, tokens: int, cross_bytes: int
    ) -> list[PlaneAction]:
        """Stop at the first budget reached: `tokens` trained and `cross_bytes` sent across so far,
        `now` as elapsed seconds. The `outer_steps` budget finishes the run with that outer step
        (its reference goes out final); any other triggers one final outer step."""
        # The outer-step budget is the plane's own: that step's reference goes out as the final one.
        self.max_outer_steps, self.max_tokens = budget.outer_steps, budget.tokens
        reached = [
            ("tokens", budget.tokens is not None and tokens >= budget.tokens),
            ("virtual_seconds", budget.virtual_seconds is not None and now >= budget.virtual_seconds),
            (
                "cross_boundary_bytes",
                budget.cross_boundary_bytes is not None and cross_bytes >= budget.cross_boundary_bytes,
            ),
        ]
        for reason, hit in reached:
            if hit:
                return self.request_final_sync(now, reason)
        return []

    def end(self, now: float, reason: str) -> list[PlaneAction]:
        """Finish now, without another outer step: the run ends on the last synchronised model
        (theta_g of outer step `outer_step`), sent whole and final to every boundary. A sync in
        flight is abandoned. For a deployment whose boundaries stay away past its patience."""
        if self.finished:
            return []
        self.final_reason, self.finished = reason, True
        self._syncing, self._reported, self._outer_round = None, {}, None
        record = {"outer_step": self.outer_step, "time": now, "stop_reason": reason}
        return self._references(whole=True) + [Emit("run_ended", record)]

    def request_final_sync(self, now: float, reason: str) -> list[PlaneAction]:
        """A budget was reached: synchronise once more, then finish. During a sync, that outer step
        is the last: the boundaries yet to answer are asked again, finally (they start no local
        round from then on; the delta they send is the same)."""
        if self.final_reason is not None:
            return []
        self.final_reason = reason
        if self._syncing is None:
            return self._start_sync(now)
        request = self._sync_request()
        return [Send(b, request) for b in self.boundaries if b not in self._reported and b not in self.absent]

    def _sync_every(self) -> int:
        """Middle steps between outer steps: H, or H/P with P fragments (each synced every H)."""
        return max(1, round(self.cadence.interval / len(self.bounds)))

    def _maybe_sync(self, now: float) -> list[PlaneAction]:
        present = [b for b in self.boundaries if b not in self.absent]
        if self._syncing is not None or self.final_reason is not None or not present:
            return []
        steps = [self._middle_step[b] - self._middle_at_sync[b] for b in present]
        every = self._sync_every()
        if max(steps) < every:
            return []
        if not self.barrier or min(steps) >= every:
            return self._start_sync(now)
        if not self._barrier_armed:
            self._barrier_armed = True
            return [SetTimer(f"{BARRIER_TIMER}/{self.outer_step}", now + self.sync_timeout_s)]
        return []

    def _announce_cadence(self) -> list[PlaneAction]:
        """Tell the boundaries H whenever it changes (they hold devices on it in lockstep)."""
        interval = self.cadence.interval
        if interval == self._announced_interval:
            return []
        self._announced_interval = interval
        return [Send(b, boundary_pb2.CadenceUpdate(interval=interval)) for b in self.boundaries]

    def _start_sync(self, now: float) -> list[PlaneAction]:
        self._barrier_armed = False
        self._syncing = self.outer_step + 1
        self._reported = {}
        request = self._sync_request()
        actions: list[PlaneAction] = [Send(b, request) for b in self.boundaries if b not in self.absent]
        return actions + [SetTimer(f"{SYNC_TIMER}/{self._syncing}", now + self.sync_timeout_s)]

    def _omega(self) -> dict[str, float]:
        """omega_b: each reporting boundary's share of the tokens behind this outer step."""
        total = sum(r.tokens for r in self._reported.values())
        return {
            b: (r.tokens / total if total else 1 / len(self._reported)) for b, r in self._reported.items()
        }

    def _outer_step(self, now: float) -> list[PlaneAction]:
        omega = self._omega()
        if self.outer_aggregator is None:
            return self._apply_outer(now, -sum(omega[b] * self._reported[b].delta for b in sorted(omega)))
        # +SA: open a SecAgg+ round over the boundaries that have a Delta_b (weights are public).
        weights = {b: w for b, w in omega.items() if self._reported[b].contributors > 0}
        if not weights:
            return self._apply_outer(now, self._zero_fragment())
        self._outer_seal = RoundSeal.open(self._syncing, len(weights))
        self._outer_round = self.outer_aggregator.server(
            self._syncing,
            weights,
            self._zero_fragment().numel(),
            tensor_pb2.BOUNDARY_AGGREGATE,
            self._outer_seal,
        )
        return self._after_outer_round(now, self._outer_round.start(now))

    def _after_outer_round(self, now: float, actions: list[PlaneAction]) -> list[PlaneAction]:
        """Wrap the round's messages for the boundaries; apply the outer step once it ends."""
        step = self._syncing
        out: list[PlaneAction] = []
        for a in actions:
            if isinstance(a, Send):
                body = "request" if isinstance(a.message, device_pb2.AggregationRequest) else "secagg"
                a = Send(a.to, boundary_pb2.OuterAggregation(outer_step=step, **{body: a.message}))
            out.append(a)
        outcome = self._outer_round.outcome
        if outcome is None:
            return out
        self._outer_round = None
        if isinstance(outcome, AggregateResult):
            self._outer_seal.verify(outcome)
            pseudo_gradient = -torch.from_numpy(outcome.weighted_sum / outcome.weight_sum).float()
        else:
            # Aborted (too few boundaries left): nothing was revealed and theta_g stays.
            out.append(Emit("outer_aggregation_aborted", {"outer_step": step, "reason": outcome.reason}))
            pseudo_gradient = self._zero_fragment()
        return out + self._apply_outer(now, pseudo_gradient)

    def _apply_outer(self, now: float, pseudo_gradient: torch.Tensor) -> list[PlaneAction]:
        """The outer step with `pseudo_gradient` = -sum_b omega_b Delta_b (of the step's fragment)."""
        reported = self._reported
        total = sum(r.tokens for r in reported.values())
        f = self._fragment(self._syncing)
        lo, hi = self.bounds[f]
        self.theta_g = self.theta_g.clone()
        self.theta_g[lo:hi] = self.outers[f].step(pseudo_gradient)
        self.last_pseudo_gradient = pseudo_gradient  # what this plane learned at the step (its own view)
        self.outer_step = self._syncing
        self.tokens_applied += total
        self._syncing, self._reported = None, {}
        for b, r in reported.items():
            # The budget's interval term: the middle steps this boundary folded into its Delta_b.
            interval = max(0, r.middle_step - self._middle_at_sync[b])
            self._divergence += interval * self.cadence.drift.get(b, 0.0) * r.tokens
            self._exchanged_tokens += r.tokens
            self._middle_at_sync[b] = r.middle_step
        record = {
            "outer_step": self.outer_step,
            "time": now,
            "boundaries": len(reported),
            "tokens": total,
            "contributors": sum(r.contributors for r in reported.values()),
            "interval": self.cadence.interval,
            "driver": self.cadence.driver,
            "pseudo_gradient_norm": float(torch.linalg.vector_norm(pseudo_gradient)),
            "b_eff": self.b_eff,
        }
        if self.max_outer_steps is not None and self.outer_step >= self.max_outer_steps:
            self.final_reason = self.final_reason or "outer_steps"
        if self.max_tokens is not None and self.tokens_applied >= self.max_tokens:
            # What this step applied spends the budget (the boundaries' reports, coarse for privacy,
            # may not have said so yet): it is the last, not the one before another.
            self.final_reason = self.final_reason or "tokens"
        self.finished = self.final_reason is not None
        if self.finished:
            record["stop_reason"] = self.final_reason
        return self._broadcast_reference() + self._announce_cadence() + [Emit("outer_step", record)]

    def _fragment(self, outer_step: int) -> int:
        """The fragment outer step `outer_step` (>= 1) synchronises: round robin."""
        return (outer_step - 1) % len(self.bounds)

    def _sync_request(self) -> boundary_pb2.SyncRequest:
        """The request for the outer step in flight, naming the fragment it synchronises."""
        fragment = self._fragment(self._syncing)
        return boundary_pb2.SyncRequest(
            outer_step=self._syncing,
            fragment=fragment,
            fragments=len(self.bounds),
            final=self.final_reason is not None,
        )

    def _zero_fragment(self) -> torch.Tensor:
        """A zero pseudo-gradient for the fragment of the outer step in flight."""
        lo, hi = self.bounds[self._fragment(self._syncing)]
        return torch.zeros(hi - lo)

    def _references(self, whole: bool, to: list[str] | None = None) -> list[PlaneAction]:
        """theta_g as of the last outer step, to the boundaries `to` (default all), encoded once
        with its data held apart (`Send.data`): `whole`, or only the fragment that step moved."""
        if whole or len(self.bounds) == 1:
            f, fragments, (lo, hi) = 0, 1, (0, self.theta_g.numel())
        else:
            f, fragments = self._fragment(self.outer_step), len(self.bounds)
            lo, hi = self.bounds[f]
        parameters, data = encode_apart(self.theta_g[lo:hi], tensor_pb2.GLOBAL)
        reference = boundary_pb2.GlobalReference(
            outer_step=self.outer_step,
            parameters=parameters,
            final=self.finished,
            fragment=f,
            fragments=fragments,
        )
        return [Send(b, reference, data) for b in (self.boundaries if to is None else to)]

    def _broadcast_reference(self) -> list[PlaneAction]:
        """theta_g after the outer step: all of it at the start, else the fragment just stepped."""
        return self._references(whole=self.outer_step == 0)

    def state_dict(self) -> dict:
        """The plane's state between outer steps, as tensors and plain values (loadable with
        `torch.load(weights_only=True)`); `load_state_dict` on a plane built from the same
        configuration restores it. Refused while a sync is in flight."""
        if self._syncing is not None:
            raise RuntimeError("the global plane is checkpointed between outer steps, not during a sync")
        return {
            "boundaries": list(self.boundaries),
            "absent": sorted(self.absent),
            "theta_g": self.theta_g.clone(),
            "outers": [o.state_dict() for o in self.outers],
            "cadence": self.cadence.state_dict(),
            "announced_interval": self._announced_interval,
            "barrier_armed": self._barrier_armed,
            "outer_step": self.outer_step,
            "middle_step": dict(self._middle_step),
            "update_norm": dict(self._update_norm),
            "tokens_total": dict(self._tokens_total),
            "tokens_applied": self.tokens_applied,
            "ticks": self.ticks,
            "divergence": self._divergence,
            "exchanged_tokens": self._exchanged_tokens,
            "middle_at_sync": dict(self._middle_at_sync),
            "final_reason": self.final_reason,
            "finished": self.finished,
            "max_outer_steps": self.max_outer_steps,
            "max_tokens": self.max_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s output (ValueError when it is another run's shape)."""
        if state["theta_g"].shape != self.theta_g.shape or not set(self.boundaries) <= set(
            state["boundaries"]
        ):
            raise ValueError("the checkpoint is of another run (other boundaries or model size)")
        self.boundaries, self.absent = list(state["boundaries"]), set(state["absent"])
        self.theta_g = state["theta_g"].clone()
        for outer, saved in zip(self.outers, state["outers"], strict=True):
            outer.load_state_dict(saved)
        self.cadence.load_state_dict(state["cadence"])
        self._announced_interval, self._barrier_armed = state["announced_interval"], state["barrier_armed"]
        self.outer_step, self.ticks = state["outer_step"], state["ticks"]
        self._divergence, self._exchanged_tokens = state["divergence"], state["exchanged_tokens"]
        self._middle_step, self._update_norm = dict(state["middle_step"]), dict(state["update_norm"])
        self._tokens_total, self._middle_at_sync = dict(state["tokens_total"]), dict(state["middle_at_sync"])
        self.tokens_applied = state["tokens_applied"]
        self.final_reason, self.finished = state["final_reason"], state["finished"]
        self.max_outer_steps, self.max_tokens = state["max_outer_steps"], state["max_tokens"]
