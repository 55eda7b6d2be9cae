"""The planner: per boundary, clusters, replicas, layer placement, parallelism, heads and backups.

Per boundary (boundaries never share a pipeline):
1. devices cleared for the boundary's data tier are the only candidates for cluster 0 of a
   replica, which hosts the raw-data stages (embedding input, and the loss head in a U-shaped
   pipeline; a linear pipeline may end on another cleared cluster instead);
2. devices are grouped into cells of one site and similar memory and compute (cell sizes 1, 2,
   4 and the micro-batch are tried); for a number of replicas R, the R fastest cleared cells
   anchor the replicas and the other cells join them, first where memory is short, then where
   compute is lowest, preferring the anchor's site; clusters are ordered from the anchor along
   the best-connected sites, larger memory first (early stages hold more micro-batches);
3. each replica's contiguous layer partition, structure and per-cluster parallelism come from
   the exact DP in `partition` (fractional compute budgets are only the explained baseline);
4. on boundaries of up to `LOCAL_SEARCH_DEVICES` devices a steepest-ascent local search moves
   devices between clusters, replicas and standby, swaps and merges, within an evaluation budget;
5. head per cluster: the most reliable device (then memory, then speed); backups per device: a
   standby that keeps the replica feasible, else shrinking its cluster, else a precomputed
   re-plan of its replica without it, else dropping that replica.
Infeasible boundaries raise `InfeasibleError` naming the failing constraint.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

from echelon.errors import UserError
from echelon.yellowstone import plan as P
from echelon.yellowstone.cost import (
    INF,
    CostSettings,
    Layout,
    Network,
    ReplicaCost,
    Tables,
    calibrate,
    cluster_ranges,
    devices_of,
    evaluate,
    group_cost,
    in_flight,
    make_cluster,
)
from echelon.yellowstone.fleet import GIB, Fleet
from echelon.yellowstone.model_profile import ModelProfile
from echelon.yellowstone.search import Context, Evaluator, Replica

LOCAL_SEARCH_DEVICES = 48
SWAP_DEVICES = 24
SEARCH_EVALUATIONS = 3000
RESTARTS = 4


class InfeasibleError(UserError):
    """No plan exists; `reason` is one of no_cleared_device, model_fits_nowhere,
    raw_stages_fit_nowhere, no_placement."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass
class BoundaryResult:
    replicas: list[Replica]
    standby: list[int]
    explain: list[str]
    evaluator: Evaluator


def _cells(ctx: Context, idx: list[int], size: int) -> list[tuple[int, ...]]:
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


@functools.lru_cache(maxsize=4096)
def _site_path_cached(net: Network, home: str, sites: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_site_path(net, home, list(sites)))


def _site_path(net: Network, home: str, sites: list[str]) -> list[str]:
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


def _order_clusters(ctx: Context, anchor: tuple[int, ...], rest: list[tuple[int, ...]]) -> Replica:
    """Anchor first, its site's cells next, then sites along the best-connected path, larger
    memory first within a site; cells of unreachable sites are left out."""
    devs = ctx.devices
    by_site: dict[str, list[tuple[int, ...]]] = {}
    for c in rest:
        by_site.setdefault(devs[c[0]].site, []).append(c)
    home = devs[anchor[0]].site
    path = [home, *_site_path_cached(ctx.net, home, tuple(sorted(set(by_site) - {home})))]
    order = [anchor]
    for site in path:
        order += sorted(by_site.get(site, []), key=lambda c: (-sum(devs[i].capacity for i in c), c))
    return tuple(order)


