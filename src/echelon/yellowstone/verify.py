"""Constraint checks re-derived from a plan, the fleet file and the model profile alone.

Nothing here trusts the planner's own figures: memory is recomputed from the stages, shares and
parallelism written in the plan against each device's memory in the fleet file; tiers and
boundaries come from the fleet file.
"""

from __future__ import annotations

import itertools

from echelon.yellowstone.cost import (
    MODES,
    Cluster,
    CostSettings,
    Device,
    Link,
    Segment,
    Tables,
    device_memory,
)
from echelon.yellowstone.fleet import Fleet
from echelon.yellowstone.model_profile import ModelProfile
from echelon.yellowstone.plan import Check, Plan, ReplicaPlan


def check_plan(plan: Plan, fleet: Fleet, profile: ModelProfile) -> list[Check]:
    """Memory, access tier, boundary, coverage and single-use checks; each names its worst case."""
    devices = {d.id: d for d in fleet.devices}
    settings = CostSettings(
        plan.settings.micro_batches, plan.settings.memory_headroom, plan.settings.overhead_bytes
    )
    tables = Tables(profile)
    problems: dict[str, list[str]] = {
        k: [] for k in ("memory", "access tier", "boundary", "coverage", "single use")
    }
    worst = (0.0, "")
    seen: set[str] = set()
    for b in plan.boundaries:
        tier = fleet.tier_rank(next(x.data_tier for x in fleet.boundaries if x.id == b.id))
        replicas = [*b.replicas, *(x.replacement for x in b.backups if x.replacement is not None)]
        for name in [d for r in b.replicas for c in r.clusters for d in c.devices] + b.standby:
            if name in seen:
                problems["single use"].append(f"{name} appears twice")
            seen.add(name)
        for r in replicas:
            for c in r.clusters:
                for name in c.devices:
                    if name not in devices or devices[name].boundary != b.id:
                        problems["boundary"].append(f"{r.id}: {name} is not a device of boundary {b.id}")
                    elif devices[name].site != c.site:
                        problems["boundary"].append(f"{c.id}: {name} is not at site {c.site}")
            by_id = {c.id: c for c in r.clusters}
            for s in r.stages:
                if any(u.raw_data for u in profile.units[s.units[0] : s.units[1]]):
                    for name in by_id[s.cluster].devices:
                        if name in devices and fleet.tier_rank(devices[name].access_tier) < tier:
                            problems["access tier"].append(
                                f"{r.id} stage {s.index} ({s.label}) runs on {name}"
                            )
            covered = sorted(tuple(s.units) for s in r.stages)
            bounds = [0] + [end for _, end in covered]
            if (
                covered != list(itertools.pairwise(bounds))
                or bounds[-1] != tables.n_units
                or any(a >= e for a, e in covered)
            ):
                problems["coverage"].append(f"{r.id}: stages cover {covered}, not all units once")
            for msg, use in _memory(r, devices, tables, settings):
                if msg:
                    problems["memory"].append(msg)
                worst = max(worst, use)
    detail_ok = {
        "memory": f"every device within its usable memory (highest use {worst[0]:.0%}, {worst[1]})",
        "access tier": "raw-data stages run only on devices cleared for their boundary's data tier",
        "boundary": "every pipeline stays inside one boundary, each cluster inside one site",
        "coverage": "every replica runs every unit exactly once",
        "single use": "no device is in two places",
    }
    return [
        Check(
            name=k,
            ok=not v,
            detail=detail_ok[k] if not v else "; ".join(v[:5]) + (" ..." if len(v) > 5 else ""),
        )
        for k, v in problems.items()
    ]


def _memory(r: ReplicaPlan, devices, tables: Tables, settings: CostSettings):
    """(problem or '', (use fraction, device)) per device of replica r."""
    eta_free = Link(0.0, 1.0)
    for c in r.clusters:
        if any(name not in devices for name in c.devices):
            continue
        devs = tuple(
            Device(
                n,
                devices[n].site,
                1.0,
                devices[n].memory * settings.memory_headroom,
                devices[n].memory,
                True,
                1.0,
            )
            for n in c.devices
        )
        cl = Cluster(devs, tuple(c.shares), eta_free, 0.0)
        ranges = [(s.units[0], s.units[1], s.in_flight) for s in r.stages if s.cluster == c.id]
        seg: Segment = tables.segment(ranges)
        mode = MODES.index(c.parallelism)
        for d, used in zip(devs, device_memory(cl, seg, mode, settings, tables.profile.seq_len), strict=True):
            frac = used / d.capacity
            msg = (
                f"{d.id} needs {used / 2**30:.1f} GiB of {d.capacity / 2**30:.1f} GiB usable"
                if frac > 1 + 1e-9
                else ""
            )
            yield msg, (frac, d.id)
