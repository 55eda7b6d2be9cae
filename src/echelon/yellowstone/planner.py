"""The planner: per boundary, replicas of clusters with their layer split, heads and backups.

Per boundary (boundaries never share a pipeline):
1. devices cleared for the boundary's data tier are the only candidates for cluster 0 of a
   replica, which hosts the raw-data stages (embedding input, and the loss head in a U-shaped
   pipeline; a linear pipeline may end on another cleared cluster instead);
2. candidate plans: the constructions of `construct` (several replica counts and cell sizes),
   improved by the local search of `search` on boundaries of up to `LOCAL_SEARCH_DEVICES`
   devices (also from random starts up to `RANDOM_START_DEVICES`); plans of sub-fleets,
   decomposed explicitly: each group of sites with routes between them, and one of k equal
   copies where the fleet splits evenly into copies;
3. `packing` combines the candidates' replicas (a sub-fleet's plan k times over, replicas of
   different constructions) by an integer program solved by HiGHS, never below the best
   candidate; left-over devices join the replica they speed up most, or stay on standby;
4. each replica's layer split, structure and per-cluster parallelism come from the exact DP in
   `partition`; replicas crossing the same link share it (`sharing`);
5. head per cluster: the most reliable device (then memory, then speed); backups per device in
   `backups`; reasons in `explain`.
A boundary without a feasible plan is refused alone (`Plan.refused` names it and why); only when
every boundary is refused does planning fail, with `InfeasibleError` naming the constraint.
"""

from __future__ import annotations

from dataclasses import dataclass

from echelon.errors import UserError
from echelon.yellowstone import plan as P
from echelon.yellowstone.backups import backups
from echelon.yellowstone.construct import best_construction, join, make_cells, use_standby
from echelon.yellowstone.cost import (
    INF,
    CostSettings,
    Tables,
    devices_of,
    group_cost,
    make_cluster,
    rates,
)
from echelon.yellowstone.emit import model_info, replica_plan
from echelon.yellowstone.explain import explain_replica, explain_standby
from echelon.yellowstone.fleet import GIB, Fleet
from echelon.yellowstone.model_profile import ModelProfile
from echelon.yellowstone.network import Network
from echelon.yellowstone.packing import Classes, copies, pack, sub_fleet
from echelon.yellowstone.search import (
    LOCAL_SEARCH_DEVICES,
    RANDOM_START_DEVICES,
    RANDOM_STARTS,
    SEARCH_EVALUATIONS,
    Context,
    Evaluator,
    Memo,
    Replica,
    local_search,
    random_starts,
    total,
)
from echelon.yellowstone.sharing import share_links
from echelon.yellowstone.verify import check_plan

COPY_PLANS = 3  # at most this many copy counts k are planned as sub-fleets
STANDBY_EVALUATIONS = 200  # DP runs spent putting standby devices to work on large boundaries


class InfeasibleError(UserError):
    """No plan exists for `boundary`; `reason` is one of no_cleared_device, model_fits_nowhere,
    raw_stages_fit_nowhere, no_placement."""

    def __init__(self, reason: str, message: str, boundary: str = "") -> None:
        self.reason = reason
        self.boundary = boundary
        super().__init__(message)


@dataclass
class BoundaryResult:
    replicas: list[Replica]
    standby: list[int]
    explain: list[str]
    evaluator: Evaluator


def diagnose(ctx: Context, data_tier: str) -> InfeasibleError:
    """Explain why a boundary has no feasible plan, naming the first failing constraint."""
    reason, message = _first_failure(ctx, data_tier)
    return InfeasibleError(reason, f"boundary {ctx.boundary}: {message}", ctx.boundary)


