"""Reasons for the plan's choices, each with the numbers it rests on (`echelon plan --explain`).

Per replica: its structure; its layer split against fractional compute budgets; per cluster the
parallelism mode against every faster mode, with the bytes the worst device would need in it.
Per boundary: which standby devices back up which failures (only those a backup names), and for
every standby device the best use of it that was tried and what it would do to throughput, or
why it fits nowhere.
"""

from __future__ import annotations

import numpy as np

from echelon.yellowstone import plan as P
from echelon.yellowstone.construct import placements, standby_groups
from echelon.yellowstone.cost import (
    MODES,
    Cluster,
    Layout,
    ReplicaCost,
    cluster_ranges,
    evaluate,
    make_cluster,
    mode_costs,
    pipeline_seconds,
)
from echelon.yellowstone.fleet import GIB
from echelon.yellowstone.network import SharedNetwork
from echelon.yellowstone.search import Context, Evaluator, Replica

EXPLAINED_GROUPS = 8  # kinds of standby device whose best use is analysed with numbers


def _gib(x: float) -> str:
    return f"{x / GIB:,.1f} GiB"


def explain_replica(
    ctx: Context, rid: str, layout: Layout, cost: ReplicaCost, net: SharedNetwork
) -> list[str]:
    """Why this structure, split and parallelism."""
    n, s, prof = ctx.tables.n_units, ctx.settings, ctx.profile
    out = []
    if layout.structure == "U":
        out.append(f"{rid}: U-shaped: the head (loss labels) folds back into cluster 0, the cleared cluster")
    elif layout.structure == "linear":
        out.append(f"{rid}: linear: the last cluster is cleared too, so it hosts the head")
    else:
        out.append(f"{rid}: one cluster holds the whole model, no pipeline needed")
    if len(layout.clusters) > 1:
        speeds = np.array([sum(d.speed for d in cl.devices) for cl in layout.clusters])
        budget = fractional_cuts(ctx, layout, speeds)
        base = evaluate(Layout(layout.clusters, layout.structure, budget), ctx.tables, net, s)
        was = "does not fit memory" if base is None else f"would take {base.step_s:.3f} s per step"
        out.append(
            f"{rid}: layers split by fractional compute budgets {budget} {was}; the DP refined it to "
            f"{layout.cuts} at {cost.step_s:.3f} s (bubble {cost.bubble:.0%})"
        )
    p2p = prof.micro_batch * prof.seq_len * prof.activation_bytes
    sends = pipeline_seconds(layout.clusters, layout.structure, net, p2p)
    assert sends is not None  # the layout was evaluated over this network
    for c, (cl, ranges) in enumerate(
        zip(layout.clusters, cluster_ranges(layout, s.micro_batches, n), strict=True)
    ):
        seg = ctx.tables.segment(ranges)
        out.append(
            f"{rid}/c{c} ({cl.site}, {cl.n} device(s), micro-batch shares {list(cl.shares)} by speed): "
            + _mode_reason(cl, seg, sends[c], ctx, cost.modes[c])
        )
    return out


def _mode_reason(cl: Cluster, seg, sends: float, ctx: Context, chosen: str) -> str:
    """The chosen mode, and for every mode that would be faster, the memory it would need."""
    s = ctx.settings
    options = mode_costs(cl, seg, sends, s, ctx.profile.seq_len)
    score = {mc.mode: float(mc.g + mc.ar / max(s.micro_batches - 1, 1)) for mc in options}
    mine = next(mc for mc in options if mc.mode == chosen)
    worst = max(range(cl.n), key=lambda i: float(mine.need[i]) / cl.devices[i].capacity)
    dev = cl.devices[worst]
    weights = (
        float(seg.state) if chosen.startswith("DDP") else float(seg.state) / cl.n + float(seg.max_weight)
    )
    need = float(mine.need[worst])
    parts = [
        f"{chosen} ({score[chosen]:.3f} s per micro-batch): {dev.id} needs {_gib(need)} of {_gib(dev.capacity)} usable "
        f"(weights and optimizer state {_gib(weights)}, activations {_gib(need - weights - s.overhead_bytes)}, "
        f"runtime {_gib(s.overhead_bytes)})"
    ]
    for mc in options:
        if score[mc.mode] >= score[chosen] or mc.mode == chosen:
            continue
        i = max(range(cl.n), key=lambda k: float(mc.need[k]) / cl.devices[k].capacity)
        parts.append(
            f"{mc.mode} would be faster ({score[mc.mode]:.3f} s) but {cl.devices[i].id} would need "
            f"{_gib(float(mc.need[i]))} of {_gib(cl.devices[i].capacity)}"
        )
    return "; ".join(parts)


def fractional_cuts(ctx: Context, layout: Layout, speeds: np.ndarray) -> tuple[tuple[int, int], ...]:
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


