"""Constructions: cells of similar devices, replicas opened from cleared anchors and filled.

Devices are grouped into cells of one site and similar memory and compute (cell sizes 1, 2, 4 and
the micro-batch are tried). `construct` anchors a given number of replicas on the fastest cleared
cells and deals the other cells out, first where memory is short, then where compute is lowest,
preferring the anchor's site; `construct_sequential` opens replicas one at a time and fills each
until it trains. Clusters are ordered from the anchor along the best-connected sites, larger
memory first (early stages hold more micro-batches). Left-over cells `join` the replica they
speed up most, or stay on standby.
"""

from __future__ import annotations

import itertools

import numpy as np

from echelon.yellowstone.cost import INF, AnyNetwork
from echelon.yellowstone.search import LOCAL_SEARCH_DEVICES, Context, Evaluator, Replica, total

Cell = tuple[int, ...]
RESTARTS = 4  # distinct constructions the local search starts from


def make_cells(ctx: Context, idx: list[int], size: int) -> list[Cell]:
    """Group devices of one site and clearance into cells of similar memory and speed, <= size."""
    devs = ctx.devices
    groups: dict[tuple[str, bool], list[int]] = {}
    for i in idx:
        groups.setdefault((devs[i].site, devs[i].cleared), []).append(i)
    out = []
    for key in sorted(groups):
        cur: list[int] = []
        for i in sorted(groups[key], key=lambda i: (-devs[i].capacity, -devs[i].speed, i)):
            first = devs[cur[0]] if cur else None
            if cur and (
                len(cur) >= size or first.capacity > 1.5 * devs[i].capacity or first.speed > 2 * devs[i].speed
            ):
                out.append(tuple(cur))
                cur = []
            cur.append(i)
        if cur:
            out.append(tuple(cur))
    return out


def _site_path(net: AnyNetwork, home: str, sites: list[str]) -> list[str]:
    """Order `sites` after `home` to maximise the slowest link on the path (and back to home).

    Sites that cannot be reached on such a path are left out. Exhaustive up to 6 sites, else greedy.
    """

    def beta(a: str, b: str) -> float:
        link = net.link(a, b)
        return -1.0 if link is None else link.beta

    def score(path: tuple[str, ...]) -> tuple[int, float]:
        prefix, worst, here = 0, INF, home
        for k, site in enumerate(path):
            step = beta(here, site)
            if step < 0:
                break
            worst, here = min(worst, step), site
            if beta(site, home) >= 0:
                prefix = k + 1
        return prefix, min(worst, beta(here, home)) if prefix else 0.0

    if len(sites) <= 6:
        best = max(itertools.permutations(sites), key=lambda p: (*score(p), [-sites.index(x) for x in p]))
        return list(best[: score(best)[0]])
    path, here, left = [], home, list(sites)
    while left:
        nxt = max(left, key=lambda x: (beta(here, x), -left.index(x)))
        if beta(here, nxt) < 0:
            break
        path.append(nxt)
        left.remove(nxt)
        here = nxt
    while path and beta(path[-1], home) < 0:
        path.pop()
    return path


def order_clusters(ctx: Context, anchor: Cell, rest: list[Cell]) -> Replica:
    """Anchor first, its site's cells next, then sites along the best-connected path, larger
    memory first within a site; cells of unreachable sites are left out."""
    devs = ctx.devices
    by_site: dict[str, list[Cell]] = {}
    for c in rest:
        by_site.setdefault(devs[c[0]].site, []).append(c)
    home = devs[anchor[0]].site
    others = tuple(sorted(set(by_site) - {home}))
    if (home, others) not in ctx.paths:
        ctx.paths[(home, others)] = tuple(_site_path(ctx.net, home, list(others)))
    path = [home, *ctx.paths[(home, others)]]
    order = [anchor]
    for site in path:
        order += sorted(by_site.get(site, []), key=lambda c: (-sum(devs[i].capacity for i in c), c))
    return tuple(order)


def prune(ev: Evaluator, replica: Replica) -> Replica:
    """Drop clusters (last first) while that raises the replica's throughput."""
    best, value = replica, ev.score(replica)
    for c in range(len(replica) - 1, 0, -1):
        trial = best[:c] + best[c + 1 :]
        v = ev.score(trial)
        if v > value:
            best, value = trial, v
    return best