def _first_failure(ctx: Context, data_tier: str) -> tuple[str, str]:
    devs, prof, s = ctx.devices, ctx.profile, ctx.settings
    if not any(d.cleared for d in devs):
        names = ", ".join(sorted(d.id for d in devs)[:8]) + (" ..." if len(devs) > 8 else "")
        return "no_cleared_device", (
            f"no device is cleared for its data tier {data_tier!r}, so no device may run the raw-data stages "
            f"(embedding input, loss labels); devices: {names}. Raise a device's access_tier or lower the "
            "boundary's data_tier in the fleet file."
        )
    usable = sum(d.capacity - s.overhead_bytes for d in devs)
    if usable < prof.state_bytes:
        return "model_fits_nowhere", (
            f"the model fits nowhere: {prof.name} ({prof.trainable}) needs {prof.state_bytes / GIB:,.1f} GiB of "
            f"training state even fully sharded, but the boundary's {len(devs)} devices have "
            f"{usable / GIB:,.1f} GiB usable. Use LoRA, a smaller model, or add devices."
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
        head = ctx.tables.units[-1].stash * prof.micro_batch * prof.seq_len
        return "raw_stages_fit_nowhere", (
            f"the raw-data stages (embedding and loss head, {head / GIB:,.1f} GiB of activations at micro-batch "
            f"{prof.micro_batch} x {prof.seq_len} tokens) fit on no group of devices cleared for {data_tier!r}. "
            "Lower --micro-batch or --seq-len, or clear a larger device."
        )
    return "no_placement", (
        "no placement fits every device's memory (or the cleared devices' sites have no route to the "
        f"others): {prof.name} needs {prof.state_bytes / GIB:,.1f} GiB of training state. Lower "
        "--micro-batch or --seq-len, use LoRA, or add devices or links."
    )


def _site_groups(ctx: Context) -> list[list[int]]:
    """Devices by group of sites joined by routes (replicas never span two groups)."""
    sites = sorted({d.site for d in ctx.devices})
    parent = {s: s for s in sites}

    def root(s: str) -> str:
        while parent[s] != s:
            s = parent[s]
        return s

    for i, a in enumerate(sites):
        for b in sites[i + 1 :]:
            if ctx.net.link(a, b) is not None:
                parent[root(b)] = root(a)
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(ctx.devices):
        groups.setdefault(root(d.site), []).append(i)
    return sorted(groups.values())


def _sub_plan(ctx: Context, ev: Evaluator, idx: list[int], data_tier: str, budget: int) -> list[Replica]:
    """Plan the devices `idx` alone (no further decomposition); their replicas in ctx's indices."""
    sub = Context(ctx.boundary, [ctx.devices[i] for i in idx], ctx.tables, ctx.net, ctx.settings, ctx.profile,
                  ctx.lans, ctx.paths)  # fmt: skip
    try:
        found = plan_boundary(sub, data_tier, budget, ev.memo, decompose=False)
    except InfeasibleError:
        return []
    return [tuple(tuple(idx[i] for i in c) for c in r) for r in found.replicas]


def plan_boundary(
    ctx: Context,
    data_tier: str,
    budget: int = SEARCH_EVALUATIONS,
    memo: Memo | None = None,
    decompose: bool = True,
) -> BoundaryResult:
    """Search one boundary's plan; raise InfeasibleError when nothing trains."""
    ev = Evaluator(ctx, memo)
    if not any(d.cleared for d in ctx.devices):
        raise diagnose(ctx, data_tier)
    everyone = set(range(len(ctx.devices)))
    starts, note = best_construction(ctx, ev)
    explain = [note]
    candidates = list(starts)
    if len(ctx.devices) <= LOCAL_SEARCH_DEVICES:
        before = total(ev, starts[0]) if starts else 0.0
        phases = [
            ([(start, everyone - {i for r in start for c in r for i in c}) for start in starts], budget)
        ]
        if decompose and len(ctx.devices) <= RANDOM_START_DEVICES:  # random starts, a budget of their own
            phases.append((random_starts(ctx, RANDOM_STARTS), budget // 2))
        best: list[Replica] = starts[0] if starts else []
        for origins, allowance in phases:
            stop = ev.evaluations + allowance
            for k, (start, spare) in enumerate(origins):
                found, _ = local_search(
                    ev, start, spare, ev.evaluations + (stop - ev.evaluations) // (len(origins) - k)
                )
                candidates.append(found)
                if total(ev, found) > total(ev, best) * (1 + 1e-9):
                    best = found
        after = total(ev, best)
        if after > before * (1 + 1e-6):
            gain = f"+{(after / before - 1) * 100:.1f}%" if before > 0 else "made it feasible"
            explain.append(
                f"local search from {sum(len(o) for o, _ in phases)} starts ({len(starts)} constructions) over "
                f"moves, swaps and merges: {gain} ({after:,.0f} tokens/s)"
            )
    if decompose:
        groups = _site_groups(ctx)
        if len(groups) > 1:
            union = [r for g in groups for r in _sub_plan(ctx, ev, g, data_tier, budget)]
            candidates.append(union)
            explain.append(
                f"decomposed into {len(groups)} groups of sites without routes between them, planned apart: "
                f"{total(ev, union):,.0f} tokens/s"
            )
        classes = Classes.of_context(ctx)
        for k in copies(classes, LOCAL_SEARCH_DEVICES)[:COPY_PLANS]:
            one = _sub_plan(ctx, ev, sub_fleet(classes, k), data_tier, budget)
            candidates.append(one)
            explain.append(
                f"the boundary splits into {k} equal copies of {len(ctx.devices) // k} devices: "
                + (
                    f"one copy's plan gives {total(ev, one):,.0f} tokens/s, {k} x that = {k * total(ev, one):,.0f}"
                    if one
                    else "one copy alone cannot train"
                )
            )
    packed = pack(ev, candidates)
    if all(sorted(packed) != sorted(plan) for plan in candidates):
        used = {i for r in packed for c in r for i in c}
        packed = join(ctx, ev, packed, make_cells(ctx, sorted(everyone - used), 1))
    best_candidate = max(candidates, key=lambda plan: total(ev, plan), default=[])
    if total(ev, packed) > total(ev, best_candidate) * (1 + 1e-9):
        explain.append(
            f"packing {len(candidates)} candidate plans' replicas (integer program, HiGHS) and joining left-over "
            f"devices: {total(ev, packed):,.0f} tokens/s over the best single candidate's {total(ev, best_candidate):,.0f}"
        )
    replicas = packed if total(ev, packed) >= total(ev, best_candidate) else best_candidate
    replicas = [r for r in replicas if ev.score(r) > 0]
    before = total(ev, replicas)
    small = len(ctx.devices) <= LOCAL_SEARCH_DEVICES
    spare = sorted(everyone - {i for r in replicas for c in r for i in c})
    replicas = use_standby(ctx, ev, replicas, spare, budget // 3 if small else STANDBY_EVALUATIONS)
    if total(ev, replicas) > before * (1 + 1e-9):
        explain.append(
            f"standby devices put to work as whole clusters: {total(ev, replicas):,.0f} tokens/s (was {before:,.0f})"
        )
    feasible = [ev.canonical(r) for r in replicas]
    if not feasible:
        raise diagnose(ctx, data_tier)
    standby = sorted(everyone - {i for r in feasible for c in r for i in c})
    return BoundaryResult(feasible, standby, explain, ev)


def plan_fleet(
    fleet: Fleet,
    profile: ModelProfile,
    settings: CostSettings | None = None,
    budget: int = SEARCH_EVALUATIONS,
) -> P.Plan:
    """Plan every boundary of `fleet` for `profile`.

    A boundary that cannot be planned is listed in `Plan.refused` and the others are planned;
    InfeasibleError only when no boundary can be planned.
    """
    settings = settings or CostSettings()
    eta, *measured = rates(fleet, profile)
    tables = Tables(profile)
    net = Network(fleet, profile.micro_batch * profile.seq_len * profile.activation_bytes)
    explain: list[str] = []
    refused: list[InfeasibleError] = []
    planned: list[tuple[str, Context, BoundaryResult]] = []
    for b in fleet.boundaries:
        devs = devices_of(fleet, b.id, settings, eta, *measured)
        if not devs:
            explain.append(f"boundary {b.id}: no devices, nothing to plan")
            continue
        ctx = Context(b.id, devs, tables, net, settings, profile)
        try:
            planned.append((b.data_tier, ctx, plan_boundary(ctx, b.data_tier, budget)))
        except InfeasibleError as e:
            refused.append(e)
    if not planned and refused:
        if len(refused) == 1:
            raise refused[0]
        raise InfeasibleError(refused[0].reason, "\n".join(str(e) for e in refused), refused[0].boundary)
    # Replicas of every boundary share the physical links they cross.
    layouts = [
        (k, r, res.evaluator.layout(rep))
        for k, (_, _, res) in enumerate(planned)
        for r, rep in enumerate(res.replicas)
    ]
    figures = share_links([x[2] for x in layouts], tables, net, settings)
    by_replica = {(k, r): (layout, *fig) for (k, r, layout), fig in zip(layouts, figures, strict=True)}
    boundaries = []
    for k, (tier, ctx, result) in enumerate(planned):
        b = ctx.boundary
        devs = ctx.devices
        cleared = [d.id for d in devs if d.cleared]
        explain.append(
            f"boundary {b}: {len(cleared)} of {len(devs)} devices are cleared for {tier!r}; only they "
            "may host cluster 0 (embedding input) and the head (loss labels)"
        )
        explain.extend(f"boundary {b}: {line}" for line in result.explain)
        rids = [f"{b}/r{r}" for r in range(len(result.replicas))]
        replicas, shared = [], []
        for r, rid in enumerate(rids):
            layout, cost, view = by_replica[(k, r)]
            shared.append((cost, view))
            replicas.append(replica_plan(rid, layout, cost, tables, view, settings))
            explain.extend(explain_replica(ctx, rid, layout, cost, view))
        entries = backups(ctx, result.evaluator, result.replicas, result.standby, rids, shared)
        explain.extend(
            explain_standby(ctx, result.evaluator, result.replicas, result.standby, entries, shared)
        )
        boundaries.append(
            P.BoundaryPlan(
                id=b,
                data_tier=tier,
                replicas=replicas,
                standby=[devs[i].id for i in result.standby],
                backups=entries,
                tokens_per_s=sum(r.predicted.tokens_per_s for r in replicas),
            )
        )
    for e in refused:
        explain.append(f"boundary {e.boundary}: refused ({e.reason}); the other boundaries are planned")
    plan = P.Plan(
        fleet=fleet.name,
        model=model_info(profile, tables),
        settings=P.Settings(
            micro_batches=settings.micro_batches,
            memory_headroom=settings.memory_headroom,
            overhead_bytes=settings.overhead_bytes,
            calibration={k: v for k, v in eta.items() if v != 1.0},
        ),
        boundaries=boundaries,
        refused=[P.Refusal(boundary=e.boundary, reason=e.reason, message=str(e)) for e in refused],
        tokens_per_s=sum(b.tokens_per_s for b in boundaries),
        checks=[],
        explain=explain,
    )
    plan.checks = check_plan(plan, fleet, profile)
    return plan
