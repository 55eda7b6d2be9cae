"""The plan space of one boundary, the evaluation of its replicas, and the local search over it.

A boundary plan is a set of replicas plus standby devices. A replica is an ordered tuple of
clusters; a cluster is a tuple of device indices that share a site, holds at most `micro_batch`
devices (each computes at least one sequence of a micro-batch), and cluster 0 is made only of
devices cleared for the boundary's data tier (it hosts the embedding and, in a U-shaped pipeline,
the head). Replicas are independent, so a plan's throughput is the sum of its replicas'.

`Evaluator` scores replicas through the layer-partition DP, memoised by a signature that names
what sets the cost (device types, site networks, routes between consecutive clusters), so
replicas built from identical hardware are solved once; a replica whose devices cannot hold the
model's training state even fully sharded scores zero without running the DP.

`local_search` is a steepest ascent over `Move`s (a device moves between clusters, replicas and
standby; two devices swap; two clusters swap places; a replica is dropped; two merge), with
escapes through the least bad moves at a local optimum, within a budget of DP runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from echelon.yellowstone.cost import (
    AnyNetwork,
    Cluster,
    CostSettings,
    Device,
    Layout,
    Link,
    Structure,
    Tables,
    make_cluster,
)
from echelon.yellowstone.model_profile import ModelProfile
from echelon.yellowstone.partition import best_layout

Replica = tuple[tuple[int, ...], ...]
MEMO_BYTES = 64 * 2**20  # cap on memoised DP cells per boundary
LOCAL_SEARCH_DEVICES = 48  # boundaries up to this size get the local search
SWAP_DEVICES = 24  # and up to this size also pairwise swaps
SEARCH_EVALUATIONS = 3000  # DP runs the local search may spend per boundary
RANDOM_START_DEVICES = 16  # boundaries up to this size also get random starts
RANDOM_STARTS = 12


@dataclass
class Context:
    """Everything the search of one boundary needs."""

    boundary: str
    devices: list[Device]
    tables: Tables
    net: AnyNetwork
    settings: CostSettings
    profile: ModelProfile
    lans: dict[str, Link] = field(default_factory=dict)
    paths: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = field(default_factory=dict)  # see construct

    def __post_init__(self) -> None:
        for d in self.devices:
            if d.site not in self.lans:
                lan = self.net.link(d.site, d.site)
                assert lan is not None  # a site always has its own network
                self.lans[d.site] = lan

    @property
    def tokens_per_step(self) -> int:
        p = self.profile
        return self.settings.micro_batches * p.micro_batch * p.seq_len


@dataclass(frozen=True)
class Solved:
    structure: Structure
    cuts: tuple[tuple[int, int], ...]
    step_s: float


class Memo:
    """DP results by replica signature and DP cells, shared by the evaluators of one boundary and
    of its sub-fleets (signatures name hardware, not device indices)."""

    def __init__(self, n_units: int) -> None:
        self.solved: dict[tuple, Solved | None] = {}
        self.cells: dict = {}
        self.cells_max = max(64, int(MEMO_BYTES / (16 * (n_units + 1) ** 2)))


class Evaluator:
    """Best layout of a replica, memoised by signature; counts DP runs in `evaluations`."""

    def __init__(self, ctx: Context, memo: Memo | None = None) -> None:
        self.ctx = ctx
        self.evaluations = 0
        self.memo = memo or Memo(ctx.tables.n_units)
        self._type_of = [(d.speed, d.capacity, d.cleared) for d in ctx.devices]
        self._pair: dict[tuple[str, str], tuple[float, float] | None] = {}
        self._room = [d.capacity - ctx.settings.overhead_bytes for d in ctx.devices]
        self._clusters: dict[tuple[int, ...], Cluster] = {}

    def _link_id(self, a: str, b: str) -> tuple[float, float] | None:
        if (a, b) not in self._pair:
            link = self.ctx.net.link(a, b)
            self._pair[(a, b)] = None if link is None else (link.alpha, link.beta)
        return self._pair[(a, b)]

    def canonical(self, replica: Replica) -> Replica:
        """Devices of each cluster ordered by type, so equal signatures share device order."""
        return tuple(tuple(sorted(c, key=lambda i: (self._type_of[i], i))) for c in replica)

    def valid(self, replica: Replica) -> bool:
        """Cluster 0 cleared, each cluster one site and at most a micro-batch of devices, and no
        more clusters than units (each runs at least one)."""
        devs, b = self.ctx.devices, self.ctx.profile.micro_batch
        if (
            not replica
            or len(replica) > self.ctx.tables.n_units
            or not all(devs[i].cleared for i in replica[0])
        ):
            return False
        return all(0 < len(c) <= b and len({devs[i].site for i in c}) == 1 for c in replica)

    def _signature(self, replica: Replica) -> tuple:
        devs = self.ctx.devices
        sites = [devs[c[0]].site for c in replica]
        types = tuple(tuple(self._type_of[i] for i in c) for c in replica)
        order = [*sites, sites[0]]
        return (
            types,
            tuple(self._link_id(a, b) for a, b in itertools.pairwise(order)),
            tuple(self._link_id(s, s) for s in sites),
        )

    def solve(self, replica: Replica) -> Solved | None:
        """Best structure and cuts for a replica; None when it cannot train."""
        if not self.valid(replica):
            return None
        if sum(self._room[i] for c in replica for i in c) < self.ctx.profile.state_bytes:
            return None  # each unit's state lives whole or sharded somewhere: too little memory
        replica = self.canonical(replica)
        key = self._signature(replica)
        memo = self.memo
        if key not in memo.solved:
            self.evaluations += 1
            if len(memo.cells) > memo.cells_max:
                memo.cells.clear()
            found = best_layout(
                self.clusters(replica), self.ctx.tables, self.ctx.net, self.ctx.settings, memo.cells
            )
            memo.solved[key] = None if found is None else Solved(found[0].structure, found[0].cuts, found[1])
        return memo.solved[key]

    def clusters(self, replica: Replica) -> tuple[Cluster, ...]:
        """The cost model's clusters of a replica (devices in canonical order)."""
        out = []
        for c in self.canonical(replica):
            if c not in self._clusters:
                devs = tuple(self.ctx.devices[i] for i in c)
                self._clusters[c] = make_cluster(devs, self.ctx.lans[devs[0].site], self.ctx.profile)
            out.append(self._clusters[c])
        return tuple(out)

    def score(self, replica: Replica) -> float:
        """Tokens per second of a replica (0 when infeasible)."""
        s = self.solve(replica)
        return 0.0 if s is None else self.ctx.tokens_per_step / s.step_s

    def layout(self, replica: Replica) -> Layout:
        s = self.solve(replica)
        assert s is not None
        return Layout(self.clusters(replica), s.structure, s.cuts)