def construct(ctx: Context, ev: Evaluator, replicas: int, size: int) -> list[Replica] | None:
    """A plan with `replicas` replicas from cells of at most `size` devices; None if too few anchors.

    The fastest cleared cells anchor the replicas. Largest memory first, cells go to a replica the
    DP still finds infeasible (the one with least memory, same site preferred); the remaining cells,
    fastest first, join the replica they speed up most (among the slowest and same-site ones) or
    stay on standby. On small boundaries each replica then drops clusters that slow it down.
    """
    devs = ctx.devices
    small = len(devs) <= LOCAL_SEARCH_DEVICES
    cells = make_cells(ctx, list(range(len(devs))), size)
    cleared = sorted(
        (c for c in cells if devs[c[0]].cleared), key=lambda c: (-sum(devs[i].speed for i in c), c)
    )
    if len(cleared) < replicas:
        return None
    anchors = cleared[:replicas]
    taken = set(anchors)
    rest = [c for c in cells if c not in taken]
    members: list[list[Cell]] = [[] for _ in anchors]
    mem = np.array([sum(devs[i].capacity for i in a) for a in anchors])
    site_of = np.array([devs[a[0]].site for a in anchors])
    built = [order_clusters(ctx, a, []) for a in anchors]
    scores = [ev.score(r) for r in built]

    def add(r: int, c: Cell) -> None:
        members[r].append(c)
        mem[r] += sum(devs[i].capacity for i in c)
        built[r] = order_clusters(ctx, anchors[r], members[r])
        scores[r] = ev.score(built[r])

    left = []
    for c in sorted(
        rest, key=lambda c: (-sum(devs[i].capacity for i in c), -sum(devs[i].speed for i in c), c)
    ):
        short = np.array([x <= 0 for x in scores])
        if not short.any():
            left.append(c)
            continue
        pool, here = short, short & (site_of == devs[c[0]].site)
        if here.any():
            pool = here
        add(int(np.flatnonzero(pool)[np.argmin(mem[pool])]), c)
    width = 3 if small else 1
    for c in sorted(left, key=lambda c: (-sum(devs[i].speed for i in c), c)):
        order = np.argsort(scores, kind="stable")[:width].tolist()
        here = [r for r in range(len(anchors)) if site_of[r] == devs[c[0]].site]
        here = sorted(here, key=lambda r: scores[r])[:width]
        best = None
        for r in dict.fromkeys([*order, *here]):
            gain = ev.score(order_clusters(ctx, anchors[r], [*members[r], c])) - scores[r]
            if gain > 1e-9 * max(scores[r], 1.0) and (best is None or gain > best[0]):
                best = (gain, r)
        if best is not None:
            add(best[1], c)
    return [prune(ev, r) for r in built] if small else built


def construct_sequential(ctx: Context, ev: Evaluator, size: int, limit: int | None = None) -> list[Replica]:
    """Open replicas one at a time from the fastest free cleared cell, filling each with free cells
    (its site first, then best-linked sites; largest memory first) until the DP finds it feasible;
    stop when a replica cannot be completed or `limit` is reached. Left-over cells, fastest first,
    join the replica (slowest, or slowest of their site) they speed up most, or stay on standby."""
    devs = ctx.devices
    free = make_cells(ctx, list(range(len(devs))), size)
    cap = {c: sum(devs[i].capacity for i in c) for c in free}
    spd = {c: sum(devs[i].speed for i in c) for c in free}
    anchors: list[Cell] = []
    members: list[list[Cell]] = []
    by_site: dict[str, list[Cell]] = {}
    for c in sorted(free, key=lambda c: (-cap[c], -spd[c], c)):
        by_site.setdefault(devs[c[0]].site, []).append(c)
    used: set[Cell] = set()
    while limit is None or len(anchors) < limit:
        candidates = [c for c in free if devs[c[0]].cleared and c not in used]
        if not candidates:
            break
        anchor = max(candidates, key=lambda c: (spd[c], cap[c], [-i for i in c]))
        home = devs[anchor[0]].site

        def nearness(site: str, home: str = home) -> tuple[bool, float, str]:
            link = ctx.net.link(home, site)
            return (site == home, -1.0 if link is None else link.beta, site)

        chosen: list[Cell] = []
        for site in sorted(by_site, key=nearness, reverse=True):
            for c in by_site[site]:
                if c in used or c == anchor:
                    continue
                if ev.score(order_clusters(ctx, anchor, chosen)) > 0 or len(chosen) + 1 >= ctx.tables.n_units:
                    break
                chosen.append(c)
            if ev.score(order_clusters(ctx, anchor, chosen)) > 0 or len(chosen) + 1 >= ctx.tables.n_units:
                break
        if ev.score(order_clusters(ctx, anchor, chosen)) <= 0:
            break
        anchors.append(anchor)
        members.append(chosen)
        used |= {anchor, *chosen}
        for site in {home} | {devs[x[0]].site for x in chosen}:
            by_site[site] = [c for c in by_site[site] if c not in used]
    if not anchors:
        return []
    built = [order_clusters(ctx, a, m) for a, m in zip(anchors, members, strict=True)]
    return join(ctx, ev, built, [c for c in free if c not in used])