def explain_standby(
    ctx: Context,
    ev: Evaluator,
    replicas: list[Replica],
    standby: list[int],
    entries: list[P.Backup],
    shared: list[tuple[ReplicaCost, SharedNetwork]],
) -> list[str]:
    """What each standby device backs up, and why it is not in a replica, with numbers."""
    devs, b = ctx.devices, ctx.boundary
    if not standby:
        return []
    covers: dict[str, list[str]] = {}
    for e in entries:
        if e.standby is not None:
            covers.setdefault(e.standby, []).append(e.device)
    out = []
    for s in standby:
        name = devs[s].id
        if name in covers:
            shown = covers[name][:6]
            more = f" and {len(covers[name]) - 6} more" if len(covers[name]) > 6 else ""
            out.append(f"boundary {b}: standby {name} backs up {', '.join(shown)}{more}")
    idle = [devs[s].id for s in standby if devs[s].id not in covers]
    if idle:
        out.append(
            f"boundary {b}: standby {', '.join(idle[:12])}{' ...' if len(idle) > 12 else ''} back up no device "
            "(for no failure is taking one of them the fastest option)"
        )
    groups = standby_groups(ctx, standby)
    for group in groups[:EXPLAINED_GROUPS]:
        out.append(f"boundary {b}: " + _unused(ctx, ev, replicas, group, shared))
    if len(groups) > EXPLAINED_GROUPS:
        rest = groups[EXPLAINED_GROUPS:]
        out.append(
            f"boundary {b}: {sum(len(g) for g in rest)} more standby devices in {len(rest)} kinds were not "
            f"analysed here (the first {EXPLAINED_GROUPS} kinds are)"
        )
    return out


def _unused(
    ctx: Context,
    ev: Evaluator,
    replicas: list[Replica],
    group: list[int],
    shared: list[tuple[ReplicaCost, SharedNetwork]],
) -> str:
    """Why these interchangeable standby devices are not in a replica: the best use tried."""
    devs, prof = ctx.devices, ctx.profile
    d = devs[group[0]]
    names = ", ".join(devs[i].id for i in group[:6]) + (f" (+{len(group) - 6})" if len(group) > 6 else "")
    head = f"{names} ({d.site}, {_gib(d.memory)}, {d.speed / 1e12:,.0f} TFLOP/s each) stay on standby: "
    cell = tuple(group[: prof.micro_batch])
    trials = placements(ctx, ev, replicas, group)
    if not trials:
        return head + "there is no replica to add them to"
    scored = [
        (ev.score(t) - (0.0 if r is None else ev.score(replicas[r])), r, t, what) for r, t, what in trials
    ]
    gain, r, trial, what = max(scored, key=lambda x: x[0])
    if ev.score(trial) <= 0:
        return head + _why_no_fit(ctx, cell)
    where = "" if r is None else f" in r{r}"
    before = 0.0 if r is None else ev.score(replicas[r])
    layout = ev.layout(trial)
    net = ctx.net if r is None else shared[r][1]
    cost = evaluate(layout, ctx.tables, net, ctx.settings)
    assert cost is not None
    k = next(i for i, cl in enumerate(layout.clusters) if any(x.id == devs[group[0]].id for x in cl.devices))
    p2p = prof.micro_batch * prof.seq_len * prof.activation_bytes
    sends = pipeline_seconds(layout.clusters, layout.structure, net, p2p)
    assert sends is not None
    slowest = max(cost.group_s)
    detail = (
        f"their cluster would take {cost.group_s[k]:.3f} s per micro-batch ({sends[k]:.3f} s of it handing "
        f"activations and gradients to the neighbouring stages), the slowest cluster {slowest:.3f} s"
    )
    return head + (
        f"the best use tried, {what}{where}, would change throughput by {gain:+,.0f} tokens/s "
        f"({before:,.0f} -> {ev.score(trial):,.0f}): {detail}"
    )


def _why_no_fit(ctx: Context, cell: tuple[int, ...]) -> str:
    """Numbers for: these devices cannot hold even one decoder layer with one micro-batch in flight."""
    devs, prof, s = ctx.devices, ctx.profile, ctx.settings
    cl = make_cluster(tuple(devs[i] for i in cell), ctx.lans[devs[cell[0]].site], prof)
    seg = ctx.tables.segment([(1, 2, 1)])
    options = mode_costs(cl, seg, 0.0, s, prof.seq_len)
    least = min(options, key=lambda mc: max(float(x) for x in mc.need))
    need = max(float(x) for x in least.need)
    return (
        f"no placement fits: even one decoder layer with one micro-batch in flight needs {_gib(need)} per device "
        f"in {least.mode} over the {cl.n} of them, more than their {_gib(min(d.capacity for d in cl.devices))} "
        f"usable (modes tried: {', '.join(MODES[: len(options)])})"
        if need > min(d.capacity for d in cl.devices)
        else "no replica trains with them added (memory or routes to the other stages)"
    )
