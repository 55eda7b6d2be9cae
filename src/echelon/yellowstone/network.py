"""The network between sites: routes over the fleet's links, and links shared by replicas.

A site's own network joins its devices (`link(a, a)`). Between two sites, traffic takes the
route that moves one stage-to-stage message fastest over the declared links (and the fleet's
`default_link` for every undeclared pair): a route of several hops costs the sum of their
latencies plus the message over its slowest hop (relays forward as they receive, so a message
is not stored whole at each hop). A route is exact for that cost: for every bottleneck value b
(each distinct link bandwidth) the least-latency path over links of at least b is found, and the
best of latency + bytes / b over all b is kept. Without a message size the widest path wins
(ties: least latency), the limit of very large messages.

Sharing: links are full duplex and every stage edge sends as many bytes each way (activations
forward, their gradients back), so a replica's load on a physical link is its bytes per second
over that link in one direction. A transfer sees the bandwidth the other replicas leave free on
average, beta x (1 - their utilisation), at least `MIN_FREE` of it; `shared` gives that view.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from echelon.yellowstone.fleet import Fleet

MIN_FREE = 0.02  # the least share of a link a replica is assumed to get however busy it is

Hop = tuple[str, str]  # a physical link between two different sites, names sorted


@dataclass(frozen=True)
class Link:
    """A path's latency (seconds) and bottleneck bandwidth (bytes per second)."""

    alpha: float
    beta: float

    def p2p(self, nbytes: float) -> float:
        return self.alpha + nbytes / self.beta


def hop(a: str, b: str) -> Hop:
    return (a, b) if a <= b else (b, a)


class Network:
    """Routes between the fleet's sites; `link` is None where no path exists."""

    def __init__(self, fleet: Fleet, message_bytes: float | None = None) -> None:
        self.message_bytes = message_bytes
        self.sites = [s.id for s in fleet.sites]
        self._index = {s: i for i, s in enumerate(self.sites)}
        self._lans = {s.id: Link(s.latency_s, s.bytes_per_s) for s in fleet.sites}
        n = len(self.sites)
        self._beta = np.zeros((n, n))
        self._alpha = np.full((n, n), np.inf)
        if fleet.default_link is not None:
            self._beta[:] = fleet.default_link.bytes_per_s
            self._alpha[:] = fleet.default_link.latency_s
        for entry in fleet.links:
            i, j = (self._index[s] for s in entry.sites)
            self._beta[i, j] = self._beta[j, i] = entry.bytes_per_s
            self._alpha[i, j] = self._alpha[j, i] = entry.latency_s
        np.fill_diagonal(self._beta, 0.0)
        np.fill_diagonal(self._alpha, np.inf)
        self._thresholds = np.unique(self._beta[self._beta > 0])[::-1]
        self._from: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # source -> (threshold index, preds)
        self._routes: dict[tuple[str, str], tuple[str, ...] | None] = {}
        self._links: dict[tuple[str, str], Link | None] = {}

    def physical(self, h: Hop) -> Link:
        """The declared (or default) link of one hop."""
        i, j = self._index[h[0]], self._index[h[1]]
        return Link(float(self._alpha[i, j]), float(self._beta[i, j]))

    def _solve(self, src: int) -> tuple[np.ndarray, np.ndarray]:
        """Best threshold per target and the predecessor arrays of every threshold."""
        n = len(self.sites)
        times = np.full((len(self._thresholds), n), np.inf)
        preds = np.zeros((len(self._thresholds), n), dtype=int)
        for t, b in enumerate(self._thresholds):
            w = np.where(self._beta >= b, self._alpha, np.inf)
            dist, pred = w[src].copy(), np.full(n, src)
            dist[src] = 0.0
            for _ in range(n):
                cand = dist[:, None] + w
                arg = cand.argmin(axis=0)
                best = cand[arg, np.arange(n)]
                better = best < dist * (1 - 1e-12) - 1e-15
                if not better.any():
                    break
                dist[better], pred[better] = best[better], arg[better]
            preds[t] = pred
            if self.message_bytes is None:
                # widest first: a larger threshold always wins; latency breaks ties
                times[t] = np.where(np.isfinite(dist), t * 1e9 + dist, np.inf)
            else:
                times[t] = dist + self.message_bytes / b
        return times.argmin(axis=0) if len(times) else np.zeros(n, int), preds

    def route(self, a: str, b: str) -> tuple[str, ...] | None:
        """Sites from a to b along the chosen route (a alone when a == b); None if unreachable."""
        key = (a, b)
        if key not in self._routes:
            self._routes[key] = self._route(a, b)
        return self._routes[key]

    def _route(self, a: str, b: str) -> tuple[str, ...] | None:
        if a == b:
            return (a,)
        if not len(self._thresholds):
            return None
        src, dst = self._index[a], self._index[b]
        if src not in self._from:
            self._from[src] = self._solve(src)
        best, preds = self._from[src]
        pred = preds[best[dst]]
        path, here = [dst], dst
        for _ in range(len(self.sites)):
            if here == src:
                break
            here = int(pred[here])
            path.append(here)
        if path[-1] != src:
            return None
        sites = tuple(self.sites[i] for i in reversed(path))
        return (
            sites
            if all(self._beta[self._index[x], self._index[y]] > 0 for x, y in itertools.pairwise(sites))
            else None
        )

    def hops(self, a: str, b: str) -> tuple[Hop, ...]:
        """The physical links the route from a to b crosses (none inside a site)."""
        path = self.route(a, b)
        return () if path is None else tuple(hop(x, y) for x, y in itertools.pairwise(path))

    def link(self, a: str, b: str) -> Link | None:
        """The route from a to b as one link: summed latency, bottleneck bandwidth."""
        key = (a, b)
        if key not in self._links:
            self._links[key] = self._link(a, b, {})
        return self._links[key]

    def _link(self, a: str, b: str, free: dict[Hop, float]) -> Link | None:
        if a == b:
            return self._lans[a]
        path = self.route(a, b)
        if path is None:
            return None
        links = [(self.physical(hop(x, y)), free.get(hop(x, y), 1.0)) for x, y in itertools.pairwise(path)]
        return Link(sum(x.alpha for x, _ in links), min(x.beta * f for x, f in links))

    def shared(self, free: dict[Hop, float]) -> SharedNetwork:
        """This network as a replica sees it when others use part of some links (`free` share)."""
        return SharedNetwork(self, free)


class SharedNetwork:
    """Same routes as `base`; each hop's bandwidth scaled by the share `free` leaves to a replica."""

    def __init__(self, base: Network, free: dict[Hop, float]) -> None:
        self.base = base
        self.free = {h: max(MIN_FREE, min(1.0, f)) for h, f in free.items()}
        self._links: dict[tuple[str, str], Link | None] = {}

    def route(self, a: str, b: str) -> tuple[str, ...] | None:
        return self.base.route(a, b)

    def hops(self, a: str, b: str) -> tuple[Hop, ...]:
        return self.base.hops(a, b)

    def physical(self, h: Hop) -> Link:
        return self.base.physical(h)

    def link(self, a: str, b: str) -> Link | None:
        key = (a, b)
        if key not in self._links:
            self._links[key] = self.base._link(a, b, self.free)
        return self._links[key]