def join(ctx: Context, ev: Evaluator, replicas: list[Replica], free: list[Cell]) -> list[Replica]:
    """Free cells, fastest first, join the replica they speed up most (the slowest one or the
    slowest at their site, anchored by its cluster 0); cells that help none stay on standby."""
    devs = ctx.devices
    built = list(replicas)
    if not built:
        return built
    anchors = [r[0] for r in built]
    members = [list(r[1:]) for r in built]
    scores = [ev.score(r) for r in built]
    site_of = [devs[a[0]].site for a in anchors]
    for c in sorted(free, key=lambda c: (-sum(devs[i].speed for i in c), c)):
        here = sorted(
            (r for r in range(len(anchors)) if site_of[r] == devs[c[0]].site), key=lambda r: scores[r]
        )
        best = None
        for r in dict.fromkeys([int(np.argmin(scores)), *here[:1]]):
            trial = order_clusters(ctx, anchors[r], [*members[r], c])
            gain = ev.score(trial) - scores[r]
            if gain > 1e-9 * max(scores[r], 1.0) and (best is None or gain > best[0]):
                best = (gain, r, trial)
        if best is not None:
            _, r, built[r] = best
            members[r].append(c)
            scores[r] = ev.score(built[r])
    return built


def _memory_need(ctx: Context) -> float:
    """Rough bytes one replica needs: training state plus checkpointed activations of a pipeline."""
    prof = ctx.profile
    tokens = prof.micro_batch * prof.seq_len
    act = sum(u.ckpt_stash if u.kind == "layer" else u.stash for u in ctx.tables.units) * tokens
    return prof.state_bytes + 2 * act + 4 * ctx.settings.overhead_bytes