def _prune(ev: Evaluator, replica: Replica) -> Replica:
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
    cells = _cells(ctx, list(range(len(devs))), size)
    cleared = sorted(
        (c for c in cells if devs[c[0]].cleared), key=lambda c: (-sum(devs[i].speed for i in c), c)
    )
    if len(cleared) < replicas:
        return None
    anchors = cleared[:replicas]
    taken = set(anchors)
    rest = [c for c in cells if c not in taken]
    members: list[list[tuple[int, ...]]] = [[] for _ in anchors]
    mem = np.array([sum(devs[i].capacity for i in a) for a in anchors])
    site_of = np.array([devs[a[0]].site for a in anchors])
    built = [_order_clusters(ctx, a, []) for a in anchors]
    scores = [ev.score(r) for r in built]

    def add(r: int, c: tuple[int, ...]) -> None:
        members[r].append(c)
        mem[r] += sum(devs[i].capacity for i in c)
        built[r] = _order_clusters(ctx, anchors[r], members[r])
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
            gain = ev.score(_order_clusters(ctx, anchors[r], [*members[r], c])) - scores[r]
            if gain > 1e-9 * max(scores[r], 1.0) and (best is None or gain > best[0]):
                best = (gain, r)
        if best is not None:
            add(best[1], c)
    return [_prune(ev, r) for r in built] if small else built


def construct_sequential(ctx: Context, ev: Evaluator, size: int, limit: int | None = None) -> list[Replica]:
    """Open replicas one at a time from the fastest free cleared cell, filling each with free cells
    (its site first, then best-linked sites; largest memory first) until the DP finds it feasible;
    stop when a replica cannot be completed or `limit` is reached. Left-over cells, fastest first,
    join the replica (slowest, or slowest of their site) they speed up most, or stay on standby."""
    devs = ctx.devices
    free = _cells(ctx, list(range(len(devs))), size)
    cap = {c: sum(devs[i].capacity for i in c) for c in free}
    spd = {c: sum(devs[i].speed for i in c) for c in free}
    anchors: list[tuple[int, ...]] = []
    members: list[list[tuple[int, ...]]] = []
    by_site: dict[str, list[tuple[int, ...]]] = {}
    for c in sorted(free, key=lambda c: (-cap[c], -spd[c], c)):
        by_site.setdefault(devs[c[0]].site, []).append(c)
    used: set[tuple[int, ...]] = set()
    while limit is None or len(anchors) < limit:
        candidates = [c for c in free if devs[c[0]].cleared and c not in used]
        if not candidates:
            break
        anchor = max(candidates, key=lambda c: (spd[c], cap[c], [-i for i in c]))
        home = devs[anchor[0]].site

        def nearness(site: str, home: str = home) -> tuple[bool, float, str]:
            link = ctx.net.link(home, site)
            return (site == home, -1.0 if link is None else link.beta, site)

        chosen: list[tuple[int, ...]] = []
        for site in sorted(by_site, key=nearness, reverse=True):
            for c in by_site[site]:
                if c in used or c == anchor:
                    continue
                if ev.score(_order_clusters(ctx, anchor, chosen)) > 0:
                    break
                chosen.append(c)
            if ev.score(_order_clusters(ctx, anchor, chosen)) > 0:
                break
        if ev.score(_order_clusters(ctx, anchor, chosen)) <= 0:
            break
        anchors.append(anchor)
        members.append(chosen)
        used |= {anchor, *chosen}
        for site in {home} | {devs[x[0]].site for x in chosen}:
            by_site[site] = [c for c in by_site[site] if c not in used]
    free = [c for c in free if c not in used]
    if not anchors:
        return []
    built = [_order_clusters(ctx, a, m) for a, m in zip(anchors, members, strict=True)]
    scores = [ev.score(r) for r in built]
    site_of = [devs[a[0]].site for a in anchors]
    for c in sorted(free, key=lambda c: (-spd[c], c)):
        here = sorted(
            (r for r in range(len(anchors)) if site_of[r] == devs[c[0]].site), key=lambda r: scores[r]
        )
        best = None
        for r in dict.fromkeys([int(np.argmin(scores)), *here[:1]]):
            trial = _order_clusters(ctx, anchors[r], [*members[r], c])
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
    act = sum(u.ckpt_stash if u.kind == "layer" else u.stash for u in prof.units) * tokens
    return prof.state_bytes + 2 * act + 4 * ctx.settings.overhead_bytes


