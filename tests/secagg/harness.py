"""A tiny in-process message router that drives one aggregation round to its outcome.

Every message goes through its wire bytes. Participants can drop out at a stage; a hook can
inspect, alter, duplicate or hold back any message before it is delivered.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import Message

from echelon.contract.provenance import RoundSeal
from echelon.planes.aggregation import AggregationClient, AggregationServer, Aggregator
from echelon.sansio import CancelTimer, Emit, PlaneAction, Send, SetTimer
from echelon.secagg.protocol import Entropy
from echelon.v1 import device_pb2, secagg_pb2, tensor_pb2

SERVER = "boundary/b0"
# The stage of each participant message: a participant dropping at stage s sends none from s on.
SENDS_AT = {"advertise_keys": 0, "share_keys": 1, "masked_input": 2, "unmask_response": 3}

Hook = Callable[[str, str, Message], list[tuple]]
"""hook(origin, to, message) -> the (origin, message) pairs delivered to `to` in its place, or
(origin, message, recipient) triples delivered to another recipient (a malicious server's)."""


def seeded_entropy(seed: int) -> Entropy:
    """A reproducible stand-in for os.urandom (tests only)."""
    return random.Random(seed).randbytes


@dataclass
class Run:
    server: AggregationServer
    clients: dict[str, AggregationClient] = field(default_factory=dict)
    delivered: list[tuple[str, str, Message]] = field(default_factory=list)
    events: list[tuple[str, Emit]] = field(default_factory=list)  # (participant, event)
    now: float = 0.0

    def sent(self, kind: str) -> list[tuple[str, str, secagg_pb2.SecAggMessage]]:
        """Delivered SecAgg+ messages whose body is `kind`."""
        return [
            (o, t, m)
            for o, t, m in self.delivered
            if isinstance(m, secagg_pb2.SecAggMessage) and m.WhichOneof("body") == kind
        ]


def run_round(
    aggregator: Aggregator,
    vectors: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    drop_at: Mapping[str, int] | None = None,
    hook: Hook | None = None,
    round_id: int = 7,
    provenance: int = tensor_pb2.DEVICE,
    joins: Mapping[str, Aggregator] | None = None,
) -> Run:
    """Run a round until the server has an outcome (or nothing is left to deliver).

    `joins` gives a participant its own aggregator to join with (its own signer, say).
    """
    drop_at = drop_at or {}
    dim = len(next(iter(vectors.values())))
    run = Run(aggregator.server(round_id, weights, dim, provenance, RoundSeal.open(round_id, len(weights))))
    queue: deque[tuple[str, str, Message]] = deque()
    timers: dict[str, float] = {}
    dead: set[str] = set()

    def dispatch(origin: str, actions: list[PlaneAction]) -> None:
        for a in actions:
            if isinstance(a, Emit):
                run.events.append((origin, a))
            elif isinstance(a, Send):
                kind = (
                    a.message.WhichOneof("body") if isinstance(a.message, secagg_pb2.SecAggMessage) else None
                )
                if origin != SERVER and SENDS_AT.get(kind or "", -1) >= drop_at.get(origin, 99):
                    dead.add(origin)
                    continue
                queue.append((origin, a.to, a.message))
            elif isinstance(a, SetTimer):
                timers[a.key] = a.at
            elif isinstance(a, CancelTimer):
                timers.pop(a.key, None)

    def deliver(origin: str, to: str, message: Message) -> None:
        parsed = type(message).FromString(message.SerializeToString())
        run.delivered.append((origin, to, parsed))
        if to == SERVER:
            dispatch(SERVER, run.server.receive(run.now, origin, parsed))
        elif to in dead:
            return
        elif isinstance(parsed, device_pb2.AggregationRequest):
            if drop_at.get(to, 99) <= 0:
                dead.add(to)
                return
            run.clients[to] = (joins or {}).get(to, aggregator).join(SERVER, parsed, vectors[to], provenance)
            dispatch(to, run.clients[to].start(run.now))
        elif to in run.clients:
            dispatch(to, run.clients[to].receive(run.now, parsed))

    dispatch(SERVER, run.server.start(run.now))
    while run.server.outcome is None:
        if queue:
            origin, to, message = queue.popleft()
            for item in hook(origin, to, message) if hook else [(origin, message)]:
                sender, msg, recipient = item if len(item) == 3 else (*item, to)
                deliver(sender, recipient, msg)
        elif timers:
            key, at = min(timers.items(), key=lambda kv: kv[1])
            del timers[key]
            run.now = max(run.now, at)
            dispatch(SERVER, run.server.on_timer(run.now, key))
        else:
            break
    return run


def weighted_sum(vectors: Mapping[str, np.ndarray], weights: Mapping[str, float], who) -> np.ndarray:
    """sum over `who` of w_i * v_i in float64."""
    total = np.zeros(len(next(iter(vectors.values()))), dtype=np.float64)
    for p in who:
        total += weights[p] * np.asarray(vectors[p], dtype=np.float64)
    return total


def participants(n: int, dim: int, seed: int, spread: float = 0.5):
    """n participant addresses with vectors in [-spread, spread] and weights in (0, 2]."""
    rng = np.random.default_rng(seed)
    names = [f"device/d{i:02d}" for i in range(n)]
    vectors = {p: rng.uniform(-spread, spread, dim).astype(np.float32) for p in names}
    weights = {p: float(rng.uniform(0.05, 2.0)) for p in names}
    return names, vectors, weights
