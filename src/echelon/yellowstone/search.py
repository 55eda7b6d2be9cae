"""The plan space of one boundary and the evaluation of its replicas.

A boundary plan is a set of replicas plus standby devices. A replica is an ordered tuple of
clusters; a cluster is a tuple of device indices that share a site, holds at most `micro_batch`
devices (each computes at least one sequence of a micro-batch), and cluster 0 is made only of
devices cleared for the boundary's data tier (it hosts the embedding and, in a U-shaped pipeline,
the head). Replicas are independent, so a plan's throughput is the sum of its replicas'.

`Evaluator` scores replicas through the layer-partition DP, memoised by a signature that names
what sets the cost (device types, site networks, links between consecutive clusters), so replicas
built from identical hardware are solved once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from echelon.yellowstone.cost import (
    CostSettings,
    Device,
    Layout,
    Link,
    Network,
    Structure,
    Tables,
    make_cluster,
)
from echelon.yellowstone.model_profile import ModelProfile
from echelon.yellowstone.partition import best_layout

Replica = tuple[tuple[int, ...], ...]
MEMO_BYTES = 64 * 2**20  # cap on memoised DP cells per boundary


@dataclass
class Context:
    """Everything the search of one boundary needs."""

    boundary: str
    devices: list[Device]
    tables: Tables
    net: Network
    settings: CostSettings
    profile: ModelProfile
    lans: dict[str, Link] = field(default_factory=dict)

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


class Evaluator:
    """Best layout of a replica, memoised by signature; counts DP runs in `evaluations`."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.evaluations = 0
        self._cache: dict[tuple, Solved | None] = {}
        self._cells: dict = {}
        self._cells_max = max(64, int(MEMO_BYTES / (16 * (ctx.tables.n_units + 1) ** 2)))
        self._types: dict[tuple, int] = {}
        self._type_of = [self._intern(self._types, (d.speed, d.capacity, d.cleared)) for d in ctx.devices]
        self._links: dict[tuple, int] = {}
        self._pair: dict[tuple[str, str], int] = {}

    @staticmethod
    def _intern(table: dict, key: tuple) -> int:
        return table.setdefault(key, len(table))

    def _link_id(self, a: str, b: str) -> int:
        if (a, b) not in self._pair:
            link = self.ctx.net.link(a, b)
            self._pair[(a, b)] = -1 if link is None else self._intern(self._links, (link.alpha, link.beta))
        return self._pair[(a, b)]

    def canonical(self, replica: Replica) -> Replica:
        """Devices of each cluster ordered by type, so equal signatures share device order."""
        return tuple(tuple(sorted(c, key=lambda i: (self._type_of[i], i))) for c in replica)

    def valid(self, replica: Replica) -> bool:
        devs, b = self.ctx.devices, self.ctx.profile.micro_batch
        if not replica or not all(devs[i].cleared for i in replica[0]):
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
        replica = self.canonical(replica)
        key = self._signature(replica)
        if key not in self._cache:
            self.evaluations += 1
            if len(self._cells) > self._cells_max:
                self._cells.clear()
            found = best_layout(
                self.clusters(replica), self.ctx.tables, self.ctx.net, self.ctx.settings, self._cells
            )
            self._cache[key] = None if found is None else Solved(found[0].structure, found[0].cuts, found[1])
        return self._cache[key]

    def clusters(self, replica: Replica) -> tuple:
        ctx, replica = self.ctx, self.canonical(replica)
        return tuple(
            make_cluster(tuple(ctx.devices[i] for i in c), ctx.lans[ctx.devices[c[0]].site], ctx.profile)
            for c in replica
        )

    def score(self, replica: Replica) -> float:
        """Tokens per second of a replica (0 when infeasible)."""
        s = self.solve(replica)
        return 0.0 if s is None else self.ctx.tokens_per_step / s.step_s

    def layout(self, replica: Replica) -> Layout:
        s = self.solve(replica)
        assert s is not None
        return Layout(self.clusters(replica), s.structure, s.cuts)