def _total(ev: Evaluator, replicas: list[Replica]) -> float:
    return sum(ev.score(r) for r in replicas)


def _replica_counts(ctx: Context, size: int) -> list[int]:
    """Replica counts worth trying: all up to 12, else a grid up to the anchor and memory limits."""
    devs = ctx.devices
    anchors = len([c for c in _cells(ctx, list(range(len(devs))), size) if devs[c[0]].cleared])
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
            tried[(len(built), size)] = _total(ev, built)
        if not small:
            continue
        for r in _replica_counts(ctx, size):
            built = construct(ctx, ev, r, size)
            if built is not None and _total(ev, built) > tried.get((r, size), -1.0):
                plans[(r, size)] = built
                tried[(r, size)] = _total(ev, built)
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


def _moves(ev: Evaluator, replicas: list[Replica], standby: set[int]):
    """Candidate moves: (indices of replaced replicas, new replicas, devices freed, devices taken)."""
    ctx = ev.ctx
    devs, cap = ctx.devices, ctx.profile.micro_batch
    where: dict[int, tuple[int, int]] = {}
    for r, rep in enumerate(replicas):
        for c, cl in enumerate(rep):
            for i in cl:
                where[i] = (r, c)

    def inserts(rep: Replica, d: int):
        site = devs[d].site
        for c, cl in enumerate(rep):
            if len(cl) < cap and devs[cl[0]].site == site and (c > 0 or devs[d].cleared):
                yield (*rep[:c], (*cl, d), *rep[c + 1 :])
        for p in range(0 if devs[d].cleared else 1, len(rep) + 1):
            yield (*rep[:p], (d,), *rep[p:])

    for d in range(len(devs)):
        if d in standby:
            base_idx, base, freed = (), {}, set()
        else:
            r, c = where[d]
            cl = tuple(i for i in replicas[r][c] if i != d)
            if cl:
                shrunk = (*replicas[r][:c], cl, *replicas[r][c + 1 :])
            elif c > 0:
                shrunk = (*replicas[r][:c], *replicas[r][c + 1 :])
            else:
                shrunk = None
            base_idx, base = (r,), {r: shrunk}
            freed = {i for x in replicas[r] for i in x if i != d} if shrunk is None else set()
        taken = {d} if d in standby else set()
        if d not in standby:
            yield base_idx, [x for x in base.values() if x], freed | {d}, taken
        if devs[d].cleared:
            yield base_idx, [*[x for x in base.values() if x], ((d,),)], freed, taken
        for r2, rep in enumerate(replicas):
            cur = base.get(r2, rep)
            if cur is None:
                continue
            for new in inserts(cur, d):
                others = [x for k, x in base.items() if k != r2 and x]
                yield tuple(sorted({*base_idx, r2})), [*others, new], freed, taken
    if len(devs) <= SWAP_DEVICES:
        yield from _swaps(replicas, standby, where, devs)
    for r, rep in enumerate(replicas):
        for p in range(len(rep)):
            for q in range(p + 1, len(rep)):
                if p == 0 and not all(devs[i].cleared for i in rep[q]):
                    continue
                swapped = list(rep)
                swapped[p], swapped[q] = swapped[q], swapped[p]
                yield (r,), [tuple(swapped)], set(), set()
        yield (r,), [], {i for c in rep for i in c}, set()
        for r2, rep2 in enumerate(replicas):
            if r2 != r:
                yield tuple(sorted((r, r2))), [rep + rep2], set(), set()


def _swaps(replicas: list[Replica], standby: set[int], where: dict[int, tuple[int, int]], devs):
    """Exchange two devices (either may be on standby); invalid results score zero."""
    for d in range(len(devs)):
        for e in range(d + 1, len(devs)):
            if d in standby and e in standby:
                continue
            if d in where and e in where and where[d][0] == where[e][0] and where[d][1] == where[e][1]:
                continue
            swap = {d: e, e: d}
            touched = sorted({where[x][0] for x in (d, e) if x in where})
            new = [tuple(tuple(swap.get(i, i) for i in c) for c in replicas[r]) for r in touched]
            freed = {x for x in (d, e) if x in where and swap[x] in standby}
            taken = {x for x in (d, e) if x in standby}
            yield tuple(touched), new, freed, taken


