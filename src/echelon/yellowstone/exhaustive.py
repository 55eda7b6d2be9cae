"""References for the planner on small boundaries: the exact optimum, and an upper bound by MILP.

`exhaustive` enumerates every set of replicas (each device in at most one replica, the rest on
standby), every ordered partition of a replica's devices into clusters (see `search` for what a
valid cluster is), every structure (single, U-shaped, linear) and every contiguous cut of the
units, and scores each with the exact step time of the cost model. Exponential: meant for
boundaries of up to about eight devices (tests and benchmarks/yellowstone.py).

`upper_bound` bounds the optimum where that is too slow (up to about 14 devices). For a set S of
devices, any replica on them has clusters g with rates R_g <= sum of their speeds / (B seq) (at
most B devices of one site each), units of F FLOPs per token in all, and a step of
sum_g G_g + (m - 1) max_g G_g + max AR >= F B seq / max_g(S) + (m - 1) F B seq / speed(S), where
max_g(S) is the largest speed of at most B devices of one site in S (each G_g >= F_g / R_g, and
the maximum is at least the R-weighted mean). S must hold a cleared device and, fully sharded,
the training state. An integer program (HiGHS) packs disjoint sets to maximise the sum of these
per-set bounds: no plan can beat it.
"""

from __future__ import annotations

import itertools
from collections import Counter

from echelon.yellowstone.cost import INF, Cluster, Structure, make_cluster
from echelon.yellowstone.packing import integer_packing
from echelon.yellowstone.partition import cells
from echelon.yellowstone.search import Context, Replica


def _structures(clusters: tuple[Cluster, ...]) -> list[Structure]:
    if len(clusters) == 1:
        return ["single"]
    return ["U"] + (["linear"] if all(d.cleared for d in clusters[-1].devices) else [])


def _best_cut(found, structure: Structure, n_units: int, m: int) -> float:
    """The least step time over all cut points, from per-cluster cells."""
    k = len(found)
    end = n_units - 1 if structure == "U" else n_units
    best = INF
    for inner in itertools.combinations(range(1, end), k - 1):
        bounds = (0, *inner, end)
        g = [float(found[c][0][bounds[c], bounds[c + 1]]) for c in range(k)]
        if INF in g:
            continue
        ar = [float(found[c][1][bounds[c], bounds[c + 1]]) for c in range(k)]
        best = min(best, sum(g) + (m - 1) * max(g) + max(ar))
    return best


def exhaustive(ctx: Context) -> tuple[float, list[Replica]]:
    """The best total tokens per second over the whole plan space, and the replicas achieving it."""
    devs, n = ctx.devices, len(ctx.devices)
    m, n_units = ctx.settings.micro_batches, ctx.tables.n_units
    memo: dict = {}
    clusters: dict[int, tuple[tuple[int, ...], Cluster]] = {}
    for mask in range(1, 1 << n):
        idx = tuple(i for i in range(n) if mask >> i & 1)
        if len(idx) <= ctx.profile.micro_batch and len({devs[i].site for i in idx}) == 1:
            cl = make_cluster(tuple(devs[i] for i in idx), ctx.lans[devs[idx[0]].site], ctx.profile)
            clusters[mask] = (idx, cl)
    cleared_mask = sum(1 << i for i in range(n) if devs[i].cleared)

    def ordered(rest: int, depth: int):
        """Ordered partitions of `rest` into valid clusters (as lists of masks)."""
        if rest == 0:
            yield []
            return
        if depth >= n_units - 1:
            return
        sub = rest
        while sub:
            if sub in clusters:
                for tail in ordered(rest & ~sub, depth + 1):
                    yield [sub, *tail]
            sub = (sub - 1) & rest

    best_single: dict[int, tuple[float, Replica]] = {}
    for mask in range(1, 1 << n):
        if not mask & cleared_mask:
            continue
        best = (0.0, ())
        sub = mask & cleared_mask
        while sub:
            if sub in clusters:
                for tail in ordered(mask & ~sub, 1):
                    order = [sub, *tail]
                    cls = tuple(clusters[x][1] for x in order)
                    for structure in _structures(cls):
                        found = cells(cls, structure, ctx.tables, ctx.net, ctx.settings, memo)
                        if found is None:
                            continue
                        step = _best_cut(found, structure, n_units, m)
                        if step < INF and ctx.tokens_per_step / step > best[0]:
                            best = (ctx.tokens_per_step / step, tuple(clusters[x][0] for x in order))
            sub = (sub - 1) & (mask & cleared_mask)
        best_single[mask] = best

    total: dict[int, tuple[float, list[Replica]]] = {0: (0.0, [])}
    for mask in range(1, 1 << n):
        low = mask & -mask
        best = total[mask & ~low]
        sub = mask
        while sub:
            if sub & low and sub in best_single and best_single[sub][0] > 0:
                rest = total[mask & ~sub]
                value = best_single[sub][0] + rest[0]
                if value > best[0]:
                    best = (value, [best_single[sub][1], *rest[1]])
            sub = (sub - 1) & mask
        total[mask] = best
    return total[(1 << n) - 1]


def upper_bound(ctx: Context) -> float:
    """Tokens per second no plan of the boundary can exceed (see the module docstring)."""
    devs, prof, s = ctx.devices, ctx.profile, ctx.settings
    n, b, m = len(devs), prof.micro_batch, s.micro_batches
    work = prof.flops_per_token * b * prof.seq_len  # FLOPs of one micro-batch through every unit
    values, columns = [], []
    for mask in range(1, 1 << n):
        members = [devs[i] for i in range(n) if mask >> i & 1]
        if not any(d.cleared for d in members):
            continue
        if sum(d.capacity - s.overhead_bytes for d in members) < prof.state_bytes:
            continue
        by_site: dict[str, list[float]] = {}
        for d in members:
            by_site.setdefault(d.site, []).append(d.speed)
        fastest = max(sum(sorted(v, reverse=True)[:b]) for v in by_site.values())
        step = work / fastest + (m - 1) * work / sum(d.speed for d in members)
        values.append(ctx.tokens_per_step / step)
        columns.append(Counter(i for i in range(n) if mask >> i & 1))
    if not values:
        return 0.0
    _, bound = integer_packing(values, columns, [1] * n)
    return bound