def _replica_counts(ctx: Context, size: int) -> list[int]:
    """Replica counts worth trying: all up to 12, else a grid up to the anchor and memory limits."""
    devs = ctx.devices
    anchors = len([c for c in make_cells(ctx, list(range(len(devs))), size) if devs[c[0]].cleared])
    by_memory = int(sum(d.capacity for d in devs) // _memory_need(ctx))
    top = max(1, min(anchors, by_memory))
    if top <= 12:
        return list(range(1, top + 1))
    grid, r = {1, 2, 3, 4, top}, 4
    while r < top:
        r = int(r * 1.5) + 1
        grid.add(min(r, top))
    return sorted(grid)


def best_construction(ctx: Context, ev: Evaluator) -> tuple[list[list[Replica]], str]:
    """Try replica counts and cell sizes; return the `RESTARTS` best distinct plans and a note."""
    b = ctx.profile.micro_batch
    small = len(ctx.devices) <= LOCAL_SEARCH_DEVICES
    sizes = sorted(
        {s for s in ((1, 2, 4, b) if small else (1, b) if len(ctx.devices) <= 1000 else (1,)) if s <= b}
    )
    tried: dict[tuple[int, int], float] = {}
    plans: dict[tuple[int, int], list[Replica]] = {}
    for size in sizes:
        built = construct_sequential(ctx, ev, size)
        if built:
            plans[(len(built), size)] = built
            tried[(len(built), size)] = total(ev, built)
        if not small:
            continue
        for r in _replica_counts(ctx, size):
            built = construct(ctx, ev, r, size)
            if built is not None and total(ev, built) > tried.get((r, size), -1.0):
                plans[(r, size)] = built
                tried[(r, size)] = total(ev, built)
    if not tried:
        return [], "no construction was feasible"
    best = max(tried, key=lambda k: (tried[k], -k[0], -k[1]))
    note = (
        f"tried {len(tried)} constructions (replica counts {sorted({k[0] for k in tried})}, cells of "
        f"<= {sizes} devices): best {best[0]} replica(s) from cells of <= {best[1]}, {tried[best]:,.0f} tokens/s"
    )
    ranked, seen = [], set()
    for key in sorted(plans, key=lambda k: (-tried[k], k)):
        canon = tuple(sorted(ev.canonical(r) for r in plans[key]))
        if canon not in seen:
            seen.add(canon)
            ranked.append(plans[key])
    return ranked[:RESTARTS], note


REPLICAS_TRIED = 8  # replicas a group of standby devices is tried in (its site's first, then the slowest)
REPLICAS_TRIED_LARGE = 2  # the same, on boundaries too large for the local search


def placements(
    ctx: Context, ev: Evaluator, replicas: list[Replica], group: list[int]
) -> list[tuple[int | None, Replica, str]]:
    """Ways to put interchangeable standby devices to work: (replica index or None for a new
    replica, the replica with them, what was done). Up to a micro-batch of them as a replica of
    their own (when cleared), in a cluster of their site with room, or as a new cluster at every
    position, in the `REPLICAS_TRIED` replicas of their site or else the slowest."""
    devs, b = ctx.devices, ctx.profile.micro_batch
    d = devs[group[0]]
    cell = tuple(group[:b])
    out: list[tuple[int | None, Replica, str]] = []
    if d.cleared:
        out.append((None, (cell,), f"a replica of their own ({len(cell)} device(s))"))
    order = sorted(
        range(len(replicas)), key=lambda r: (devs[replicas[r][0][0]].site != d.site, ev.score(replicas[r]), r)
    )
    for r in order[: REPLICAS_TRIED if len(devs) <= LOCAL_SEARCH_DEVICES else REPLICAS_TRIED_LARGE]:
        rep = replicas[r]
        for c, cl in enumerate(rep):
            if devs[cl[0]].site == d.site and len(cl) < b and (c > 0 or d.cleared):
                room = cell[: b - len(cl)]
                out.append((r, (*rep[:c], (*cl, *room), *rep[c + 1 :]), f"{len(room)} more in cluster c{c}"))
        for p in range(0 if d.cleared else 1, len(rep) + 1):
            out.append((r, (*rep[:p], cell, *rep[p:]), f"a cluster of {len(cell)} at position {p}"))
    return out


def standby_groups(ctx: Context, standby: list[int]) -> list[list[int]]:
    """Standby devices by site, speed, memory and clearance."""
    devs = ctx.devices
    groups: dict[tuple, list[int]] = {}
    for s in sorted(standby):
        d = devs[s]
        groups.setdefault((d.site, -d.speed, -d.capacity, d.cleared), []).append(s)
    return [groups[k] for k in sorted(groups)]


def use_standby(
    ctx: Context, ev: Evaluator, replicas: list[Replica], standby: list[int], budget: int
) -> list[Replica]:
    """One sweep over the standby groups: each goes where a `placements` option raises throughput
    most, while fewer than `budget` DP runs are spent."""
    replicas = list(replicas)
    stop = ev.evaluations + budget
    for group in standby_groups(ctx, standby):
        if ev.evaluations >= stop:
            break
        options = placements(ctx, ev, replicas, group)
        gains = [(ev.score(t) - (0.0 if r is None else ev.score(replicas[r])), r, t) for r, t, _ in options]
        gain, r, trial = max(gains, key=lambda x: x[0], default=(0.0, None, ()))
        if gain > 1e-9 * max(total(ev, replicas), 1.0):
            if r is None:
                replicas.append(trial)
            else:
                replicas[r] = trial
    return replicas