def _apply(replicas: list[Replica], standby: set[int], move) -> tuple[list[Replica], set[int]]:
    old, new, freed, taken = move
    return [r for i, r in enumerate(replicas) if i not in old] + list(new), (standby | freed) - taken


def _climb(ev: Evaluator, replicas: list[Replica], standby: set[int], budget: int, keep: int = 0):
    """Steepest ascent over `_moves` until no move helps or `budget` DP runs are spent.

    Returns the local optimum and, when `keep` > 0, the `keep` best non-improving moves seen at it.
    """
    scores = [ev.score(r) for r in replicas]
    while True:
        total = sum(scores)
        best, runners = None, []
        for move in _moves(ev, replicas, standby):
            gain = sum(ev.score(x) for x in move[1]) - sum(scores[i] for i in move[0])
            if gain > 1e-9 * max(total, 1.0) and (best is None or gain > best[0]):
                best = (gain, move)
            elif keep:
                runners.append((gain, len(runners), move))
            if ev.evaluations >= budget:
                break
        if best is None or ev.evaluations >= budget:
            runners.sort(key=lambda x: (-x[0], x[1]))
            if best is not None:
                replicas, standby = _apply(replicas, standby, best[1])
            return replicas, standby, [m for _, _, m in runners[:keep]]
        replicas, standby = _apply(replicas, standby, best[1])
        scores = [ev.score(r) for r in replicas]


def local_search(ev: Evaluator, replicas: list[Replica], standby: set[int], budget: int, kicks: int = 6):
    """Steepest ascent, then escapes: from a local optimum, take one of its `kicks` least bad moves
    and climb again; accept the first escape that ends higher. Stops when `budget` DP runs are spent."""
    replicas, standby, runners = _climb(ev, list(replicas), set(standby), budget, kicks)
    improved = True
    while improved and ev.evaluations < budget:
        improved = False
        for move in runners:
            trial, spare, next_runners = _climb(ev, *_apply(replicas, standby, move), budget, kicks)
            if _total(ev, trial) > _total(ev, replicas) * (1 + 1e-9):
                replicas, standby, runners, improved = trial, spare, next_runners, True
                break
            if ev.evaluations >= budget:
                break
    return replicas, standby


def diagnose(ctx: Context, data_tier: str) -> InfeasibleError:
    """Explain why a boundary has no feasible plan, naming the first failing constraint."""
    devs, prof, s = ctx.devices, ctx.profile, ctx.settings
    b = ctx.boundary
    if not any(d.cleared for d in devs):
        tiers = ", ".join(sorted({f"{d.id}" for d in devs})[:8])
        return InfeasibleError(
            "no_cleared_device",
            f"boundary {b}: no device is cleared for its data tier {data_tier!r}, so no device may run the "
            f"raw-data stages (embedding input, loss labels); devices: {tiers}. Raise a device's "
            "access_tier or lower the boundary's data_tier in the fleet file.",
        )
    usable = sum(d.capacity - s.overhead_bytes for d in devs)
    if usable < prof.state_bytes:
        return InfeasibleError(
            "model_fits_nowhere",
            f"boundary {b}: the model fits nowhere: {prof.name} ({prof.trainable}) needs "
            f"{prof.state_bytes / GIB:,.1f} GiB of training state even fully sharded, but the boundary's "
            f"{len(devs)} devices have {usable / GIB:,.1f} GiB usable. Use LoRA, a smaller model, or add devices.",
        )
    n = ctx.tables.n_units
    raw_ok = False
    for site in {d.site for d in devs if d.cleared}:
        group = sorted((d for d in devs if d.cleared and d.site == site), key=lambda d: -d.capacity)
        cl = make_cluster(tuple(group[: prof.micro_batch]), ctx.lans[site], prof)
        seg = ctx.tables.segment([(0, 1, 1), (n - 1, n, 1)])
        g, _, _ = group_cost(cl, seg, 0.0, s, prof.seq_len)
        raw_ok |= float(g) < INF
    if not raw_ok:
        head = prof.units[-1].stash * prof.micro_batch * prof.seq_len
        return InfeasibleError(
            "raw_stages_fit_nowhere",
            f"boundary {b}: the raw-data stages (embedding and loss head, {head / GIB:,.1f} GiB of "
            f"activations at micro-batch {prof.micro_batch} x {prof.seq_len} tokens) fit on no group of "
            f"devices cleared for {data_tier!r}. Lower --micro-batch or --seq-len, or clear a larger device.",
        )
    return InfeasibleError(
        "no_placement",
        f"boundary {b}: no placement fits every device's memory (or the cleared devices' sites have no "
        f"link to the others): {prof.name} needs {prof.state_bytes / GIB:,.1f} GiB of training state. "
        "Lower --micro-batch or --seq-len, use LoRA, or add devices or links.",
    )