def total(ev: Evaluator, replicas: list[Replica]) -> float:
    """Tokens per second of a set of replicas."""
    return sum(ev.score(r) for r in replicas)


class Move(NamedTuple):
    """Replace the replicas at indices `old` by `new`; `freed` devices go to standby, `taken` leave it."""

    old: tuple[int, ...]
    new: list[Replica]
    freed: frozenset[int]
    taken: frozenset[int]

    def apply(self, replicas: list[Replica], standby: set[int]) -> tuple[list[Replica], set[int]]:
        kept = [r for i, r in enumerate(replicas) if i not in self.old]
        return kept + list(self.new), (standby | self.freed) - self.taken


NOTHING: frozenset[int] = frozenset()


def moves(ev: Evaluator, replicas: list[Replica], standby: set[int]) -> Iterator[Move]:
    """Every candidate move from a plan (invalid results score zero)."""
    devs, cap = ev.ctx.devices, ev.ctx.profile.micro_batch
    where: dict[int, tuple[int, int]] = {
        i: (r, c) for r, rep in enumerate(replicas) for c, cl in enumerate(rep) for i in cl
    }

    def inserts(rep: Replica, d: int) -> Iterator[Replica]:
        site = devs[d].site
        for c, cl in enumerate(rep):
            if len(cl) < cap and devs[cl[0]].site == site and (c > 0 or devs[d].cleared):
                yield (*rep[:c], (*cl, d), *rep[c + 1 :])
        for p in range(0 if devs[d].cleared else 1, len(rep) + 1):
            yield (*rep[:p], (d,), *rep[p:])

    for d in range(len(devs)):
        base: dict[int, Replica | None] = {}
        freed: frozenset[int] = NOTHING
        taken = frozenset({d}) if d in standby else NOTHING
        if d not in standby:
            r, c = where[d]
            cl = tuple(i for i in replicas[r][c] if i != d)
            shrunk: Replica | None
            if cl:
                shrunk = (*replicas[r][:c], cl, *replicas[r][c + 1 :])
            elif c > 0:
                shrunk = (*replicas[r][:c], *replicas[r][c + 1 :])
            else:
                shrunk = None  # its replica loses cluster 0: the rest go to standby
            base = {r: shrunk}
            if shrunk is None:
                freed = frozenset(i for x in replicas[r] for i in x if i != d)
            yield Move(tuple(base), [x for x in base.values() if x], freed | {d}, taken)
        if devs[d].cleared:
            yield Move(tuple(base), [*[x for x in base.values() if x], ((d,),)], freed, taken)
        for r2, rep in enumerate(replicas):
            cur = base.get(r2, rep)
            if cur is None:
                continue
            others = [x for k, x in base.items() if k != r2 and x]
            for new in inserts(cur, d):
                yield Move(tuple(sorted({*base, r2})), [*others, new], freed, taken)
    if len(devs) <= SWAP_DEVICES:
        yield from _swaps(replicas, standby, where, len(devs))
    for r, rep in enumerate(replicas):
        for p in range(len(rep)):
            for q in range(p + 1, len(rep)):
                if p == 0 and not all(devs[i].cleared for i in rep[q]):
                    continue
                swapped = list(rep)
                swapped[p], swapped[q] = swapped[q], swapped[p]
                yield Move((r,), [tuple(swapped)], NOTHING, NOTHING)
        yield Move((r,), [], frozenset(i for c in rep for i in c), NOTHING)
        for r2, rep2 in enumerate(replicas):
            if r2 != r:
                yield Move(tuple(sorted((r, r2))), [rep + rep2], NOTHING, NOTHING)