def plan_boundary(ctx: Context, data_tier: str, budget: int = SEARCH_EVALUATIONS) -> BoundaryResult:
    """Search one boundary's plan; raise InfeasibleError when nothing trains."""
    ev = Evaluator(ctx)
    if not any(d.cleared for d in ctx.devices):
        raise diagnose(ctx, data_tier)
    starts, note = best_construction(ctx, ev)
    explain = [note]
    everyone = set(range(len(ctx.devices)))
    replicas = starts[0] if starts else []
    standby = everyone - {i for r in replicas for c in r for i in c}
    if starts and len(ctx.devices) <= LOCAL_SEARCH_DEVICES:
        before = _total(ev, replicas)
        stop = ev.evaluations + budget
        for k, start in enumerate(starts):
            share = ev.evaluations + (stop - ev.evaluations) // (len(starts) - k)
            found = local_search(ev, start, everyone - {i for r in start for c in r for i in c}, share)
            if _total(ev, found[0]) > _total(ev, replicas) * (1 + 1e-9):
                replicas, standby = found
        after = _total(ev, replicas)
        if after > before * (1 + 1e-6):
            gain = f"+{(after / before - 1) * 100:.1f}%" if before > 0 else "made it feasible"
            explain.append(
                f"local search from {len(starts)} starts over moves, swaps and merges: {gain} ({after:,.0f} tokens/s)"
            )
    feasible = [r for r in replicas if ev.score(r) > 0]
    standby |= {i for r in replicas if ev.score(r) == 0 for c in r for i in c}
    if not feasible:
        raise diagnose(ctx, data_tier)
    return BoundaryResult([ev.canonical(r) for r in feasible], sorted(standby), explain, ev)


def _label(profile: ModelProfile, i: int, j: int) -> str:
    units = profile.units[i:j]
    parts = []
    layers = [int(u.name.split()[1]) for u in units if u.kind == "layer"]
    if units and units[0].kind == "embed":
        parts.append("embed")
    if layers:
        parts.append(f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}")
    if units and units[-1].kind == "head":
        parts.append("head")
    return " + ".join(parts)


def replica_plan(
    rid: str, layout: Layout, cost: ReplicaCost, tables: Tables, net: Network, settings: CostSettings
) -> P.ReplicaPlan:
    """The plan.json form of one evaluated replica."""
    prof, m, n = tables.profile, settings.micro_batches, tables.n_units
    k = len(layout.clusters)
    clusters = []
    for c, cl in enumerate(layout.clusters):
        head = max(cl.devices, key=lambda d: (d.reliability, d.capacity, d.speed, d.id))
        clusters.append(
            P.ClusterPlan(
                id=f"{rid}/c{c}",
                site=cl.site,
                devices=[d.id for d in cl.devices],
                shares=list(cl.shares),
                head=head.id,
                parallelism=cost.modes[c],
                raw_data=c == 0 or (layout.structure == "linear" and c == k - 1),
                memory_bytes={d.id: cost.device_memory[d.id] for d in cl.devices},
                capacity_bytes={d.id: d.capacity for d in cl.devices},
            )
        )
    order = list(range(k)) + ([0] if layout.structure == "U" else [])
    ranges = [*layout.cuts, (n - 1, n)] if layout.structure == "U" else list(layout.cuts)
    fl = in_flight(layout.structure, k, m)
    stages = [
        P.StagePlan(
            index=s,
            cluster=clusters[c].id,
            units=ranges[s],
            label=_label(prof, *ranges[s]),
            in_flight=fl[s],
            raw_data=any(u.raw_data for u in prof.units[ranges[s][0] : ranges[s][1]]),
            seconds_per_micro_batch=cost.stage_s[s],
        )
        for s, c in enumerate(order)
    ]
    p2p = prof.micro_batch * prof.seq_len * prof.activation_bytes
    edges = []
    for s in range(len(order) - 1):
        a, b = layout.clusters[order[s]].site, layout.clusters[order[s + 1]].site
        link = net.link(a, b)
        assert link is not None
        edges.append(
            P.EdgePlan(
                src_stage=s,
                dst_stage=s + 1,
                src_site=a,
                dst_site=b,
                bandwidth_gbps=link.beta * 8 / 1e9,
                latency_ms=link.alpha * 1000,
                bytes_per_micro_batch=p2p,
            )
        )
    predicted = P.Predicted(
        step_s=cost.step_s,
        tokens_per_s=cost.tokens_per_s,
        tokens_per_step=m * prof.micro_batch * prof.seq_len,
        bubble_fraction=cost.bubble,
        link_bytes_per_step=cost.link_bytes,
    )
    return P.ReplicaPlan(
        id=rid, structure=layout.structure, micro_batch=prof.micro_batch, micro_batches=m, clusters=clusters,
        stages=stages, edges=edges, predicted=predicted,
    )  # fmt: skip


def _backups(ctx: Context, ev: Evaluator, result: BoundaryResult, rids: list[str]) -> list[P.Backup]:
    """One backup per used device: standby, shrink, re-plan, or drop its replica."""
    devs = ctx.devices
    scores = [ev.score(r) for r in result.replicas]
    total = sum(scores)
    out = []
    for r, rep in enumerate(result.replicas):
        for c, cl in enumerate(rep):
            for d in cl:
                rest = total - scores[r]
                dev = devs[d]
                best_sb: tuple[float, int] | None = None
                candidates = sorted(
                    (s for s in result.standby if devs[s].site == dev.site and (devs[s].cleared or c != 0)),
                    key=lambda s: (-devs[s].capacity, -devs[s].speed, s),
                )[:3]
                for s in candidates:
                    swapped = tuple(tuple(s if i == d else i for i in x) for x in rep)
                    v = ev.score(swapped)
                    if v > 0 and (best_sb is None or v > best_sb[0]):
                        best_sb = (v, s)
                if best_sb is not None:
                    out.append(P.Backup(device=dev.id, kind="standby", replica=rids[r], standby=devs[best_sb[1]].id,
                                        tokens_per_s_after=rest + best_sb[0]))  # fmt: skip
                    continue
                shrunk = tuple(x for x in (tuple(i for i in y if i != d) for y in rep) if x)
                if len(cl) > 1 and ev.score(shrunk) > 0:
                    kind, replacement = "shrink", shrunk
                else:
                    options = [shrunk, _replan(ev, rep, d)]
                    kind, replacement = "replan", max(options, key=lambda x: ev.score(x) if x else 0.0)
                    if not replacement or ev.score(replacement) <= 0:
                        replacement = None
                if replacement is None:
                    out.append(
                        P.Backup(device=dev.id, kind="drop_replica", replica=rids[r], tokens_per_s_after=rest)
                    )
                    continue
                layout = ev.layout(replacement)
                cost = evaluate(layout, ctx.tables, ctx.net, ctx.settings)
                assert cost is not None
                rp = replica_plan(rids[r], layout, cost, ctx.tables, ctx.net, ctx.settings)
                out.append(P.Backup(device=dev.id, kind=kind, replica=rids[r], replacement=rp,
                                    tokens_per_s_after=rest + cost.tokens_per_s))  # fmt: skip
    return out