def _swaps(
    replicas: list[Replica], standby: set[int], where: dict[int, tuple[int, int]], n: int
) -> Iterator[Move]:
    """Exchange two devices (either may be on standby)."""
    for d in range(n):
        for e in range(d + 1, n):
            if d in standby and e in standby:
                continue
            if d in where and e in where and where[d][:2] == where[e][:2]:
                continue
            swap = {d: e, e: d}
            touched = tuple(sorted({where[x][0] for x in (d, e) if x in where}))
            new = [tuple(tuple(swap.get(i, i) for i in c) for c in replicas[r]) for r in touched]
            freed = frozenset(x for x in (d, e) if x in where and swap[x] in standby)
            taken = frozenset(x for x in (d, e) if x in standby)
            yield Move(touched, new, freed, taken)


def _climb(ev: Evaluator, replicas: list[Replica], standby: set[int], budget: int, keep: int = 0):
    """Steepest ascent over `moves` until no move helps or `budget` DP runs are spent.

    Returns the local optimum and, when `keep` > 0, the `keep` best non-improving moves seen at it.
    """
    scores = [ev.score(r) for r in replicas]
    while True:
        value = sum(scores)
        best: tuple[float, Move] | None = None
        runners: list[tuple[float, int, Move]] = []
        for move in moves(ev, replicas, standby):
            gain = sum(ev.score(x) for x in move.new) - sum(scores[i] for i in move.old)
            if gain > 1e-9 * max(value, 1.0) and (best is None or gain > best[0]):
                best = (gain, move)
            elif keep:
                runners.append((gain, len(runners), move))
            if ev.evaluations >= budget:
                break
        if best is None or ev.evaluations >= budget:
            runners.sort(key=lambda x: (-x[0], x[1]))
            if best is not None:
                replicas, standby = best[1].apply(replicas, standby)
            return replicas, standby, [m for _, _, m in runners[:keep]]
        replicas, standby = best[1].apply(replicas, standby)
        scores = [ev.score(r) for r in replicas]


def local_search(
    ev: Evaluator, replicas: list[Replica], standby: set[int], budget: int, kicks: int = 6
) -> tuple[list[Replica], set[int]]:
    """Steepest ascent, then escapes: from a local optimum, take one of its `kicks` least bad moves
    and climb again; accept the first escape that ends higher. Stops when `budget` DP runs are spent."""
    replicas, standby, runners = _climb(ev, list(replicas), set(standby), budget, kicks)
    improved = True
    while improved and ev.evaluations < budget:
        improved = False
        for move in runners:
            trial, spare, next_runners = _climb(ev, *move.apply(replicas, standby), budget, kicks)
            if total(ev, trial) > total(ev, replicas) * (1 + 1e-9):
                replicas, standby, runners, improved = trial, spare, next_runners, True
                break
            if ev.evaluations >= budget:
                break
    return replicas, standby


def random_starts(ctx: Context, count: int, seed: int = 0) -> list[tuple[list[Replica], set[int]]]:
    """`count` random plans to start the local search from (repeatable: a fixed seed): a random
    set of cleared devices anchors the replicas, each other device joins a random replica as its
    own cluster or stays on standby. Local optima reached from the constructions alone miss plans
    whose replicas differ in kind (two short replicas rather than one long)."""
    rng = np.random.default_rng(seed)
    cleared = [i for i, d in enumerate(ctx.devices) if d.cleared]
    out = []
    for _ in range(count):
        anchors = rng.permutation(cleared)[: rng.integers(1, len(cleared) + 1)].tolist()
        replicas: list[list[tuple[int, ...]]] = [[(a,)] for a in anchors]
        standby = set()
        for i in rng.permutation(len(ctx.devices)).tolist():
            if i in anchors:
                continue
            if rng.random() < 0.3:
                standby.add(i)
            else:
                replicas[rng.integers(len(replicas))].append((i,))
        out.append(([tuple(r) for r in replicas], standby))
    return out