def _replan(ev: Evaluator, rep: Replica, lost: int) -> Replica | None:
    """Re-plan a replica whose cluster 0 lost its only device: another of its cleared devices
    becomes cluster 0 (the best such choice), the layer split is solved again."""
    devs = ev.ctx.devices
    rest = [tuple(i for i in c if i != lost) for c in rep]
    best: tuple[float, Replica] | None = None
    for d in sorted(i for c in rest for i in c if devs[i].cleared):
        trial = ((d,), *(x for x in (tuple(i for i in c if i != d) for c in rest) if x))
        v = ev.score(trial)
        if v > 0 and (best is None or v > best[0]):
            best = (v, trial)
    return None if best is None else best[1]


def plan_fleet(
    fleet: Fleet,
    profile: ModelProfile,
    settings: CostSettings | None = None,
    budget: int = SEARCH_EVALUATIONS,
) -> P.Plan:
    """Plan every boundary of `fleet` for `profile`; raise InfeasibleError if one cannot train."""
    from echelon.yellowstone.verify import check_plan

    settings = settings or CostSettings()
    eta = calibrate(fleet, profile)
    tables, net = Tables(profile), Network(fleet)
    boundaries, explain, failures = [], [], []
    for b in fleet.boundaries:
        devs = devices_of(fleet, b.id, settings, eta)
        if not devs:
            explain.append(f"boundary {b.id}: no devices, nothing to plan")
            continue
        ctx = Context(b.id, devs, tables, net, settings, profile)
        try:
            result = plan_boundary(ctx, b.data_tier, budget)
        except InfeasibleError as e:
            failures.append(e)
            continue
        ev = result.evaluator
        cleared = [d.id for d in devs if d.cleared]
        explain.append(
            f"boundary {b.id}: {len(cleared)} of {len(devs)} devices are cleared for {b.data_tier!r}; only they "
            "may host cluster 0 (embedding input) and the head (loss labels)"
        )
        explain.extend(f"boundary {b.id}: {line}" for line in result.explain)
        rids = [f"{b.id}/r{r}" for r in range(len(result.replicas))]
        replicas = []
        for rid, rep in zip(rids, result.replicas, strict=True):
            layout = ev.layout(rep)
            cost = evaluate(layout, tables, net, settings)
            assert cost is not None
            replicas.append(replica_plan(rid, layout, cost, tables, net, settings))
            explain.extend(_explain_replica(ctx, rid, layout, cost))
        if result.standby:
            explain.append(
                f"boundary {b.id}: standby {', '.join(devs[i].id for i in result.standby)}: adding them to a "
                "replica did not raise throughput (or broke a memory limit); they back up failed devices"
            )
        boundaries.append(
            P.BoundaryPlan(
                id=b.id,
                data_tier=b.data_tier,
                replicas=replicas,
                standby=[devs[i].id for i in result.standby],
                backups=_backups(ctx, ev, result, rids),
                tokens_per_s=sum(r.predicted.tokens_per_s for r in replicas),
            )
        )
    if failures:
        if len(failures) == 1:
            raise failures[0]
        raise InfeasibleError(failures[0].reason, "\n".join(str(e) for e in failures))
    plan = P.Plan(
        fleet=fleet.name,
        model=model_info(profile),
        settings=P.Settings(
            micro_batches=settings.micro_batches,
            memory_headroom=settings.memory_headroom,
            overhead_bytes=settings.overhead_bytes,
            calibration={k: v for k, v in eta.items() if v != 1.0},
        ),
        boundaries=boundaries,
        tokens_per_s=sum(b.tokens_per_s for b in boundaries),
        checks=[],
        explain=explain,
    )
    plan.checks = check_plan(plan, fleet, profile)
    return plan


def model_info(profile: ModelProfile) -> P.ModelInfo:
    s = profile.shape
    return P.ModelInfo(
        name=profile.name, source=profile.source, trainable=profile.trainable, dtype=profile.dtype, seq_len=profile.seq_len,
        micro_batch=profile.micro_batch, lora_rank=profile.lora_rank, hidden=s.hidden, layers=s.layers,
        vocab=s.vocab,
        units=[
            P.UnitInfo(name=u.name, kind=u.kind, params=u.params, trainable=u.trainable, flops_per_token=u.flops,
                       stash_bytes_per_token=u.stash, raw_data=u.raw_data)
            for u in profile.units
        ],
    )  # fmt: skip


def _explain_replica(ctx: Context, rid: str, layout: Layout, cost: ReplicaCost) -> list[str]:
    """Why this structure, split and parallelism (compared with fractional compute budgets)."""
    _prof, n = ctx.profile, ctx.tables.n_units
    out = []
    if layout.structure == "U":
        out.append(f"{rid}: U-shaped: the head (loss labels) folds back into cluster 0, the cleared cluster")
    elif layout.structure == "linear":
        out.append(f"{rid}: linear: the last cluster is cleared too, so it hosts the head")
    else:
        out.append(f"{rid}: one cluster holds the whole model, no pipeline needed")
    if len(layout.clusters) > 1:
        speeds = np.array([sum(d.speed for d in cl.devices) for cl in layout.clusters])
        budget = _fractional_cuts(ctx, layout, speeds)
        base = evaluate(Layout(layout.clusters, layout.structure, budget), ctx.tables, ctx.net, ctx.settings)
        was = "does not fit memory" if base is None else f"would take {base.step_s:.3f} s per step"
        out.append(
            f"{rid}: layers split by fractional compute budgets {budget} {was}; the DP refined it to "
            f"{layout.cuts} at {cost.step_s:.3f} s (bubble {cost.bubble:.0%})"
        )
    for c, (cl, ranges) in enumerate(
        zip(layout.clusters, cluster_ranges(layout, ctx.settings.micro_batches, n), strict=True)
    ):
        mode = cost.modes[c]
        seg = ctx.tables.segment(ranges)
        smallest = min(d.capacity for d in cl.devices)
        why = {
            "DDP": "its stages fit the smallest device, so each device holds a full copy",
            "DDP+ckpt": "weights fit each device but activations of the in-flight micro-batches only with checkpointing",
            "FSDP": "its stages do not fit the smallest device, so weights and optimizer state are sharded",
            "FSDP+ckpt": "sharded, and activations fit only with checkpointing",
        }[mode]
        out.append(
            f"{rid}/c{c} ({cl.site}, {cl.n} device(s)): {mode}: {why} (state {float(seg.state) / GIB:,.1f} GiB, "
            f"smallest device {smallest / GIB:,.1f} GiB usable); micro-batch shares {list(cl.shares)} by speed"
        )
    return out


def _fractional_cuts(ctx: Context, layout: Layout, speeds: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Cut units so each cluster's FLOPs share matches its share of compute."""
    n = ctx.tables.n_units
    end = n - 1 if layout.structure == "U" else n
    flops = np.array([u.flops for u in ctx.profile.units[:end]])
    cum = np.concatenate([[0.0], np.cumsum(flops)]) / max(flops.sum(), 1e-30)
    targets = np.cumsum(speeds)[:-1] / speeds.sum()
    cuts, start = [], 0
    for k, t in enumerate(targets):
        j = int(np.clip(np.searchsorted(cum, t), start + 1, end - (len(speeds) - 1 - k)))
        cuts.append((start, j))
        start = j
    cuts.append((start, end))
    return tuple(cuts)
